"""Byzantine peers as a fault kind: each behaviour changes exactly what it should, in both runtimes."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from meshfl.config import load_config
from meshfl.core.params import Params
from meshfl.core.seeds import batch_generator
from meshfl.core.store import MemoryStore
from meshfl.data import Dataset
from meshfl.experiment.run import simulate, summarise
from meshfl.faults import Byzantine, FaultAction, parse_faults, resolve_faults
from meshfl.runtime.grpc.faults import TransportFaults, write_fired
from meshfl.runtime.peer import PeerContext, build_worlds

DIGITS = ["data.dataset=digits", "train.local_epochs=1", "peers=4"]


class Ctx(PeerContext):
    """A PeerContext whose compute runs at once and whose Byzantine behaviour the test sets."""

    def __init__(self, config, worlds, behaviour: Byzantine | None, incarnation: int = 0) -> None:
        super().__init__(config, 1, incarnation, (0, 2), worlds, MemoryStore(), 100)
        self.behaviour = behaviour
        self.computed = 0

    def byzantine(self):
        return self.behaviour

    async def _compute(self, fn, *args, cost=None):
        self.computed += 1
        return fn(*args)


@pytest.fixture(scope="module")
def world():
    config = load_config(None, DIGITS)
    return config, build_worlds(config)


def given(world) -> Params:
    config, worlds = world
    return worlds.learner.init_params(123)


def train(world, behaviour: Byzantine | None, incarnation: int = 0):
    config, worlds = world
    ctx = Ctx(config, worlds, behaviour, incarnation)
    return ctx, asyncio.run(ctx.train(given(world)))


def test_validation_names_the_field():
    cases = [
        ([{"kind": "byzantine", "peers": [1], "at_s": 0}], "faults.0.behaviour: required for kind=byzantine"),
        ([{"kind": "byzantine", "behaviour": "lie", "peers": [1], "at_s": 0}], "faults.0.behaviour: must be one of"),
        ([{"kind": "byzantine", "behaviour": "noise", "scale": 3, "peers": [1], "at_s": 0}],
         "faults.0.scale: only for kind=byzantine with behaviour sign_flip, scale"),
        ([{"kind": "crash", "peers": [1], "at_s": 0}, {"kind": "crash", "behaviour": "noise", "peers": [1], "at_s": 0}],
         "faults.1.behaviour: only for kind=byzantine, not kind=crash"),
        ([{"kind": "byzantine", "behaviour": "noise", "at_s": 0}], "faults.0.peers: kind=byzantine needs peers"),
        ([{"kind": "byzantine", "behaviour": "inflate_weight", "weight": 0, "peers": [1], "at_s": 0}],
         "faults.0.weight: Input should be greater than 0"),
    ]
    for raw, message in cases:
        with pytest.raises(ValueError) as info:
            parse_faults(raw)
        assert str(info.value).startswith(message), str(info.value)


def test_resolution_fills_defaults_and_pairs_on_off():
    events = parse_faults([
        {"kind": "byzantine", "behaviour": "sign_flip", "count": 2, "exclude": [0], "at_s": 0},
        {"kind": "byzantine", "behaviour": "scale", "peers": [3], "at_round": 2, "until_round": 5},
        {"kind": "byzantine", "behaviour": "noise", "sigma": 0.5, "peers": [1], "at_s": 1},
        {"kind": "byzantine", "behaviour": "inflate_weight", "peers": [1], "at_s": 1},
    ])
    actions = resolve_faults(events, peers=6, seed=3)
    kinds = [(a.kind, a.index) for a in actions]
    assert kinds == [("byzantine_on", 0), ("byzantine_on", 2), ("byzantine_on", 3), ("byzantine_on", 1),
                     ("byzantine_off", 1)]
    assert actions[0].byzantine == Byzantine("sign_flip", scale=10.0) and 0 not in actions[0].peers
    assert len(actions[0].peers) == 2
    assert actions[3].byzantine == Byzantine("scale", scale=100.0) and actions[4].is_end
    assert actions[1].byzantine == Byzantine("noise", sigma=0.5)
    assert actions[2].byzantine == Byzantine("inflate_weight", weight=1e9)


def test_sign_flip_and_scale_return_the_scaled_honest_update(world):
    start = given(world)
    _, honest = train(world, None)
    update = honest.params.flat - start.flat
    _, flipped = train(world, Byzantine.of("sign_flip"))
    assert torch.equal(flipped.params.flat, start.flat - 10.0 * update)
    _, scaled = train(world, Byzantine.of("scale", scale=7.0))
    assert torch.equal(scaled.params.flat, start.flat + 7.0 * update)
    assert flipped.samples == honest.samples and flipped.loss == honest.loss


def test_noise_and_random_draw_from_their_own_seeded_stream(world):
    _, honest = train(world, None)
    honest_ctx = Ctx(world[0], world[1], None)
    ctx, noisy = train(world, Byzantine.of("noise", sigma=2.0))
    noise = noisy.params.flat - honest.params.flat
    assert abs(float(noise.std()) - 2.0) < 0.05 and abs(float(noise.mean())) < 0.05
    _, again = train(world, Byzantine.of("noise", sigma=2.0))
    assert torch.equal(again.params.flat, noisy.params.flat)  # (seed, peer, incarnation) decide it
    _, other = train(world, Byzantine.of("noise", sigma=2.0), incarnation=1)
    assert not torch.equal(other.params.flat - honest.params.flat, noise)
    assert ctx.rng.random() == honest_ctx.rng.random()  # the algorithm's stream is untouched
    _, random = train(world, Byzantine.of("random", sigma=0.5))
    assert abs(float(random.params.flat.std()) - 0.5) < 0.02
    assert float(torch.corrcoef(torch.stack([random.params.flat, honest.params.flat]))[0, 1]) < 0.05


def test_inflate_weight_lies_about_samples_only(world):
    honest_ctx, honest = train(world, None)
    ctx, lied = train(world, Byzantine.of("inflate_weight"))
    assert ctx.num_samples == 1_000_000_000 and honest_ctx.num_samples == len(world[1].peer_data[1].train)
    assert torch.equal(lied.params.flat, honest.params.flat)
    ctx.behaviour = None
    assert ctx.num_samples == honest_ctx.num_samples  # the fault ended


def test_label_flip_trains_on_flipped_labels_of_its_own_data(world):
    config, worlds = world
    data = worlds.peer_data[1].train
    flipped = Dataset(data.x, data.num_classes - 1 - data.y, data.num_classes, data.name)
    steps = worlds.learner.steps_for(len(data), epochs=1)
    expected = worlds.learner.train(given(world), flipped, batch_generator(config.seed, 1), steps)
    _, result = train(world, Byzantine.of("label_flip"))
    assert torch.equal(result.params.flat, expected.params.flat)
    _, honest = train(world, None)
    assert not torch.equal(result.params.flat, honest.params.flat)


def test_free_ride_returns_the_model_untrained_at_no_compute(world):
    start = given(world)
    ctx, result = train(world, Byzantine.of("free_ride"))
    _, honest = train(world, None)
    assert torch.equal(result.params.flat, start.flat) and ctx.computed == 0
    assert result.samples == honest.samples and result.steps == honest.steps  # it claims the honest work


def _sim(faults: str, *extra: str):
    config = load_config(None, [*DIGITS, "peers=6", "rounds=4", "gossip.train_set_size=6", f"faults={faults}", *extra])
    result, metrics, _ = simulate(config)
    return result, metrics, summarise(config, result, metrics, 0.0)


def test_sim_noise_run_is_bit_identical_and_logs_the_fault():
    faults = "[{kind: byzantine, behaviour: noise, sigma: 0.3, peers: [2], at_round: 1, until_round: 3}]"
    first, metrics, summary = _sim(faults)
    second, _, _ = _sim(faults)
    assert first.final_params.keys() == second.final_params.keys()
    for peer, params in first.final_params.items():
        assert torch.equal(params.flat, second.final_params[peer].flat)
    fired = [(e["kind"], e["peers"], e.get("behaviour")) for e in metrics.events if e["event"] == "fault"]
    assert fired == [("byzantine_on", [2], "noise"), ("byzantine_off", [2], "noise")]
    assert summary["byzantine_peers"] == [2]


def test_one_sign_flip_peer_ruins_plain_fedavg_gossip():
    _, _, clean = _sim("[]")
    _, _, attacked = _sim("[{kind: byzantine, behaviour: sign_flip, peers: [2], at_s: 0}]")
    assert clean["byzantine_peers"] == [] and attacked["byzantine_peers"] == [2]
    assert clean["honest_mean_final_accuracy"] > 0.5
    assert attacked["honest_mean_final_accuracy"] < clean["honest_mean_final_accuracy"] - 0.3, (clean, attacked)
    assert "2" in attacked["final_global_accuracy"]  # the liar is reported, only left out of the honest mean


def test_grpc_peer_switches_its_behaviour_when_the_launcher_fires_it(tmp_path):
    config = load_config(None, [*DIGITS, "faults=[{kind: crash, peers: [0], at_s: 0}, "
                                "{kind: byzantine, behaviour: scale, peers: [1], at_s: 1, until_s: 2}]"])
    numbers = {a.kind: i for i, a in enumerate(resolve_faults(list(config.faults), config.peers, config.seed))}
    mine, other = TransportFaults(config, 1, tmp_path / "p1"), TransportFaults(config, 2, tmp_path / "p2")
    for folder in (tmp_path / "p1", tmp_path / "p2"):
        folder.mkdir()
        write_fired(folder, [numbers["crash"], numbers["byzantine_on"]])
    mine.refresh()
    other.refresh()
    assert mine.byzantine == Byzantine("scale", scale=100.0) and other.byzantine is None
    write_fired(tmp_path / "p1", [numbers["crash"], numbers["byzantine_on"], numbers["byzantine_off"]])
    mine.refresh()
    assert mine.byzantine is None
    assert json.loads((tmp_path / "p1" / "faults.json").read_text())["fired"][-1] == numbers["byzantine_off"]
    assert isinstance(mine.actions[numbers["byzantine_on"]], FaultAction)


# ---- gossip's robust mode: individual models, aggregated at every peer -------------------------

def test_robust_rules_need_individual_exchange_and_krum_enough_models():
    from meshfl.config import ConfigError

    with pytest.raises(ConfigError, match="gossip.aggregation.rule: median needs the individual models"):
        load_config(None, ["gossip.aggregation.rule=median"])
    with pytest.raises(ConfigError, match=r"gossip.aggregation.byzantine: krum with f=2 needs more than 6"):
        load_config(None, ["peers=6", "gossip.exchange=individual", "gossip.aggregation.rule=krum",
                           "gossip.aggregation.byzantine=2"])
    load_config(None, ["peers=7", "gossip.train_set_size=7", "gossip.exchange=individual", "gossip.aggregation.rule=krum",
                       "gossip.aggregation.byzantine=2"])


def test_individual_exchange_gives_every_peer_the_same_model_close_to_partial_fedavg():
    partial, _, _ = _sim("[]")
    individual, metrics, summary = _sim("[]", "gossip.exchange=individual")
    models = [p.flat for p in individual.final_params.values()]
    assert len(models) == 6 and all(torch.equal(m, models[0]) for m in models)
    assert torch.allclose(models[0], partial.final_params[0].flat, atol=1e-5)
    assert summary["messages_by_type"].get("Contribution", 0) > 0
    assert "PartialModel" not in summary["messages_by_type"]
    diffused = [e for e in metrics.events if e.get("event") == "metric" and e.get("metric") == "missed_models"]
    assert diffused == []


def test_individual_median_holds_where_fedavg_falls_to_one_sign_flip():
    liar = "[{kind: byzantine, behaviour: sign_flip, peers: [2], at_s: 0}]"
    _, _, fedavg = _sim(liar, "gossip.exchange=individual", "rounds=5", "train.local_epochs=3")
    _, _, median = _sim(liar, "gossip.exchange=individual", "gossip.aggregation.rule=median", "rounds=5",
                        "train.local_epochs=3")
    assert fedavg["honest_mean_final_accuracy"] < 0.2  # chance: 0.1
    assert median["honest_mean_final_accuracy"] > 0.75, median  # clean: 0.85


def test_krum_falls_back_to_the_median_when_crashes_leave_too_few_models():
    _, metrics, summary = _sim("[{kind: crash, peers: [4, 5], at_round: 2}]", "gossip.exchange=individual",
                               "gossip.aggregation.rule=krum", "liveness.timeout_s=1")
    fallbacks = [e for e in metrics.events if e.get("metric") == "aggregation_fallback"]
    assert fallbacks and {e["value"] for e in fallbacks} == {4}  # 4 live models <= 2f + 2
    assert summary["dead_peers"] == [4, 5] and all(summary["peer_status"][str(p)] == "finished" for p in range(4))


def test_inflated_weight_is_capped_by_max_weight():
    liar = "[{kind: byzantine, behaviour: inflate_weight, peers: [2], at_s: 0}]"
    clean, _, _ = _sim("[]", "gossip.exchange=individual")
    capped, _, _ = _sim(liar, "gossip.exchange=individual", "gossip.aggregation.max_weight=500")
    inflated, _, _ = _sim(liar, "gossip.exchange=individual")
    honest = [p for p in range(6) if p != 2]
    # every digits peer holds < 500 samples, so the cap leaves the honest weights and bounds the liar's to 500
    distance = lambda run: float((run.final_params[0].flat - clean.final_params[0].flat).norm())  # noqa: E731
    assert distance(capped) < distance(inflated)
    assert all(torch.equal(capped.final_params[p].flat, capped.final_params[0].flat) for p in honest)
