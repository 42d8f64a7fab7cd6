"""moshpit: d rounds of group averaging give every peer the exact global mean (simulator and gRPC), the butterfly
sends 2(M-1)/M model sizes per round, failures shrink groups without stopping anyone, restarted peers rejoin,
hostile parts are refused, and the same seed gives the same run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meshfl.algorithms.moshpit import Begin, MoshpitConfig, MoshpitPeer, Part, Reduced
from meshfl.config import load_config
from meshfl.core.metrics import without_wall_clock
from meshfl.core.params import Layout, Params, ParamsSlice
from meshfl.experiment.run import simulate, summarise
from meshfl.learn.saved import MODELS_DIR, model_paths, read_model

EXACT = ["algorithm=moshpit", "data.dataset=digits", "rounds=1", "moshpit.weighting=uniform", "compute.batching=off",
         "train.local_steps=3"]


def metric(metrics, name: str) -> list[dict]:
    return [e for e in metrics.events if e.get("event") == "metric" and e.get("metric") == name]


def trained_and_averaged(overrides: list[str]) -> tuple[torch.Tensor, dict[int, Params], object]:
    """The mean of every peer's trained model (a run without averaging) and each peer's model after averaging."""
    trained, _, _ = simulate(load_config(None, [*overrides, "moshpit.averaging_rounds=0"]))
    averaged, metrics, _ = simulate(load_config(None, overrides))
    mean = torch.stack([p.flat.double() for p in trained.final_params.values()]).mean(0)
    return mean, averaged.final_params, metrics


def relative_errors(mean: torch.Tensor, models: dict[int, Params]) -> list[float]:
    return [float((p.flat.double() - mean).norm() / mean.norm()) for p in models.values()]


@pytest.mark.parametrize(("peers", "group_size"), [(16, 4), (8, 2)])
def test_d_rounds_on_a_perfect_grid_give_every_peer_the_global_mean(peers, group_size):
    """16 = 4^2 and 8 = 2^3 here; benchmarks/moshpit_scale.py measures 64 = 4^3, 125 = 5^3 and 256 = 4^4."""
    mean, models, metrics = trained_and_averaged([*EXACT, f"peers={peers}", f"moshpit.group_size={group_size}"])
    assert len(models) == peers
    assert max(relative_errors(mean, models)) <= 1e-6  # measured 2.5e-8 (16), 2.6e-8 (64), 2.3e-8 (125, M=5)
    assert {e["value"] for e in metric(metrics, "group_size")} == {group_size}
    d = {16: 2, 8: 3}[peers]
    per_round = [e["value"] / d for e in metric(metrics, "model_sizes_sent")]
    ideal = 2 * (group_size - 1) / group_size  # butterfly: 1.5 model sizes per round for M = 4 (parts differ by one entry)
    assert len(per_round) == peers and all(abs(v - ideal) < 1e-3 for v in per_round), per_round


def test_a_grid_that_is_not_a_perfect_power_still_reaches_the_mean_with_a_few_more_rounds():
    mean, models, _ = trained_and_averaged([*EXACT, "peers=20", "moshpit.averaging_rounds=4"])
    assert max(relative_errors(mean, models)) <= 1e-2  # measured 1.4e-3 (20 peers, M = 4, balanced grid of 4 x 4 x 2 cells)


def test_peers_that_fail_mid_averaging_shrink_groups_and_the_others_finish():
    """2 of 20 peers (10%) crash inside the averaging phase; the 18 others finish every iteration."""
    overrides = ["algorithm=moshpit", "data.dataset=digits", "peers=20", "rounds=3", "train.local_steps=2",
                 "moshpit.averaging_rounds=4", "faults=[{kind: crash, peers: [3, 11], at_s: 0.5}]"]
    config = load_config(None, overrides)
    result, metrics, _ = simulate(config)
    summary = summarise(config, result, metrics, 0.0)
    assert summary["dead_peers"] == [3, 11]
    assert all(summary["peer_status"][str(p)] == "finished" for p in range(20) if p not in (3, 11))
    assert all(summary["final_round"][str(p)] == 3 for p in range(20) if p not in (3, 11))
    sizes = [e["value"] for e in metric(metrics, "group_size")]
    assert min(sizes) < max(sizes)  # some groups lost a member
    finals = [m.flat for p, m in result.final_params.items() if p not in (3, 11)]
    spread = max(float((f - finals[0]).norm() / finals[0].norm()) for f in finals)
    assert spread < 0.05, spread  # the survivors still (nearly) agree after d + 2 rounds


def test_learns_digits_and_the_same_seed_gives_the_same_run():
    overrides = ["algorithm=moshpit", "data.dataset=digits", "peers=16", "rounds=6", "train.local_steps=8",
                 "train.learning_rate=0.5", "moshpit.eval_every=3"]
    config = load_config(None, overrides)
    result, first, _ = simulate(config)
    summary = summarise(config, result, first, 0.0)
    assert summary["min_final_accuracy"] > 0.8, summary["final_global_accuracy"]  # measured 0.955 at 10 iterations
    second = simulate(load_config(None, overrides))[1]
    assert without_wall_clock(first.events) == without_wall_clock(second.events)


def test_a_restarted_peer_rejoins_the_iteration_the_others_are_in():
    overrides = ["algorithm=moshpit", "data.dataset=digits", "peers=8", "moshpit.group_size=2", "rounds=10",
                 "train.local_steps=2", "faults=[{kind: crash, peers: [5], at_round: 2}, {kind: restart, peers: [5], at_round: 6}]"]
    config = load_config(None, overrides)
    result, metrics, _ = simulate(config)
    summary = summarise(config, result, metrics, 0.0)
    assert summary["dead_peers"] == [] and summary["incarnations"]["5"] == 2
    assert all(summary["peer_status"][str(p)] == "finished" for p in range(8))
    rejoined = [e["value"] for e in metric(metrics, "rejoined") if e["peer"] == 5]
    resumed = [e["value"] for e in metric(metrics, "resumed") if e["peer"] == 5]
    assert len(rejoined) == 1 and rejoined[0] >= resumed[0] + 3  # the network's iteration, well past its checkpoint
    second_life = sorted({e["round"] for e in metric(metrics, "group_size") if e["peer"] == 5 and e.get("incarnation") == 1})
    assert second_life and second_life[0] == rejoined[0]  # it matched from the network's iteration, not its checkpoint's


def test_parts_and_reduced_parts_that_do_not_fit_are_refused():
    layout = Layout(("a.weight",), ((6,),))
    peer = MoshpitPeer(MoshpitConfig(), load_config(None, ["algorithm=moshpit", "data.dataset=digits"]))
    peer.model = Params(torch.zeros(6), layout)
    group = "moshpit/1/0/[0]"
    peer.live_groups.add(group)
    good = ParamsSlice.of(Params(torch.ones(6), layout), ((0, 3),))
    nan = ParamsSlice.of(Params(torch.full((6,), float("nan")), layout), ((0, 3),))
    foreign = ParamsSlice.of(Params(torch.ones(7), Layout(("a.weight",), ((7,),))), ((0, 3),))

    class Ctx:
        peer_id = 0

    for part in (Part(sender=2, group=group, index=0, weight=1.0, values=nan),
                 Part(sender=2, group=group, index=0, weight=1.0, values=foreign),
                 Part(sender=2, group=group, index=0, weight=-1.0, values=good),
                 Part(sender=2, group="moshpit/9/0/[0]", index=0, weight=1.0, values=good),
                 Part(sender=2, group=group, index=99, weight=1.0, values=good)):
        peer.handle(Ctx(), part)
    assert peer.parts.get((group, 0), {}) == {} and peer.refused == 5
    peer.handle(Ctx(), Part(sender=2, group=group, index=0, weight=1.0, values=good))
    peer.handle(Ctx(), Part(sender=2, group=group, index=0, weight=5.0, values=good))  # a second from the same sender
    assert list(peer.parts[(group, 0)]) == [2] and peer.parts[(group, 0)][2].weight == 1.0
    peer.handle(Ctx(), Reduced(sender=3, group=group, index=1, contributors=2, values=nan))
    assert (group, 1) not in peer.reduced
    assert Begin(sender=1, group=group, members=(0, 1)).members == (0, 1)


def test_real_peers_over_grpc_reach_the_exact_mean_without_a_coordinator(tmp_path):
    """4 `meshfl node` processes on 127.0.0.1 (M = 2, d = 2), no coordinator process: after d rounds each holds
    the mean of the trained models (the simulator trains the same models bit for bit: same data, seeds and
    learner). 16 peers (M = 4) over gRPC: benchmarks/moshpit_scale.py --grpc (2.5e-8)."""
    overrides = [*EXACT, "peers=4", "moshpit.group_size=2"]
    trained, _, _ = simulate(load_config(None, [*overrides, "moshpit.averaging_rounds=0"]))
    mean = torch.stack([p.flat.double() for p in trained.final_params.values()]).mean(0)
    args = [arg for item in [*overrides, "grpc.base_port=51700", "liveness.heartbeat_interval_s=0.5"] for arg in ("--set", item)]
    done = subprocess.run([sys.executable, "-m", "meshfl.cli", "launch", "--local", "--quiet", "--timeout", "150",
                           "--out", str(tmp_path / "run"), *args], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dead_peers"] == [] and set(summary["peer_status"].values()) == {"finished"}
    models = {p: read_model(model_paths(Path(tmp_path / "run" / MODELS_DIR), p)[0])[0] for p in range(4)}
    assert max(relative_errors(mean, models)) <= 1e-6


def test_differential_privacy_logs_a_growing_epsilon_and_every_peer_agrees_on_the_model_and_clip_norm():
    overrides = ["algorithm=moshpit", "data.dataset=digits", "peers=8", "moshpit.group_size=2", "rounds=3",
                 "train.local_steps=4", "moshpit.dp.enabled=true", "moshpit.dp.noise_multiplier=0.5"]
    config = load_config(None, overrides)
    result, metrics, _ = simulate(config)
    epsilons = {}
    for e in metric(metrics, "epsilon"):
        epsilons.setdefault(e["round"], set()).add(e["value"])
    assert sorted(epsilons) == [1, 2, 3] and all(len(v) == 1 for v in epsilons.values())  # one accountant, same answer
    values = [next(iter(epsilons[t])) for t in (1, 2, 3)]
    assert 0 < values[0] < values[1] < values[2]
    clip = {}
    for e in metric(metrics, "clip_norm"):
        clip.setdefault(e["round"], set()).add(round(e["value"], 12))
    assert all(len(v) == 1 for v in clip.values())  # the noisy count is shared, so C moves the same everywhere
    finals = list(result.final_params.values())
    assert all(torch.allclose(f.flat, finals[0].flat, atol=1e-6) for f in finals)
    assert all(f.finite for f in finals)


def test_differential_privacy_refuses_a_noise_multiplier_the_count_noise_cannot_afford():
    with pytest.raises(ValueError, match="moshpit.dp.noise_multiplier: must be below participants / 10 = 0.8"):
        load_config(None, ["algorithm=moshpit", "peers=8", "moshpit.dp.enabled=true", "moshpit.dp.noise_multiplier=1.0"])


def test_killing_two_real_peers_mid_run_does_not_stop_the_others(tmp_path):
    """8 peer processes (M = 2, d = 3); peers 2 and 5 are SIGKILLed once peer 0 has evaluated iteration 2: the six
    others finish every iteration (their groups shrink, their waits end at the detector's notice) and still learn."""
    import os
    import signal
    import threading
    import time

    from meshfl.experiment.launch import launch_local

    config = load_config(None, ["algorithm=moshpit", "data.dataset=digits", "peers=8", "moshpit.group_size=2", "rounds=8",
                                "train.local_steps=8", "train.learning_rate=0.5", "moshpit.eval_every=2",
                                "liveness.heartbeat_interval_s=0.5", "liveness.timeout_s=2", "grpc.base_port=51750"])
    killed: list[int] = []

    def kill_two(processes):
        def evaluated(peer: int, iteration: int) -> bool:
            path = processes[peer].folder / "metrics.jsonl"
            for line in path.read_text().splitlines() if path.exists() else []:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("metric") == "global_accuracy" and event.get("round") == iteration:
                    return True
            return False

        def watch() -> None:
            deadline = time.monotonic() + 100
            while time.monotonic() < deadline and not evaluated(0, 2):
                time.sleep(0.02)
            for peer in (2, 5):
                os.kill(processes[peer].process.pid, signal.SIGKILL)
                killed.append(peer)

        threading.Thread(target=watch, daemon=True).start()

    launch_local(config, tmp_path / "run", timeout_s=150, on_started=kill_two)
    assert killed == [2, 5]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dead_peers"] == [2, 5]
    survivors = [str(p) for p in range(8) if p not in (2, 5)]
    assert all(summary["peer_status"][p] == "finished" and summary["final_round"][p] == 8 for p in survivors)
    assert min(summary["final_global_accuracy"][p] for p in survivors) > 0.7  # measured 0.744 (no kills: 0.797; chance 0.1)
