"""meshfl sweep / compare: outcomes on small digits runs (3 peers, 2 rounds, 1 local epoch)."""

import csv
import json
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from meshfl.cli import app
from meshfl.experiment import sweep as sw

runner = CliRunner()

SMALL = ["--set", "peers=3", "--set", "rounds=2", "--set", "train.local_epochs=1", "--quiet"]
GRID = ["--grid", "train.learning_rate=0.05,0.2", "--seeds", "2"]
PNG = b"\x89PNG\r\n\x1a\n"


def _sweep(out, *extra):
    result = runner.invoke(app, ["sweep", *SMALL, *GRID, "--out", str(out), *extra], terminal_width=200)
    assert result.exit_code == 0, result.output
    return json.loads((out / "sweep.json").read_text())


def _without_wall_times(value):
    if isinstance(value, dict):
        return {k: _without_wall_times(v) for k, v in value.items() if not k.startswith("wall_time") and k != "workers"}
    if isinstance(value, list):
        return [_without_wall_times(v) for v in value]
    return value


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    return out, _sweep(out, "--workers", "1")


def test_table_has_one_row_per_point_with_its_grid_values_and_a_std_over_seeds(swept):
    out, data = swept
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["train.learning_rate"] for r in rows] == ["0.05", "0.2"]
    for row, point in zip(rows, data["points"], strict=True):
        assert len(point["runs"]) == 2 and {r["status"] for r in point["runs"]} == {"ok"}
        accuracies = [r["mean_final_accuracy"] for r in point["runs"]]
        assert float(row["mean_final_accuracy_mean"]) == pytest.approx(sum(accuracies) / 2)
        assert row["mean_final_accuracy_std"] != "" and float(row["mean_final_accuracy_std"]) >= 0
        mb = [r["total_bytes"] / 1e6 for r in point["runs"]]
        assert float(row["total_mb_mean"]) == pytest.approx(sum(mb) / 2)
        assert 0 < float(row["virtual_time_s_mean"]) and float(row["min_final_accuracy_mean"]) <= float(row["mean_final_accuracy_mean"])
    assert rows[0]["mean_final_accuracy_mean"] != rows[1]["mean_final_accuracy_mean"]  # the grid value mattered
    assert data["grid"] == {"keys": ["train.learning_rate"], "values": {"train.learning_rate": ["0.05", "0.2"]}}
    assert data["seeds"] == [0, 1] and data["points"][0]["values"] == {"train.learning_rate": 0.05}


def test_every_run_has_its_folder_and_round_durations_add_up_to_its_round_times(swept):
    out, data = swept
    for point in data["points"]:
        for run in point["runs"]:
            folder = out / run["run_dir"]
            assert folder.parent == out / "runs" and "seed=" in folder.name
            summary = json.loads((folder / "summary.json").read_text())
            assert summary["seed"] == run["seed"] and summary["mean_final_accuracy"] == run["mean_final_accuracy"]
            assert summary["total_bytes"] == run["total_bytes"]
            assert run["rounds"] == [1, 2]
            assert sum(run["round_durations_s"]) == pytest.approx(run["round_time_s"][-1])
            assert all(d > 0 for d in run["round_durations_s"])
            assert 0 < run["cumulative_bytes"][0] < run["cumulative_bytes"][1] <= run["total_bytes"]
        agg = point["aggregate"]
        assert agg["seeds"] == 2 and agg["rounds"] == [1, 2] and len(agg["round_durations_s"]["mean"]) == 2


class _Html(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_plots_and_a_self_contained_page_are_written(swept):
    out, _ = swept
    names = ["accuracy_per_round.png", "accuracy_over_time.png", "accuracy_over_bytes.png",
             "final_accuracy_vs_train.learning_rate.png", "round_duration_vs_train.learning_rate.png"]
    for name in names:
        assert (out / name).read_bytes().startswith(PNG), name
    page = (out / "sweep.html").read_text()
    parser = _Html()
    parser.feed(page)
    assert page.startswith("<!DOCTYPE html>") and "table" in parser.tags
    assert len(parser.images) == len(names) and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert "train.learning_rate" in page


def test_the_same_sweep_twice_gives_the_same_sweep_json(swept, tmp_path):
    _, first = swept
    again = _sweep(tmp_path / "again", "--workers", "1")
    assert _without_wall_times(again) == _without_wall_times(first)


def test_two_workers_agree_with_one(swept, tmp_path):
    _, first = swept
    parallel = _sweep(tmp_path / "parallel", "--workers", "2")
    assert parallel["workers"] == 2 and first["workers"] == 1
    assert _without_wall_times(parallel) == _without_wall_times(first)


@pytest.mark.parametrize(("grid", "expected"), [
    ("gossip.fanout=1,2", "gossip.fanout"),
    ("topology.kind=full,torus", "topology.kind=torus"),
    ("peers=3,0", "peers=0"),
    ("faults.0.count=1,2", "faults.0.count"),
    ("peers", "--grid 'peers': expected KEY=v1,v2"),
    ("peers=2,,3", "empty value"),
])
def test_a_bad_grid_key_or_value_fails_before_any_run(tmp_path, monkeypatch, grid, expected):
    monkeypatch.setattr(sw, "run_tasks", lambda *a, **k: pytest.fail("a run started"))
    out = tmp_path / "never"
    result = runner.invoke(app, ["sweep", *SMALL, "--grid", "train.learning_rate=0.1,0.2", "--grid", grid,
                                 "--out", str(out)], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_a_repeated_grid_key_or_a_bad_set_fails_too(tmp_path):
    result = runner.invoke(app, ["sweep", *SMALL, "--grid", "peers=2,3", "--grid", "peers=4", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "peers: given twice" in result.output
    result = runner.invoke(app, ["sweep", *SMALL, "--set", "rounds=0", "--grid", "peers=2,3", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "rounds" in result.output
    assert not (tmp_path / "x").exists()


def test_compare_puts_existing_run_folders_side_by_side(swept, tmp_path):
    out, data = swept
    runs = [out / point["runs"][0]["run_dir"] for point in data["points"]]
    result = runner.invoke(app, ["compare", *map(str, runs), "--labels", "slow,fast", "--out", str(tmp_path / "c")],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "c" / "table.csv").open()))
    assert [r["run"] for r in rows] == ["slow", "fast"]
    for row, point in zip(rows, data["points"], strict=True):
        assert float(row["mean_final_accuracy_mean"]) == pytest.approx(point["runs"][0]["mean_final_accuracy"])
        assert row["mean_final_accuracy_std"] == ""  # one seed: no std
    compared = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert compared["points"][0]["runs"][0]["round_durations_s"] == data["points"][0]["runs"][0]["round_durations_s"]
    for name in ("accuracy_per_round.png", "accuracy_over_time.png", "accuracy_over_bytes.png"):
        assert (tmp_path / "c" / name).read_bytes().startswith(PNG)
    assert "data:image/png;base64," in (tmp_path / "c" / "compare.html").read_text()
    # folder names as labels; a folder that is not a run folder is one line, exit 2
    assert runner.invoke(app, ["compare", *map(str, runs), "--out", str(tmp_path / "d")]).exit_code == 0
    bad = runner.invoke(app, ["compare", str(runs[0]), str(tmp_path), "--out", str(tmp_path / "e")])
    assert bad.exit_code == 2 and "not a run folder" in bad.output


def test_compare_plots_a_run_without_rounds_over_time(swept, tmp_path):
    out, data = swept
    source = out / data["points"][0]["runs"][0]["run_dir"]
    plain = tmp_path / "no-rounds"
    plain.mkdir()
    (plain / "summary.json").write_text((source / "summary.json").read_text())
    events = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines()]
    (plain / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in e.items() if k != "round"}) + "\n" for e in events))
    result = runner.invoke(app, ["compare", str(source), str(plain), "--out", str(tmp_path / "c")], terminal_width=200)
    assert result.exit_code == 0, result.output
    compared = json.loads((tmp_path / "c" / "compare.json").read_text())
    without = compared["points"][1]["runs"][0]
    assert without["rounds"] == [] and without["round_durations_s"] == [] and without["accuracy_over_time"]
    assert (tmp_path / "c" / "accuracy_over_time.png").read_bytes().startswith(PNG)


def test_round_durations_from_events():
    def acc(peer, rnd, t):
        return {"event": "metric", "metric": "global_accuracy", "peer": peer, "round": rnd, "value": 0.5, "virtual_time": t}

    events = [acc(0, 1, 2.0), acc(1, 1, 2.5), acc(1, 2, 3.0), acc(0, 2, 3.5), acc(0, 3, 7.0)]
    record = sw.run_record(events, {"total_bytes": 10}, None)
    assert record["rounds"] == [1, 2, 3] and record["round_time_s"] == [2.0, 3.0, 7.0]
    assert record["round_durations_s"] == [2.0, 1.0, 4.0] and record["cumulative_bytes"] is None
    no_rounds = [{k: v for k, v in e.items() if k != "round"} for e in events]
    record = sw.run_record(no_rounds, {}, None)
    assert record["rounds"] == [] and record["round_durations_s"] == [] and len(record["accuracy_over_time"]) == 5


def test_grid_values_split_like_set_values_and_labels_are_folder_names():
    assert sw.split_values("full, ring") == ["full", "ring"]
    assert sw.split_values("[0, 1],[1, 2]") == ["[0, 1]", "[1, 2]"]
    assert sw.split_values("'a,b',c") == ["'a,b'", "c"]
    points = sw.grid_points(sw.parse_grid(["a.b=1,2", "c=x,y"]))
    assert [p.label for p in points] == ["a.b=1,c=x", "a.b=1,c=y", "a.b=2,c=x", "a.b=2,c=y"]
    taken = set()
    assert sw.safe_label("k=[0, 1]/x,seed=0", taken) == "k=_0,_1_x,seed=0"
    assert sw.safe_label("k=[0, 1]/x,seed=0", taken) == "k=_0,_1_x,seed=0-2"
