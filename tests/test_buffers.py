"""`train.buffers`: batch-norm running statistics averaged with the parameters, or kept by each peer (FedBN)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import meshfl
from meshfl.api import resolve_config
from meshfl.config import ExperimentConfig
from meshfl.core.params import Layout, Params, ParamsSlice
from meshfl.experiment.run import run_experiment
from meshfl.runtime.peer import BUFFERS_ENTRY

TESTS = Path(__file__).parent
BN = "user_models_for_tests:bn_net"
STATS = ("features.1.running_mean", "features.1.running_var")
SMALL = {"peers": 4, "rounds": 2, "data": {"partition": "dirichlet", "dirichlet_alpha": 0.5},
         "train": {"local_steps": 6, "model": BN, "model_options": {"width": 4}}}


@pytest.fixture(autouse=True)
def _user_code_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def _config(buffers: str, *overrides: str) -> ExperimentConfig:
    return resolve_config(SMALL, overrides=[f"train.buffers={buffers}", *overrides])


def _wire_layouts(config: ExperimentConfig) -> tuple[object, set[tuple[str, ...]]]:
    """Run `config` in the simulator; the layouts of every model that went on the (simulated) wire."""
    layouts: set[tuple[str, ...]] = set()

    def watch(sim) -> None:
        send = sim.network.send

        def recording(now, source, target, message, size):
            for value in vars(message).values():
                for item in value if isinstance(value, tuple) else (value,):
                    if isinstance(item, (Params, ParamsSlice)):
                        layouts.add(item.layout.names)
            return send(now, source, target, message, size)

        sim.network.send = recording
        watch.sim = sim

    result = run_experiment(config, None, report=False, on_simulation=watch)
    return result, layouts, watch.sim


def test_local_buffers_stay_with_each_peer_and_never_travel():
    result, layouts, sim = _wire_layouts(_config("local"))
    assert layouts, "no model went on the wire"
    for names in layouts:  # parameters only
        assert not any("running" in n for n in names), names
    final = result.sim.final_params
    assert sorted(final) == [0, 1, 2, 3]
    for params in final.values():  # a saved peer model is its parameters plus its own statistics
        assert params.layout.names[-2:] == STATS
    means = [final[p].tensor(STATS[0]) for p in range(4)]
    assert not torch.equal(means[0], means[1]) and not torch.equal(means[2], means[3])
    parameters = [final[p].flat[: -sum(final[p].tensor(n).numel() for n in STATS)] for p in range(4)]
    assert all(torch.equal(parameters[0], other) for other in parameters[1:])  # gossip agreed on the parameters
    started = next(e for e in result.metrics.events if e["event"] == "run_started")
    assert started["layout"] == sim.worlds.learner.layout.fingerprint
    assert sim.worlds.learner.layout.numel + sim.worlds.learner.buffer_layout.numel == final[0].layout.numel
    stored, _ = sim.slots[2].store.get_params(BUFFERS_ENTRY, sim.worlds.learner.buffer_layout)
    assert torch.equal(stored.tensor(STATS[1]), final[2].tensor(STATS[1]))
    accuracy = result.summary["final_global_accuracy"]
    assert len(set(accuracy.values())) > 1, accuracy  # each peer evaluates with its own statistics


def test_averaged_buffers_travel_and_every_peer_ends_with_the_same_statistics():
    result, layouts, sim = _wire_layouts(_config("average"))
    assert any(names[-2:] == STATS for names in layouts)
    final = result.sim.final_params
    assert all(final[0].equal(final[p]) for p in range(1, 4))
    assert sim.worlds.learner.layout == sim.worlds.learner.module_layout
    assert BUFFERS_ENTRY not in sim.slots[0].store


def test_local_buffers_are_deterministic_and_survive_a_restart():
    faults = "faults=[{kind: crash, peers: [1], at_round: 1}, {kind: restart, peers: [1], at_round: 2}]"
    first, _, sim = _wire_layouts(_config("local", "rounds=3", faults))
    second, _, _ = _wire_layouts(_config("local", "rounds=3", faults))
    assert first.summary["incarnations"]["1"] == 2 and first.summary["dead_peers"] == []
    for peer, params in first.sim.final_params.items():
        assert params.equal(second.sim.final_params[peer])
    assert BUFFERS_ENTRY in sim.slots[1].store


def test_a_model_without_buffers_is_unchanged_by_local_and_still_batches():
    plain = {"peers": 3, "rounds": 1, "train": {"local_steps": 3}, "compute": {"batching": "on"}}
    a = meshfl.run(plain, out=False, progress=False)
    b = meshfl.run({**plain, "train": {"local_steps": 3, "buffers": "local"}}, out=False, progress=False)
    for peer, params in a.final_models.items():
        assert params.equal(b.final_models[peer])


def test_the_learner_joins_and_splits_a_peers_buffers():
    from meshfl.learn.learner import TorchLearner

    learner = TorchLearner(_config("local").train, (1, 8, 8), 10)
    params, buffers = learner.init_params(3), learner.init_buffers(3)
    assert learner.local_buffers and learner.buffer_layout.names == STATS
    assert params.layout == Layout.of_module(learner.module) and torch.all(buffers.tensor(STATS[1]) == 1)
    whole = learner.with_buffers(params, buffers)
    back, kept = learner.split(whole)
    assert back.equal(params) and kept.equal(buffers)
    with pytest.raises(ValueError, match="join the peer's buffers first"):
        learner.evaluate(params, learner_data())


def learner_data():
    from meshfl.data import load_dataset

    train, _ = load_dataset(_config("local").data, 0)
    return train


def test_local_buffers_over_grpc_stay_in_each_peers_store_and_model(tmp_path):
    from meshfl.core.store import DirectoryStore
    from meshfl.learn.learner import TorchLearner

    config = _config("local", "peers=3")
    result = meshfl.launch(config, out=tmp_path / "grpc", progress=False, report=False, timeout_s=240)
    assert result.summary["dead_peers"] == [] and sorted(result.final_models) == [0, 1, 2]
    learner = TorchLearner(config.train, (1, 8, 8), 10)
    started = [e for e in result.events if e["event"] == "peer_started"]
    assert {e["layout"] for e in started} == {learner.layout.fingerprint}  # what the door admits: parameters only
    final = result.final_models
    assert final[0].layout == learner.module_layout and not torch.equal(final[0].tensor(STATS[0]), final[1].tensor(STATS[0]))
    for peer in range(3):
        store = DirectoryStore(tmp_path / "grpc" / "peers" / f"peer-{peer}" / "store")
        stored, _ = store.get_params(BUFFERS_ENTRY, learner.buffer_layout)
        assert torch.equal(stored.tensor(STATS[1]), final[peer].tensor(STATS[1]))
