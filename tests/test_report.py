"""Run report: plots are valid PNGs, report.html is self-contained, escaped and complete."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from meshfl.experiment.report import collect_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["accuracy_per_peer.png", "messages_per_peer.png", "loss_per_round.png"]


def _metric(peer: int, rnd: int, metric: str, value: float) -> dict:
    return {"event": "metric", "round": rnd, "peer": peer, "metric": metric, "value": value,
            "virtual_time": rnd * 2.5, "wall_time": rnd * 0.4}


def synthetic_run(peers: int = 4, rounds: int = 5, dead: int | None = 3) -> tuple[list[dict], dict]:
    """Peer `dead` stops after round 2; peer 1 misses round 3; plus non-metric noise."""
    events: list[dict] = [{"event": "message", "src": 0, "dst": 1, "bytes": 100}]
    final: dict[str, float] = {}
    for p in range(peers):
        for r in range(1, rounds + 1):
            if (p == dead and r > 2) or (p == 1 and r == 3):
                continue
            acc = round(0.5 + 0.08 * r + 0.01 * p, 4)
            events.append(_metric(p, r, "global_accuracy", acc))
            events.append(_metric(p, r, "global_loss", 2.0 / r + 0.01 * p))
            events.append(_metric(p, r, "train_loss", 1.5 / r))
            events.append(_metric(p, r, "local_accuracy", acc))
            final[str(p)] = acc
    events.append({"event": "missed_models", "peer": 2, "round": 4, "missing": [3]})
    events.append({"event": "metric", "metric": "global_accuracy"})  # malformed: ignored
    summary = {
        "peers": peers, "rounds": rounds, "final_global_accuracy": final,
        "messages_sent": {str(p): 100 + p for p in range(peers)},
        "bytes_sent": {str(p): 123456 * (p + 1) for p in range(peers)},
        "wall_time_s": 12.3, "virtual_time_s": 45.6,
        "mean_final_accuracy": float(np.mean(list(final.values()))),
        "min_final_accuracy": float(np.min(list(final.values()))),
    }
    if dead is not None:
        summary["dead_peers"] = [dead]
    return events, summary


CONFIG = "name: test\npeers: 4\nnote: <b>not bold</b> & more\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict]:
    run_dir = tmp_path_factory.mktemp("run")
    events, summary = synthetic_run()
    files = write_report(run_dir, events, summary, CONFIG, title="test <run>")
    return run_dir, files, summary


def test_writes_all_files(report) -> None:
    run_dir, files, _ = report
    assert [f.name for f in files] == [*PLOTS, "report.html"]
    for f in files:
        assert f.parent == run_dir
        assert f.is_file() and f.stat().st_size > 0


def test_plots_are_png(report) -> None:
    run_dir, _, _ = report
    for name in PLOTS:
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC


def test_html_embeds_plots_and_is_self_contained(report) -> None:
    html = (report[0] / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "<script" not in html
    assert "http" not in html
    assert "<link" not in html


def test_html_lists_every_peer_with_final_accuracy(report) -> None:
    html = (report[0] / "report.html").read_text()
    for peer, acc in report[2]["final_global_accuracy"].items():
        assert f'<td class="num">{peer}</td><td class="num">{acc:.4f}</td>' in html


def test_html_summary_values(report) -> None:
    html = (report[0] / "report.html").read_text()
    summary = report[2]
    assert f"{summary['mean_final_accuracy']:.4f}" in html
    assert f"{summary['min_final_accuracy']:.4f}" in html
    assert f"{sum(summary['messages_sent'].values()):,}" in html
    assert f"{sum(summary['bytes_sent'].values()):,}" in html
    assert "12.30 s" in html and "45.60 s" in html


def test_dead_peers_highlighted(report) -> None:
    html = (report[0] / "report.html").read_text()
    assert '<td class="dead">3</td>' in html
    assert '<tr class="dead"><td class="num">3</td>' in html


def test_config_and_title_escaped(report) -> None:
    html = (report[0] / "report.html").read_text()
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; more" in html
    assert "<b>" not in html
    assert "<title>test &lt;run&gt;</title>" in html


def test_collect_metrics_grid_handles_gaps_and_noise() -> None:
    events, _ = synthetic_run()
    grids = collect_metrics(events)
    assert set(grids) == {"global_accuracy", "global_loss", "train_loss", "local_accuracy"}
    acc = grids["global_accuracy"]
    assert acc.peers.tolist() == [0, 1, 2, 3]
    assert acc.rounds.tolist() == [1, 2, 3, 4, 5]
    assert math.isnan(acc.values[1, 2])  # peer 1 missed round 3
    assert np.isnan(acc.values[3, 2:]).all()  # peer 3 dead after round 2
    mean = acc.mean_per_round()
    assert mean[2] == pytest.approx(np.mean([acc.values[0, 2], acc.values[2, 2]]))


def test_minimal_summary_and_no_metrics(tmp_path: Path) -> None:
    files = write_report(tmp_path / "new" / "dir", [{"event": "message"}], {}, "")
    assert all(f.is_file() for f in files)
    html = files[-1].read_text()
    assert "—" in html and "none" in html


def test_many_peers_no_legend_path(tmp_path: Path) -> None:
    events, summary = synthetic_run(peers=60, rounds=30, dead=7)
    files = write_report(tmp_path, events, summary, CONFIG)
    assert files[0].read_bytes()[:8] == PNG_MAGIC
    table = files[-1].read_text().split("Per-peer results")[1].split("</table>")[0]
    assert table.count("<tr") == 61 and table.count('<tr class="dead">') == 1  # a header and every peer; peer 7 dead


def test_rewrite_overwrites(tmp_path: Path) -> None:
    events, summary = synthetic_run()
    write_report(tmp_path, events, summary, CONFIG)
    summary["final_global_accuracy"]["0"] = 0.1234
    html = write_report(tmp_path, events, summary, CONFIG)[-1].read_text()
    assert "0.1234" in html


def test_traffic_by_type_and_grpc_rows(tmp_path: Path) -> None:
    events, summary = synthetic_run(dead=None)
    summary.update({"messages_by_type": {"Votes": 30, "PartialModel": 10},
                    "bytes_by_type": {"Votes": 1_000, "PartialModel": 3_000}})
    html = write_report(tmp_path / "sim", events, summary, CONFIG)[-1].read_text()
    assert '<tr><td>PartialModel</td><td class="num">10</td><td class="num">3,000</td><td class="num">75.0%</td></tr>' in html
    assert '<tr><td>Votes</td><td class="num">30</td><td class="num">1,000</td><td class="num">25.0%</td></tr>' in html
    assert "Virtual time" in html and "Runtime" not in html
    summary.update({"runtime": "grpc", "total_refused": 1200, "wire_overhead_ratio": 1.0011})
    html = write_report(tmp_path / "grpc", events, summary, CONFIG)[-1].read_text()
    assert "Virtual time" not in html and "Longest peer clock" in html
    assert '<tr><th>Messages refused at the door</th><td class="dead">1,200</td></tr>' in html
    assert "<td>1.0011</td>" in html


def lifecycle_run(with_rounds: bool) -> tuple[list[dict], dict]:
    """Peer 1 crashes at t=3 and restarts at t=5; peer 2 crashes for good at t=4; peer 3 is stopped."""
    def acc(peer: int, t: float, value: float, rnd: int) -> dict:
        event = {"event": "metric", "peer": peer, "metric": "global_accuracy", "value": value,
                 "virtual_time": t, "wall_time": t / 10}
        return event | ({"round": rnd} if with_rounds else {})

    def life(kind: str, peer: int, t: float, **fields) -> dict:
        return {"event": kind, "peer": peer, **fields, "virtual_time": t, "wall_time": t / 10}

    events = [life("peer_started", p, 0.0, incarnation=0) for p in range(4)]
    for r in range(1, 9):
        t = float(r)
        for p in range(4):
            if (p == 1 and 3 < t < 6) or (p == 2 and t > 4) or (p == 3 and t > 6):
                continue
            events.append(acc(p, t, 0.5 + 0.05 * r + 0.01 * p, r))
        if r == 3:
            events += [{"event": "fault", "kind": "crash", "peers": [1], "virtual_time": t, "wall_time": t / 10},
                       life("peer_crashed", 1, t + 0.1, incarnation=0, reason="fault", round=3)]
        if r == 4:
            events.append(life("peer_crashed", 2, t + 0.1, incarnation=0, reason="exception", error="boom"))
        if r == 5:
            events.append(life("peer_started", 1, t + 0.5, incarnation=1))
        if r == 6:
            events.append(life("peer_finished", 3, t + 0.5, incarnation=0, status="stopped"))
    summary = {"peers": 4, "rounds": 8, "interrupted": True, "dead_peers": [2],
               "final_global_accuracy": {"0": 0.93, "1": 0.94, "2": 0.72, "3": 0.83},
               "final_round": {"0": 8, "1": 8, "2": 4, "3": 6} if with_rounds else {},
               "peer_status": {"0": "running", "1": "running", "2": "crashed", "3": "stopped"},
               "incarnations": {"0": 1, "1": 2, "2": 1, "3": 1},
               "mean_final_accuracy": None, "min_final_accuracy": None,
               "messages_sent": {str(p): 10 for p in range(4)}, "bytes_sent": {str(p): 1000 for p in range(4)}}
    return events, summary


@pytest.mark.parametrize("with_rounds", [True, False])
def test_lifecycle_markers_statuses_and_interrupted(tmp_path: Path, with_rounds: bool, monkeypatch) -> None:
    from meshfl.experiment import report as report_module

    marks: list[tuple[str, float]] = []
    original = report_module._mark_lifecycle

    def spy(ax, histories, series, x_of):
        drawn = original(ax, histories, series, x_of)
        for peer, h in histories.items():
            marks.extend((f"crash {peer}", x_of(m)) for m in h.crashes)
            marks.extend((f"restart {peer}", x_of(m)) for m in h.restarts)
        marks.append(("drawn", tuple(sorted(drawn))))
        return drawn

    monkeypatch.setattr(report_module, "_mark_lifecycle", spy)
    events, summary = lifecycle_run(with_rounds)
    files = write_report(tmp_path, events, summary, CONFIG, title="lifecycle")
    assert files[0].read_bytes()[:8] == PNG_MAGIC
    expected = ([("crash 1", 3.0), ("restart 1", 5.0), ("crash 2", 4.0)] if with_rounds
                else [("crash 1", 3.1), ("restart 1", 5.5), ("crash 2", 4.1)])
    assert marks == [*expected, ("drawn", ("crash", "restart"))]
    html = files[-1].read_text()
    assert "<title>lifecycle (interrupted)</title>" in html and 'class="interrupted"' in html
    assert "<tr><th>Crashes / restarts</th><td class=\"dead\">2 / 1</td></tr>" in html
    assert "<tr><th>Faults fired</th><td>1 (crash)</td></tr>" in html
    table = html.split("Per-peer results")[1].split("</table>")[0]
    # peer, final accuracy, at round, messages, bytes, incarnations, crashes, status
    assert '<td class="num">1</td><td class="num">0.9400</td>' in table
    assert '<td class="num">2</td><td class="num">1</td><td>running</td></tr>' in table  # peer 1: 2 lives, 1 crash
    assert '<tr class="dead"><td class="num">2</td>' in table and "<td>crashed</td>" in table
    assert '<tr class="stopped"><td class="num">3</td>' in table and "<td>stopped</td>" in table
    assert "dead" not in table.split('<td class="num">3</td>')[1]  # a stopped peer is not dead


def test_mean_of_latest_averages_each_peers_newest_value_once_every_peer_has_one():
    from meshfl.experiment.report import mean_of_latest

    events = [{"event": "metric", "metric": "global_accuracy", "peer": p, "value": v, "virtual_time": t}
              for p, v, t in ((0, 0.2, 1.0), (0, 0.4, 2.0), (1, 0.6, 3.0), (0, 0.8, 4.0), (1, 1.0, 5.0))]
    events.append({"event": "metric", "metric": "train_loss", "peer": 1, "value": 9.0, "virtual_time": 0.5})
    xs, means = mean_of_latest(events, "global_accuracy", 2)
    assert xs == [3.0, 4.0, 5.0]
    assert means == pytest.approx([0.5, 0.7, 0.9])
