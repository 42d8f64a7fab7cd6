"""summary.json without round-synchrony: last accuracy, lifecycles, strict JSON, run folders."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from meshfl.config import load_config
from meshfl.core.metrics import (
    FAULT,
    GLOBAL_ACCURACY,
    METRIC,
    PEER_CRASHED,
    PEER_FINISHED,
    PEER_STARTED,
    MetricsLog,
    read_jsonl,
    strict_json,
)
from meshfl.experiment.run import (
    RunDirError,
    RunInterrupted,
    build_summary,
    claim_run_dir,
    default_run_dir,
    device_error,
    run_experiment,
    write_run_folder,
)

CONFIG = load_config(None, ["peers=4", "rounds=5"])


def strict_loads(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-strict JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def acc(peer: int, value: float, rnd: int | None = None, t: float = 0.0) -> dict:
    event = {"event": METRIC, "peer": peer, "metric": GLOBAL_ACCURACY, "value": value, "virtual_time": t, "wall_time": t}
    if rnd is not None:
        event["round"] = rnd
    return event


def life(kind: str, peer: int, incarnation: int = 0, t: float = 0.0, **fields) -> dict:
    return {"event": kind, "peer": peer, "incarnation": incarnation, **fields, "virtual_time": t, "wall_time": t}


def crash_restart_events() -> list[dict]:
    """0: finishes; 1: crashes, restarts, finishes (no rounds after restart); 2: crashes for good;
    3: reports nothing and never crashes."""
    return [
        *(life(PEER_STARTED, p) for p in range(4)),
        acc(0, 0.5, 1, 1.0), acc(1, 0.4, 1, 1.0), acc(2, 0.45, 1, 1.0),
        {"event": FAULT, "kind": "crash", "peers": [1, 2], "virtual_time": 1.5, "wall_time": 1.5},
        life(PEER_CRASHED, 1, 0, 1.5, reason="fault"),
        life(PEER_CRASHED, 2, 0, 1.5, reason="exception", error="boom"),
        acc(0, 0.7, 2, 2.0),
        life(PEER_STARTED, 1, 1, 3.0),
        acc(1, 0.6, None, 3.5),  # round missing
        acc(0, 0.8, None, 4.0),  # last event wins, whatever its round (none here)
        acc(0, 0.75, 3, 3.9) | {"virtual_time": 3.9},  # event order, not round order, decides: overwritten below
        acc(0, 0.9, None, 4.5),
        life(PEER_FINISHED, 0, 0, 5.0, status="finished"),
        life(PEER_FINISHED, 1, 1, 5.0, status="finished"),
    ]


def summary_of(events: list[dict], **kwargs) -> dict:
    return build_summary(CONFIG, events, messages_sent={p: 1 for p in range(4)}, bytes_sent={p: 10 for p in range(4)},
                         messages_dropped={}, messages_by_type={}, bytes_by_type={}, virtual_time_s=5.0,
                         wall_time_s=1.0, **kwargs)


def test_summary_with_crash_restart_and_missing_rounds() -> None:
    summary = summary_of(crash_restart_events())
    assert summary["final_global_accuracy"] == {"0": 0.9, "1": 0.6, "2": 0.45, "3": None}
    assert summary["final_round"] == {"0": None, "1": None, "2": 1, "3": None}
    assert summary["dead_peers"] == [2]  # 1 came back; 3 never reported but did not crash
    assert summary["peer_status"] == {"0": "finished", "1": "finished", "2": "crashed", "3": "running"}
    assert summary["incarnations"] == {"0": 1, "1": 2, "2": 1, "3": 1}
    assert summary["crashes"] == {"0": 0, "1": 1, "2": 1, "3": 0}
    assert summary["mean_final_accuracy"] == pytest.approx(0.75) and summary["min_final_accuracy"] == 0.6
    assert summary["interrupted"] is False


def test_runtime_named_dead_and_statuses() -> None:
    events = [life(PEER_STARTED, p) for p in range(4)] + [
        acc(0, 0.5, 1), life(PEER_FINISHED, 0, status="stopped"),
        life(PEER_FINISHED, 1, status="left"), life(PEER_FINISHED, 2, status="failed")]
    summary = summary_of(events, dead_peers=[3], interrupted=True)
    assert summary["peer_status"] == {"0": "stopped", "1": "left", "2": "failed", "3": "crashed"}
    assert summary["dead_peers"] == [3] and summary["interrupted"] is True
    assert summary["final_global_accuracy"]["0"] == 0.5 and summary["mean_final_accuracy"] == 0.5


def test_peers_without_lifecycle_events() -> None:
    """A runtime that writes only metrics: finished if the run completed, running if interrupted."""
    events = [acc(p, 0.8, 5) for p in range(3)]
    assert summary_of(events)["peer_status"] == {"0": "finished", "1": "finished", "2": "finished", "3": "finished"}
    interrupted = summary_of(events, interrupted=True)
    assert set(interrupted["peer_status"].values()) == {"running"} and interrupted["dead_peers"] == []
    assert interrupted["incarnations"] == {"0": 1, "1": 1, "2": 1, "3": 0}


def test_nothing_reported_is_null_not_nan() -> None:
    summary = summary_of([acc(0, float("nan"), 1)], interrupted=True)
    assert summary["mean_final_accuracy"] is None and summary["final_global_accuracy"]["0"] is None
    strict_loads(strict_json(summary))


def test_strict_json_and_metrics_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        strict_loads(json.dumps({"x": float("nan")}))  # the checker does catch NaN
    assert strict_loads(strict_json({"a": [float("nan"), float("inf"), 1.5], "b": {"c": -math.inf}})) == {
        "a": [None, None, 1.5], "b": {"c": None}}
    log = MetricsLog()
    log.metric(0, None, GLOBAL_ACCURACY, float("nan"))
    log.metric(1, 2, GLOBAL_ACCURACY, 0.5, incarnation=1)
    log.write_jsonl(tmp_path / "m.jsonl")
    lines = [strict_loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines[0]["value"] is None and "round" not in lines[0] and "incarnation" not in lines[0]
    assert lines[1]["round"] == 2 and lines[1]["incarnation"] == 1


def test_run_folder_is_strict_json(tmp_path: Path) -> None:
    log = MetricsLog()
    log.events = crash_restart_events() + [acc(3, float("nan"))]
    summary = summary_of(log.events, interrupted=True) | {"wire_overhead_ratio": float("nan")}
    write_run_folder(tmp_path / "run", CONFIG, log, summary, [], report=True)
    parsed = strict_loads((tmp_path / "run" / "summary.json").read_text())
    assert parsed["wire_overhead_ratio"] is None and parsed["interrupted"] is True
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        strict_loads(line)
    html = (tmp_path / "run" / "report.html").read_text()
    assert "(interrupted)</title>" in html and 'class="interrupted"' in html


def test_default_run_dirs_in_one_second_are_distinct(tmp_path: Path) -> None:
    made: list[Path] = []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        made.append(default_run_dir(CONFIG, tmp_path))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(p.is_dir() and not any(p.iterdir()) for p in made)
    first, second = default_run_dir(CONFIG, tmp_path / "r"), default_run_dir(CONFIG, tmp_path / "r")
    assert first != second and first.is_dir() and second.is_dir()


def test_claim_run_dir_refuses_files_and_non_empty_folders(tmp_path: Path) -> None:
    assert claim_run_dir(tmp_path / "new" / "run", CONFIG).is_dir()
    (tmp_path / "empty").mkdir()
    assert claim_run_dir(tmp_path / "empty", CONFIG) == tmp_path / "empty"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(RunDirError, match="not empty.*full-2") as info:
        claim_run_dir(tmp_path / "full", CONFIG)
    assert "\n" not in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        claim_run_dir(tmp_path / "file", CONFIG)


def test_device_error_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "train.device=cuda" in device_error(load_config(None, ["train.device=cuda"]))
    assert device_error(CONFIG) is None


def test_interrupted_simulation_still_writes_the_run_folder(tmp_path: Path) -> None:
    config = load_config(None, ["peers=3", "rounds=50", "train.local_epochs=1"])
    metrics = MetricsLog()
    seen: list[int] = []

    def ctrl_c(event: dict) -> None:
        if event["event"] == METRIC and event["metric"] == GLOBAL_ACCURACY:
            seen.append(event["peer"])
            if len(seen) == 7:
                raise KeyboardInterrupt

    metrics.subscribe(ctrl_c)
    with pytest.raises(RunInterrupted) as info:
        run_experiment(config, tmp_path / "run", metrics)
    summary = strict_loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted"] is True and info.value.result.summary["interrupted"] is True
    assert summary["dead_peers"] == [] and all(v is not None for v in summary["final_global_accuracy"].values())
    assert summary["total_messages"] > 0
    assert set(summary["peer_status"].values()) == {"running"}
    assert any(e["event"] == "run_interrupted" for e in read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert "interrupted" in (tmp_path / "run" / "report.html").read_text()
