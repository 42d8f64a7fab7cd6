"""meshfl chaos: random fault schedules, the judge, broken algorithms, determinism per seed."""

import json

import pytest
import torch
from typer.testing import CliRunner

from meshfl.algorithms.base import ALGORITHMS, Algorithm, register
from meshfl.cli import app
from meshfl.core.metrics import GLOBAL_ACCURACY, METRIC, PEER_CRASHED, PEER_FINISHED, PEER_STARTED
from meshfl.core.section import Section
from meshfl.experiment import chaos
from meshfl.runtime.sim.loop import SimulationStalled

runner = CliRunner()


def _chaos(tmp_path, *args):
    out = tmp_path / "chaos.json"
    result = runner.invoke(app, ["chaos", "--quiet", "--out", str(out), *args])
    summary = json.loads(out.read_text()) if out.exists() else None
    return result, summary


def test_small_chaos_run_of_gossip_passes(tmp_path):
    result, summary = _chaos(tmp_path, "--schedules", "6", "--workers", "1", "--verbose")
    assert result.exit_code == 0, result.output
    assert summary["ok"] is True and summary["algorithm"] == "gossip" and summary["schedules"] == 6
    counts = summary["counts"]
    assert {k: counts[k] for k in ("hangs", "nan", "exceptions", "unfinished", "failed", "passed")} == {
        "hangs": 0, "nan": 0, "exceptions": 0, "unfinished": 0, "failed": 0, "passed": 6}
    assert counts["restarts"] >= 1 and counts["never_rejoined"] == 0  # measured: 7 restarts, 4 rejoined, 3 fresh
    assert counts["rejoined"] + counts["rejoined_fresh"] <= counts["restarts"]  # one may crash again before it rejoins
    assert summary["failed"] == []
    assert [r["seed"] for r in summary["results"]] == [0, 1, 2, 3, 4, 5]
    assert all(r["faults"] and r["virtual_time_s"] < summary["max_virtual_time_s"] for r in summary["results"])
    assert summary["max_virtual_time_s"] == chaos.virtual_time_bound(chaos.chaos_config("gossip", 6, 4))


def _ev(event, peer, **fields):
    return {"event": event, "peer": peer, **fields}


def test_judge_flags_exceptions_nan_and_unfinished_peers():
    good = torch.zeros(4)
    bad = torch.tensor([0.0, float("nan"), float("inf"), 1.0])
    events = [
        _ev(PEER_STARTED, p, incarnation=0) for p in range(5)
    ] + [
        _ev(PEER_CRASHED, 0, incarnation=0, reason="exception", error="ValueError: boom",
            traceback='Traceback:\n  File "/x/meshfl/algorithms/gossip.py", line 12, in run\nValueError: boom'),
        _ev(PEER_CRASHED, 1, incarnation=0, reason="fault"),  # crashed for good: need not finish
        _ev(METRIC, 2, metric=GLOBAL_ACCURACY, value=float("nan"), round=1),
        _ev(PEER_FINISHED, 2, incarnation=0, status="finished"),
        _ev(PEER_FINISHED, 3, incarnation=0, status="finished"),
        # peer 4: started, never finished, not crashed -> unfinished
    ]
    verdict = chaos.judge_run(events, {2: good, 3: bad}, peers=5)
    assert verdict.problems == ["nan", "exception", "unfinished"] and not verdict.ok
    assert verdict.exceptions == ["peer 0 (incarnation 0): ValueError: boom (at algorithms/gossip.py:12 in run)"]
    assert verdict.nan == ["peer 3: final model has 2 NaN/Inf values", "peer 2: final global_accuracy is nan"]
    assert verdict.unfinished == [4]  # peer 0 crashed (by exception) and peer 1 crashed: neither need finish
    # a stall is a hang (unfinished is not judged then); any other error is an exception
    stalled = chaos.judge_run(events[:5], {}, peers=5, error=SimulationStalled("deadlock at t=3.000s"))
    assert stalled.hang == "deadlock at t=3.000s" and stalled.unfinished == [] and stalled.problems == ["hang"]
    other = chaos.judge_run([], {}, peers=1, error=RuntimeError("oops"))
    assert other.exceptions == ["simulation: RuntimeError: oops"] and other.problems == ["exception"]
    clean = [_ev(PEER_STARTED, 0, incarnation=0), _ev(PEER_CRASHED, 0, incarnation=0, reason="fault"),
             _ev(PEER_STARTED, 0, incarnation=1), _ev(PEER_FINISHED, 0, incarnation=1, status="finished")]
    assert chaos.judge_run(clean, {0: good}, peers=1).ok


class _Empty(Section):
    pass


async def _raises(ctx):
    await ctx.sleep(0.5)
    if ctx.peer_id == 1 and ctx.incarnation == 0:
        raise RuntimeError("broken on purpose")
    await ctx.sleep(0.5)


async def _stuck(ctx):
    while True:  # never ends: only the virtual-time bound stops it
        await ctx.sleep(1.0)


@pytest.fixture
def broken_algorithms():
    made = [register(Algorithm(name=name, summary="test", config=_Empty, messages=(), peer=lambda section, exp, f=f: f))
            for name, f in (("chaos_raises", _raises), ("chaos_stuck", _stuck))]
    yield
    for algorithm in made:
        ALGORITHMS.pop(algorithm.name, None)


def test_broken_algorithms_fail_with_a_reproducing_seed(tmp_path, broken_algorithms):
    result, summary = _chaos(tmp_path, "--algorithm", "chaos_raises", "--schedules", "3", "--seed", "40", "--workers", "1")
    assert result.exit_code == 1
    assert summary["ok"] is False and summary["counts"]["exceptions"] >= 1 and summary["counts"]["failed"] >= 1
    entry = summary["failed"][0]
    assert entry["seed"] in (40, 41, 42) and "RuntimeError: broken on purpose" in entry["exceptions"][0]
    assert entry["reproduce"] == f"meshfl chaos --algorithm chaos_raises --schedules 1 --seed {entry['seed']}"
    assert entry["faults"] and f"--seed {entry['seed']}" in result.output
    again, alone = _chaos(tmp_path / "again", *entry["reproduce"].split()[2:], "--workers", "1")
    assert again.exit_code == 1
    assert chaos.without_wall_times(alone["failed"][0]) == chaos.without_wall_times({**entry, "schedule": 0})

    result, summary = _chaos(tmp_path / "stuck", "--algorithm", "chaos_stuck", "--schedules", "2", "--seed", "7",
                             "--workers", "1", "--set", "max_virtual_time_s=20")
    assert result.exit_code == 1 and summary["counts"]["hangs"] == 2 and summary["max_virtual_time_s"] == 20
    assert "max_virtual_time_s=20" in summary["failed"][0]["hang"]
    assert summary["failed"][1]["reproduce"].endswith("--seed 8 --set max_virtual_time_s=20")


def test_bad_options_are_one_line_errors(tmp_path):
    for args, text in ((["--set", "seed=3"], "--set seed"), (["--schedules", "0"], "--schedules"),
                       (["--algorithm", "nope"], "algorithm"), (["--set", "gossip.vote_timeout_s=-1"], "vote_timeout_s")):
        result = runner.invoke(app, ["chaos", "--quiet", *args])
        assert result.exit_code == 2, (args, result.output)
        assert text in result.output and len(result.output.strip().splitlines()) == 1


def test_outcomes_are_deterministic_per_seed_and_independent_of_workers():
    base = chaos.chaos_config("gossip", 4, 2).model_dump(mode="json")
    one = chaos.run_schedules(base, seed=20, schedules=3, workers=1)
    again = chaos.run_schedules(base, seed=20, schedules=3, workers=2)  # spawned processes
    assert chaos.without_wall_times(one) == chaos.without_wall_times(again)
    alone = chaos.run_schedules(base, seed=22, schedules=1, workers=1)
    assert chaos.without_wall_times(alone[0]) == chaos.without_wall_times({**one[2], "schedule": 0})
    assert len({json.dumps(r["faults"]) for r in one}) == 3  # each seed draws its own schedule


def test_restarts_counts_how_restarted_incarnations_came_back():
    from meshfl.experiment.chaos import restarts

    events = [
        {"event": "peer_started", "peer": 1, "incarnation": 1},
        {"event": "metric", "metric": "rejoined", "peer": 1, "incarnation": 1, "value": 3},
        {"event": "peer_finished", "peer": 1, "incarnation": 1, "status": "finished"},
        {"event": "peer_started", "peer": 2, "incarnation": 1},
        {"event": "metric", "metric": "rejoined", "peer": 2, "incarnation": 1, "value": 0},
        {"event": "peer_finished", "peer": 2, "incarnation": 1, "status": "finished"},
        {"event": "peer_started", "peer": 3, "incarnation": 2},
        {"event": "peer_finished", "peer": 3, "incarnation": 2, "status": "finished"},
        {"event": "peer_started", "peer": 4, "incarnation": 0},
    ]
    assert restarts(events) == {"restarts": 3, "rejoined": 1, "rejoined_fresh": 1, "never_rejoined": 1}
    assert restarts(events[6:]) == {"restarts": 1, "rejoined": 0, "rejoined_fresh": 0, "never_rejoined": 0}
