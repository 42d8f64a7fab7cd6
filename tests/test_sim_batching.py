"""The simulator's batched training and evaluation (compute.batching) against one-by-one."""

from __future__ import annotations

import pytest
import torch

from meshfl.config import ConfigError, load_config
from meshfl.experiment.run import simulate
from meshfl.learn.batched import batching_refusal
from meshfl.runtime.sim.runtime import Simulation

SMALL = ["peers=6", "rounds=3", "gossip.train_set_size=6"]


def run(*overrides: str):
    config = load_config(None, [*SMALL, *overrides])
    sims: list[Simulation] = []
    result, metrics, _ = simulate(config, on_simulation=sims.append)
    return result, metrics, sims[0]


def accuracies(metrics) -> dict[tuple[int, int], float]:
    return {(e["peer"], e["round"]): e["value"] for e in metrics.events if e.get("metric") == "global_accuracy"}


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[p].flat - b[p].flat).abs().max() / b[p].flat.abs().max()) for p in b)


# measured bounds (largest parameter difference / largest parameter, 3 rounds): mlp + sgd 3e-7 (the
# linear layers round exactly as unbatched; the rest is the aggregation of slightly different inputs),
# cnn + adam 1.1e-5 (vmap's grouped convolution rounds differently and Adam divides by sqrt(v))
@pytest.mark.parametrize(("extra", "bound"), [((), 2e-6),
                                              (("train.model=cnn", "train.optimizer=adam", "train.local_epochs=1"), 1e-4)])
def test_batched_run_agrees_with_one_by_one(extra, bound):
    batched, batched_metrics, sim = run("compute.batching=on", *extra)
    alone, alone_metrics, sim_alone = run("compute.batching=off", *extra)
    assert sim.compute.batched and sim.compute.batched_jobs >= 6  # peers really trained together
    assert not sim_alone.compute.batched and sim_alone.compute.batched_jobs == 0
    # the same requests at the same virtual instants: the same events, in the same order
    assert [(e["event"], e.get("peer"), e.get("metric"), e.get("round")) for e in batched_metrics.events] == \
           [(e["event"], e.get("peer"), e.get("metric"), e.get("round")) for e in alone_metrics.events]
    assert relative_difference(batched.final_params, alone.final_params) < bound
    a, b = accuracies(batched_metrics), accuracies(alone_metrics)
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) <= 1e-4
    assert batched.virtual_time_s == alone.virtual_time_s


@pytest.mark.parametrize("mode", ["on", "off"])
def test_runs_are_bit_identical_in_both_modes(mode):
    first, first_metrics, _ = run(f"compute.batching={mode}")
    second, second_metrics, _ = run(f"compute.batching={mode}")
    assert first.final_params.keys() == second.final_params.keys()
    for p in first.final_params:
        assert torch.equal(first.final_params[p].flat, second.final_params[p].flat)
    strip = [{k: v for k, v in e.items() if not k.startswith("wall")} for e in first_metrics.events]
    assert strip == [{k: v for k, v in e.items() if not k.startswith("wall")} for e in second_metrics.events]


def test_a_peer_crashing_while_its_training_is_queued_is_skipped():
    # peer 2 crashes at the instant round 2 starts: its queued request must not answer a dead incarnation
    result, metrics, sim = run("compute.batching=on", "faults=[{kind: crash, peers: [2], at_round: 2}, {kind: restart, peers: [2], at_s: 2.5}]")
    finished = {e["peer"] for e in metrics.events if e["event"] == "peer_finished"}
    assert finished == set(range(6))
    assert sim.compute.batched_jobs > 0 and len(sim.compute) == 0


def test_models_that_cannot_batch_train_one_by_one_or_are_refused():
    assert batching_refusal(load_config(None, []).train) is None
    assert "train.fedprox_mu" in batching_refusal(load_config(None, ["train.fedprox_mu=0.1"]).train)
    _, _, sim = run("train.fedprox_mu=0.1", "rounds=1")  # auto: one by one
    assert not sim.compute.batched and sim.compute.refusal is not None
    with pytest.raises(ValueError, match="compute.batching=on.*train.fedprox_mu"):
        run("train.fedprox_mu=0.1", "compute.batching=on")


def test_batching_values_from_yaml_and_bad_ones():
    assert load_config(None, ["compute.batching=off"]).compute.batching == "off"  # YAML reads off as false
    assert load_config(None, ["compute.batching=on"]).compute.batching == "on"
    with pytest.raises(ConfigError, match="compute.batching"):
        load_config(None, ["compute.batching=sometimes"])
    with pytest.raises(ConfigError, match="train.device"):
        load_config(None, ["train.device=tpu"])
    assert load_config(None, ["train.device=auto"]).train.device == "auto"


def test_batched_evaluation_matches_the_learner():
    from meshfl.config import TrainConfig
    from meshfl.data import Dataset
    from meshfl.learn.batched import BatchedTrainer
    from meshfl.learn.learner import TorchLearner

    config = TrainConfig(model="mlp")
    learner, trainer = TorchLearner(config, (1, 8, 8), 10), BatchedTrainer(config, (1, 8, 8), 10)
    g = torch.Generator().manual_seed(1)
    models = [learner.init_params(seed) for seed in range(5)]
    shared = Dataset(torch.rand(5000, 1, 8, 8, generator=g), torch.randint(0, 10, (5000,), generator=g), 10, "test")
    for got, model in zip(trainer.evaluate_many(models, shared), models, strict=True):  # two slices of 4,096
        want = learner.evaluate(model, shared)
        assert got.accuracy == want.accuracy and got.samples == 5000
        assert abs(got.loss - want.loss) < 1e-5
    own = [shared.subset(torch.arange(n).numpy()) for n in (7, 0, 130, 1, 64)]
    for got, model, data in zip(trainer.evaluate_each(list(zip(models, own, strict=True))), models, own, strict=True):
        want = learner.evaluate(model, data)
        assert got.samples == len(data)
        if len(data):
            assert got.accuracy == want.accuracy and abs(got.loss - want.loss) < 1e-5
        else:
            assert got.accuracy != got.accuracy  # NaN, as the learner gives for an empty split


def test_auto_batches_evaluation_only_on_a_gpu():
    _, _, auto = run("rounds=1")
    assert auto.compute.batched and auto.compute.batch_evaluations == (auto.compute.trainer.device.type != "cpu")
    _, _, on = run("rounds=1", "compute.batching=on")
    assert on.compute.batch_evaluations
