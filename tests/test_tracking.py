"""Experiment tracking: TensorBoard event files and MLflow runs written from a run's metrics (both runtimes)."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import meshfl
from meshfl.cli import app
from meshfl.core.metrics import read_jsonl
from meshfl.experiment.tracking import TrackingError

pytest.importorskip("tensorboardX")
pytest.importorskip("mlflow")

SMALL = {"peers": 3, "rounds": 3, "train": {"local_steps": 20}}


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TFRecord event files under `folder`, by tag: [(step, value), ...] (no tensorboard needed)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    for path in files:
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])  # 8 length + 4 length crc; then data + 4 crc
            at += 12 + length + 4
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def expected_scalars(events: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the metrics file says the per-peer scalars are: `<metric>/peer_<i>` -> [(round, value), ...]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        if e.get("event") == "metric" and isinstance(e.get("round"), int) and "about" not in e and e["value"] is not None:
            out.setdefault(f"{e['metric']}/peer_{e['peer']}", []).append((e["round"], float(e["value"])))
    return out


def check_against_metrics_file(run_dir: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    events = read_jsonl(run_dir / "metrics.jsonl")
    expected = expected_scalars(events)
    assert expected and {f"global_accuracy/peer_{p}" for p in range(3)} <= set(expected)
    for tag, points in expected.items():
        assert len(scalars[tag]) == len(points), tag
        assert all(s == r and math.isclose(v, w, rel_tol=1e-6) for (s, v), (r, w) in zip(scalars[tag], points, strict=True)), tag
    rounds = sorted({r for r, _ in expected["global_accuracy/peer_0"]})
    assert [s for s, _ in scalars["global_accuracy/mean"]] == rounds
    last = {tag: dict(points) for tag, points in expected.items()}
    for step, mean in scalars["global_accuracy/mean"]:
        assert math.isclose(mean, sum(last[f"global_accuracy/peer_{p}"][step] for p in range(3)) / 3, rel_tol=1e-6)


def test_tensorboard_event_files_hold_every_metric_of_the_run(tmp_path):
    result = meshfl.run(SMALL, out=tmp_path / "run", progress=False, report=False, tensorboard=True)
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    check_against_metrics_file(result.run_dir, scalars)
    final = scalars["summary/mean_final_accuracy"]
    assert final == [(3, pytest.approx(result.summary["mean_final_accuracy"], rel=1e-6))]


def test_mlflow_run_in_a_file_store_holds_config_metrics_summary_and_artifacts(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = f"file:{tmp_path / 'mlruns'}"
    result = meshfl.run({**SMALL, "name": "tracked"}, out=tmp_path / "run", progress=False, mlflow=store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading a file store back needs it too (MLflow 3)
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.tags["meshfl.runtime"] == "sim" and run.data.params["peers"] == "3"
    assert run.data.params["train.local_steps"] == "20" and run.data.params["train.buffers"] == "average"
    summary = result.summary
    metrics = run.data.metrics
    assert metrics["mean_final_accuracy"] == pytest.approx(summary["mean_final_accuracy"], rel=1e-12)
    assert metrics["min_final_accuracy"] == pytest.approx(summary["min_final_accuracy"], rel=1e-12)
    for peer, accuracy in summary["final_global_accuracy"].items():
        assert metrics[f"final_global_accuracy/peer_{peer}"] == pytest.approx(accuracy, rel=1e-12)
    assert metrics["total_bytes"] == summary["total_bytes"]
    history = {tag: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, tag), key=lambda m: m.step)]
               for tag in expected_scalars(read_jsonl(result.run_dir / "metrics.jsonl"))}
    history["global_accuracy/mean"] = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "global_accuracy/mean")]
    check_against_metrics_file(result.run_dir, history)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "report.html", "plots"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text()) == json.loads((result.run_dir / "summary.json").read_text())


def test_wandb_records_the_run_offline_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: nothing leaves the machine
    result = meshfl.run(SMALL, out=tmp_path / "run", progress=False, report=False, wandb=True)
    (record,) = (result.run_dir / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    data = record.read_bytes()
    for tag in ("global_accuracy/mean", "global_accuracy/peer_0", "mean_final_accuracy", "train.local_steps"):
        assert tag.encode() in data, tag  # metrics, summary and config went into the run's record file


@pytest.mark.parametrize(("flag", "module", "message"), [
    (["--tensorboard"], "tensorboardX", "--tensorboard needs the tensorboardX package: pip install 'meshfl[tensorboard]'"),
    (["--mlflow", "file:./mlruns"], "mlflow", "--mlflow needs the mlflow package (mlflow-skinny is enough): pip install 'meshfl[mlflow]'"),
    (["--wandb"], "wandb", "--wandb needs the wandb package: pip install 'meshfl[wandb]'"),
])
def test_a_missing_package_is_one_line_naming_the_extra_before_any_work(tmp_path, monkeypatch, flag, module, message):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    for command in ("run", "launch"):
        done = CliRunner().invoke(app, [command, "--local", "-q", *flag, "--out", str(tmp_path / command)]
                                  if command == "launch" else [command, "-q", *flag, "--out", str(tmp_path / command)])
        assert done.exit_code == 2 and message in done.output and "Traceback" not in done.output, done.output
        assert not (tmp_path / command).exists()
    keyword = {"tensorboardX": {"tensorboard": True}, "mlflow": {"mlflow": "file:./mlruns"}, "wandb": {"wandb": True}}[module]
    with pytest.raises(TrackingError, match="pip install 'meshfl\\["):
        meshfl.run(SMALL, out=tmp_path / "api", progress=False, **keyword)
    assert not (tmp_path / "api").exists()


def test_tracking_needs_a_run_folder():
    with pytest.raises(TrackingError, match="needs a run folder"):
        meshfl.run(SMALL, out=False, progress=False, tensorboard=True)


def test_launch_writes_the_same_records_from_the_merged_metrics(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    result = meshfl.launch({**SMALL, "rounds": 2, "name": "tracked-grpc"}, out=tmp_path / "grpc", progress=False,
                           report=False, tensorboard=True, mlflow=store, timeout_s=240)
    assert result.summary["dead_peers"] == []
    check_against_metrics_file(result.run_dir, read_scalars(tmp_path / "grpc" / "tensorboard"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("tracked-grpc").experiment_id])
    assert run.data.tags["meshfl.runtime"] == "grpc"
    assert run.data.metrics["mean_final_accuracy"] == pytest.approx(result.summary["mean_final_accuracy"], rel=1e-12)
