"""mpls: layer-wise pulls stacked by Eq. 1, every mode learns, a pull never sees a half-updated model,
refused replies, crashes and restarts, determinism, and the report's layers-pulled heat map."""

from collections import Counter

import pytest
import torch

from meshfl.algorithms.mpls import Layers, MplsConfig, MplsPeer, model_layers, slice_ranges
from meshfl.config import load_config
from meshfl.core.metrics import without_wall_clock
from meshfl.core.params import Layout, Params, ParamsSlice
from meshfl.experiment.report import matrix_metrics
from meshfl.experiment.run import simulate, summarise

SMALL = ["algorithm=mpls", "data.dataset=digits", "train.learning_rate=0.5", "train.local_steps=10"]


def metric(metrics, name: str) -> list[dict]:
    return [e for e in metrics.events if e.get("event") == "metric" and e.get("metric") == name]


def final_accuracy(metrics) -> dict[int, float]:
    last: dict[int, tuple[int, float]] = {}
    for e in metric(metrics, "global_accuracy"):
        if e["peer"] not in last or e["round"] >= last[e["peer"]][0]:
            last[e["peer"]] = (e["round"], e["value"])
    return {p: v for p, (_, v) in last.items()}


def test_layers_group_a_modules_tensors_and_eq1_averages_each_layer_over_its_copies():
    layout = Layout(("a.weight", "a.bias", "b.weight", "b.bias"), ((2, 2), (2,), (3,), (1,)))
    layers = model_layers(layout)
    assert layers == [("a", ((0, 6),)), ("b", ((6, 10),))]
    assert slice_ranges(layers, (1,)) == ((6, 10),) and slice_ranges(layers, (0, 1)) == ((0, 10),)
    peer = MplsPeer(MplsConfig(), 1)
    peer.layers = layers
    trained = Params(torch.zeros(10), layout)
    from_1 = ParamsSlice.of(Params(torch.full((10,), 3.0), layout), ((0, 6),))  # layer a
    from_2 = ParamsSlice.of(Params(torch.full((10,), 6.0), layout), ((0, 10),))  # both layers
    mixed = peer.aggregate(trained, {1: from_1, 2: from_2})
    assert torch.equal(mixed.flat[:6], torch.full((6,), 3.0))  # (0 + 3 + 6) / 3
    assert torch.equal(mixed.flat[6:], torch.full((4,), 3.0))  # (0 + 6) / 2
    assert peer.aggregate(trained, {}) is trained


@pytest.mark.parametrize("mode", ["mpls", "peer", "layer", "rand", "appg", "netmax"])
def test_every_mode_learns_digits_on_a_ring_and_pulls_what_it_should(mode):
    config = load_config(None, SMALL + ["peers=5", "rounds=20", "topology.kind=ring", f"mpls.mode={mode}"])
    result, metrics, _ = simulate(config)
    summary = summarise(config, result, metrics, 0.0)
    assert all(summary["peer_status"][str(p)] == "finished" for p in range(5))
    final = final_accuracy(metrics)
    assert sorted(final) == list(range(5)) and min(final.values()) > 0.6, final  # chance 0.1
    pulled = [e["value"] for e in metric(metrics, "bytes_pulled")]
    assert len(pulled) == 5 * 20 and all(v > 0 for v in pulled)
    layers = matrix_metrics(metrics.events)["layers_pulled"]
    assert {p for p, _ in layers} == set(range(5))
    assert all(abs(p - q) in (1, 4) for p, q in layers)  # only ring neighbours
    if mode in ("appg", "netmax"):  # whole models: both neighbours' (appg) or one (netmax), every iteration
        assert len(set(pulled)) == 1


def test_mpls_pulls_fewer_bytes_than_appg_on_a_full_graph():
    def bytes_pulled(mode):
        config = load_config(None, SMALL + ["peers=6", "rounds=4", "topology.kind=full", f"mpls.mode={mode}"])
        _, metrics, _ = simulate(config)
        return sum(e["value"] for e in metric(metrics, "bytes_pulled"))

    mpls, appg, netmax = bytes_pulled("mpls"), bytes_pulled("appg"), bytes_pulled("netmax")
    assert appg == 5 * netmax  # five whole models against one, every iteration
    assert mpls < 0.5 * appg


def test_a_pull_never_reads_a_half_updated_model_while_the_server_trains_slowly(monkeypatch):
    """Worker 0 trains 5x slower than worker 1, which pulls from it throughout; every layer worker 0 served
    equals, bit for bit, the model it had published at the iteration it named (its snapshot)."""
    published: dict[tuple[int, int], torch.Tensor] = {}
    served: list[tuple[int, int, ParamsSlice]] = []
    original_aggregate, original_answer = MplsPeer.aggregate, MplsPeer.answer

    def aggregate(self, trained, pulled):
        mixed = original_aggregate(self, trained, pulled)
        published[(id(self), self.iteration + 1)] = mixed.flat.clone()
        return mixed

    def answer(self, ctx, message):
        replies = []
        real_reply = ctx.reply
        ctx.reply = lambda request, reply: (replies.append(reply), real_reply(request, reply))
        try:
            original_answer(self, ctx, message)
        finally:
            del ctx.reply
        for reply in replies:
            if isinstance(reply, Layers):
                served.append((id(self), reply.iteration, reply.slice))

    monkeypatch.setattr(MplsPeer, "aggregate", aggregate)
    monkeypatch.setattr(MplsPeer, "answer", answer)
    config = load_config(None, SMALL + ["peers=2", "rounds=20", "topology.kind=full", "train.local_steps=20",
                                        "compute.seconds_per_sample=0.001",
                                        "compute.tiers=[{peers: [0], speed: 0.2}]"])
    _, metrics, _ = simulate(config)
    slow = Counter(owner for owner, _, _ in served).most_common(1)[0][0]  # worker 0, pulled from all the time
    assert len(served) >= 20 and len({i for o, i, _ in served if o == slow}) >= 3
    for owner, iteration, piece in served:
        if iteration == 0:
            continue  # the initial model, the same at every peer
        expected = published[(owner, iteration)]
        got = torch.cat([expected[a:b] for a, b in piece.ranges])
        assert torch.equal(piece.values, got)
    slow_iterations = [e["round"] for e in metric(metrics, "train_loss") if e["peer"] == 0]
    assert slow_iterations == list(range(1, 21))


def test_replies_that_do_not_fit_are_refused_not_averaged():
    layout = Layout(("a.weight", "b.weight"), ((4,), (4,)))
    peer = MplsPeer(MplsConfig(), 3)
    peer.layers = model_layers(layout)
    peer.model = Params(torch.zeros(8), layout)

    class Ctx:
        peer_id = 0
        label_counts = (5, 5)

        def now(self):
            return 0.0

    ctx = Ctx()
    good = ParamsSlice.of(Params(torch.ones(8), layout), ((4, 8),))
    nan = ParamsSlice.of(Params(torch.full((8,), float("nan")), layout), ((4, 8),))
    wrong_layers = ParamsSlice.of(Params(torch.ones(8), layout), ((0, 4),))
    other_layout = Layout(("a.weight", "b.weight"), ((3,), (5,)))
    foreign = ParamsSlice.of(Params(torch.ones(8), other_layout), ((3, 8),))
    checks = []
    for piece, scores in ((good, (1.0, 1.0)), (nan, (1.0, 1.0)), (wrong_layers, (1.0, 1.0)), (foreign, (1.0, 1.0)),
                          (good, (1.0,)), (good, (1.0, float("inf"))), (good, (1.0, -1.0))):
        checks.append(peer._reply_fits(ctx, (1,), Layers(sender=1, iteration=1, slice=piece, scores=scores)))
    assert checks == [True, False, False, False, False, False, False]


def test_a_crashed_worker_stops_nobody_and_a_restarted_one_resumes_from_its_checkpoint():
    config = load_config(None, SMALL + ["peers=5", "rounds=20", "topology.kind=ring",
                                        "faults=[{kind: crash, peers: [2], at_round: 3}, "
                                        "{kind: restart, peers: [2], at_round: 6}]"])
    result, metrics, _ = simulate(config)
    summary = summarise(config, result, metrics, 0.0)
    assert summary["dead_peers"] == [] and summary["incarnations"]["2"] == 2
    assert all(summary["peer_status"][str(p)] == "finished" for p in range(5))
    resumed = [e["value"] for e in metric(metrics, "resumed") if e["peer"] == 2]
    assert len(resumed) == 1 and resumed[0] >= 2
    second_life = [e["round"] for e in metric(metrics, "train_loss") if e["peer"] == 2 and e.get("incarnation") == 1]
    assert second_life == list(range(int(resumed[0]) + 1, 21))
    assert min(final_accuracy(metrics).values()) > 0.5


def test_same_seed_same_run():
    overrides = SMALL + ["peers=4", "rounds=4", "topology.kind=ring", "network.loss=0.05"]
    first = simulate(load_config(None, overrides))[1]
    second = simulate(load_config(None, overrides))[1]
    assert without_wall_clock(first.events) == without_wall_clock(second.events)


def test_link_speed_is_measured_from_pulls_and_steers_mpls_to_the_fast_link():
    """Peer 0's link to 1 is 50x faster than to 2: MPLS pulls most layers over it (tau1 = 1: speed only)."""
    config = load_config(None, SMALL + ["peers=3", "rounds=8", "topology.kind=full", "mpls.tau1=1", "mpls.tau2=0",
                                        "network.bandwidth_mbps=50",
                                        "network.links=[{peers: [0, 2], bandwidth_mbps: 1}]"])
    _, metrics, _ = simulate(config)
    layers = matrix_metrics(metrics.events)["layers_pulled"]
    assert layers[(0, 1)] > 2 * layers.get((0, 2), 0.0), layers


def test_mpls_config_refuses_taus_that_do_not_sum_to_one():
    with pytest.raises(ValueError, match="tau1 \\+ mpls.tau2 must be 1"):
        load_config(None, ["algorithm=mpls", "mpls.tau1=0.7", "mpls.tau2=0.7"])


def test_the_report_draws_the_layers_pulled_heat_map(tmp_path):
    from meshfl.experiment.run import run_experiment

    config = load_config(None, SMALL + ["peers=4", "rounds=3", "topology.kind=ring"])
    run_experiment(config, tmp_path / "run")
    assert (tmp_path / "run" / "layers_pulled_matrix.png").is_file()
    assert "layers_pulled: peer about peer" in (tmp_path / "run" / "report.html").read_text()


def test_a_restarted_worker_whose_store_was_wiped_starts_from_a_neighbours_model():
    config = load_config(None, SMALL + ["peers=4", "rounds=20", "topology.kind=ring", "mpls.eval_every=1",
                                        "faults=[{kind: crash, peers: [1], at_round: 10, wipe: true}, "
                                        "{kind: restart, peers: [1], at_round: 12}]"])
    result, metrics, _ = simulate(config)
    summary = summarise(config, result, metrics, 0.0)
    assert summary["dead_peers"] == [] and summary["incarnations"]["1"] == 2
    assert [e["value"] for e in metric(metrics, "resumed") if e["peer"] == 1] == [0]  # no checkpoint left
    adopted = [e["value"] for e in metric(metrics, "adopted_from") if e["peer"] == 1]
    assert len(adopted) == 1 and adopted[0] in (0, 2)  # a ring neighbour
    first_after = [e["value"] for e in metric(metrics, "global_accuracy") if e["peer"] == 1 and e.get("incarnation") == 1][0]
    assert first_after > 0.4  # a neighbour's trained model, not the initial one (chance 0.1)


def test_a_slow_link_fault_shows_in_the_measured_link_speed_and_moves_pulls_away():
    base = SMALL + ["peers=3", "rounds=8", "topology.kind=full", "mpls.tau1=1", "mpls.tau2=0", "network.bandwidth_mbps=20"]
    plain = matrix_metrics(simulate(load_config(None, base))[1].events)
    slowed = matrix_metrics(simulate(load_config(None, [*base, "faults=[{kind: slow_link, links: [[0, 1]], "
                                                                 "bandwidth_mbps: 0.5, at_s: 0}]"]))[1].events)
    assert slowed["link_mbps"][(0, 1)] < 0.2 * plain["link_mbps"][(0, 1)]  # measured from the pulls themselves
    assert slowed["layers_pulled"].get((0, 1), 0.0) < plain["layers_pulled"].get((0, 1), 0.0)
