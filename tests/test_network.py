import numpy as np
import pytest
from pydantic import ValidationError

from meshfl.config import ComputeConfig, ConfigError, ExperimentConfig, NetworkConfig, load_config
from meshfl.faults import parse_faults, resolve_faults
from meshfl.runtime.grpc.faults import TransportFaults
from meshfl.runtime.sim.compute import peer_speeds
from meshfl.runtime.sim.network import SimNetwork, pair_bandwidth_mbps

MB = 1_000_000  # bytes; 1 MB at 8 Mbps takes 1 s


class Msg:
    pass


class Votes:
    pass


def network(n=4, seed=0, **config):
    deliveries = []
    net = SimNetwork(NetworkConfig.model_validate(config), n, seed,
                     lambda at, target, message: deliveries.append((at, target, message)))
    return net, deliveries


def test_a_link_serialises_its_messages_then_latency():
    net, out = network(bandwidth_mbps=8, latency_s=0.5)
    net.send(0.0, 0, 1, "a", MB)
    net.send(0.0, 0, 1, "a2", MB)  # same link: waits for the first
    net.send(0.0, 0, 2, "b", MB)  # same sender, other link: no access link of its own, so in parallel
    net.send(0.2, 1, 2, "c", MB // 2)
    net.send(5.0, 0, 1, "d", MB)  # link idle again by then
    assert out == [(1.5, 1, "a"), (2.5, 1, "a2"), (1.5, 2, "b"), (0.2 + 0.5 + 0.5, 2, "c"), (6.5, 1, "d")]


def test_a_peers_own_uplink_serialises_all_its_messages():
    net, out = network(bandwidth_mbps=80, latency_s=0.5, peers={0: {"uplink_mbps": 8}})
    net.send(0.0, 0, 1, "a", MB)
    net.send(0.0, 0, 2, "b", MB)  # same sender, other target: waits for the shared uplink
    net.send(0.0, 1, 2, "c", MB)  # another peer: only its 80 Mbps link
    assert out == [(1.5, 1, "a"), (2.5, 2, "b"), (0.1 + 0.5, 2, "c")]


def test_bandwidth_is_min_of_uplink_downlink_and_pair_latency_is_max_or_pair():
    net, out = network(4, bandwidth_mbps=80, latency_s=0.01,
                       peers={0: {"uplink_mbps": 16, "latency_s": 0.1}, 1: {"downlink_mbps": 8}, 3: {"latency_s": 0.3}},
                       links=[{"peers": [2, 3], "bandwidth_mbps": 4, "latency_s": 0.05, "loss": 0.0}])
    assert net.bandwidth_mbps(0, 1) == pytest.approx(8)  # receiver's downlink
    assert net.bandwidth_mbps(0, 2) == pytest.approx(16)  # sender's uplink
    assert net.bandwidth_mbps(1, 0) == pytest.approx(80)
    assert net.latency(0, 2) == pytest.approx(0.1) and net.latency(2, 0) == pytest.approx(0.1)  # max of the ends
    assert net.latency(1, 2) == pytest.approx(0.01)
    assert net.latency(0, 3) == pytest.approx(0.3)
    assert net.latency(2, 3) == net.latency(3, 2) == pytest.approx(0.05)  # pair override, both directions
    assert net.bandwidth_mbps(3, 2) == pytest.approx(4)
    net.send(0.0, 0, 1, "a", MB)  # 1 s at 8 Mbps + 0.1 s
    net.send(10.0, 2, 3, "b", MB)  # 2 s at 4 Mbps + 0.05 s
    net.send(10.0, 1, 2, "c", MB)  # 0.1 s at 80 Mbps + 0.01 s
    assert [(round(at, 9), t) for at, t, _ in out] == [(1.1, 1), (12.05, 3), (10.11, 2)]


def test_every_pair_can_talk_and_traffic_is_counted_by_type():
    net, out = network(3)
    net.send(0.0, 0, 2, Msg(), 100)
    net.send(0.0, 2, 1, Votes(), 40)
    net.send(0.0, 2, 0, Votes(), 60)
    assert len(out) == 3
    t = net.traffic
    assert t.messages_sent == [1, 0, 2] and t.bytes_sent == [100, 0, 100] and t.messages_dropped == [0, 0, 0]
    assert t.messages_by_type == {"Msg": 1, "Votes": 2} and t.bytes_by_type == {"Msg": 100, "Votes": 100}
    with pytest.raises(ValueError, match="peer 3 does not exist"):
        net.send(0.0, 0, 3, Msg(), 1)


def drop_rate(net, pairs, n=20_000):
    before = sum(net.traffic.messages_dropped)
    for i in range(n):
        s, t = pairs[i % len(pairs)]
        net.send(float(i), s, t, "m", 10)
    return (sum(net.traffic.messages_dropped) - before) / n


def test_loss_rates_match_configuration_and_combine():
    net, _ = network(3, loss=0.1, links=[{"peers": [0, 1], "loss": 0.2}])
    assert net.loss(0, 1) == pytest.approx(1 - 0.9 * 0.8)
    assert net.loss(1, 2) == pytest.approx(0.1)
    # binomial sd at n=20000 and p~0.28: 0.003; 5 sd margin
    assert drop_rate(net, [(0, 1), (1, 0)]) == pytest.approx(0.28, abs=0.016)
    assert drop_rate(net, [(1, 2)]) == pytest.approx(0.1, abs=0.011)
    net.add_loss("f", 0.5, links=[(1, 2)])
    assert net.loss(2, 1) == pytest.approx(1 - 0.9 * 0.5)
    assert drop_rate(net, [(2, 1)]) == pytest.approx(0.55, abs=0.018)
    assert net.traffic.dropped_by_reason["loss"] == sum(net.traffic.messages_dropped)


def test_loss_draws_are_deterministic_per_seed():
    def pattern(seed):
        net, out = network(seed=seed, loss=0.3)
        for i in range(200):
            net.send(float(i), 0, 1, i, 10)
        return [m for _, _, m in out]

    assert pattern(1) == pattern(1)
    assert pattern(1) != pattern(2)


def test_no_loss_draws_without_loss():
    net, out = network(loss=0.0)
    state = net._rng.bit_generator.state
    for i in range(10):
        net.send(float(i), 0, 1, i, 10)
    assert len(out) == 10 and net._rng.bit_generator.state == state


def test_partition_drops_across_groups_and_heals():
    net, out = network(6)
    net.partition(7, [[0, 1, 2], [3, 4]])  # 5 is alone in the unlisted group
    assert net.reachable(0, 2) and not net.reachable(0, 3) and not net.reachable(4, 5) and net.reachable(5, 5)
    net.send(0.0, 0, 3, "x", 10)
    net.send(0.0, 4, 3, "y", 10)
    net.send(0.0, 5, 0, "z", 10)
    assert [m for _, _, m in out] == ["y"]
    assert net.traffic.messages_dropped == [1, 0, 0, 0, 0, 1] and net.traffic.dropped_by_reason == {"partition": 2}
    assert net.traffic.messages_sent == [1, 0, 0, 0, 1, 1]
    net.heal(7)
    assert net.reachable(0, 3)
    net.send(1.0, 0, 3, "x2", 10)
    assert out[-1][2] == "x2"


def test_stacked_faults_end_independently():
    net, _ = network(4, bandwidth_mbps=100, latency_s=0.01)
    net.add_loss(1, 0.5)  # every link
    net.add_loss(2, 0.5, peers=[0])  # links touching 0
    assert net.loss(0, 1) == pytest.approx(0.75) and net.loss(1, 0) == pytest.approx(0.75)
    assert net.loss(2, 3) == pytest.approx(0.5)
    net.remove_loss(1)
    assert net.loss(0, 1) == pytest.approx(0.5) and net.loss(2, 3) == 0
    net.remove_loss(2)
    assert net.loss(0, 1) == 0

    net.partition("a", [[0, 1]])
    net.partition("b", [[0, 2]])
    assert not net.reachable(0, 1) and not net.reachable(0, 2) and net.reachable(2, 1) is False
    assert net.reachable(3, 1) is False and net.reachable(0, 0)
    net.heal("a")
    assert net.reachable(0, 2) and not net.reachable(0, 1)
    net.heal("b")
    assert net.reachable(0, 1)
    net.partition("c", [[0]])
    net.partition("d", [[1]])
    net.heal()  # every partition
    assert net.reachable(0, 1) and net.reachable(1, 2)

    net.slow_links("s1", [(0, 1)], bandwidth_mbps=1, latency_s=0.2)
    net.slow_links("s2", [0], bandwidth_mbps=10, latency_s=0.5)  # every link touching peer 0
    assert net.bandwidth_mbps(1, 0) == pytest.approx(1) and net.latency(1, 0) == pytest.approx(0.5)
    assert net.bandwidth_mbps(0, 2) == pytest.approx(10) and net.latency(2, 3) == pytest.approx(0.01)
    net.restore_links("s2")
    assert net.bandwidth_mbps(0, 1) == pytest.approx(1) and net.latency(0, 1) == pytest.approx(0.2)
    assert net.bandwidth_mbps(0, 2) == pytest.approx(100) and net.latency(0, 2) == pytest.approx(0.01)
    net.restore_links("s1")
    assert net.bandwidth_mbps(0, 1) == pytest.approx(100) and net.latency(0, 1) == pytest.approx(0.01)
    net.slow_links("all", None, latency_s=1.0)
    assert net.latency(2, 3) == 1.0 and net.bandwidth_mbps(2, 3) == pytest.approx(100)


def test_slow_link_timing_for_a_known_size():
    net, out = network(3, bandwidth_mbps=100, latency_s=0.01)
    net.slow_links(0, [(0, 1)], bandwidth_mbps=1, latency_s=0.2)
    net.send(0.0, 1, 0, "m", 125_000)  # 1 Mbit at 1 Mbps: 1 s, then 0.2 s
    net.send(0.0, 0, 2, "n", 125_000)  # not slowed: 0.01 s, then 0.01 s
    assert out[0][0] == pytest.approx(1.2) and out[1][0] == pytest.approx(0.02)


def test_resolved_fault_actions_apply_to_the_network():
    events = parse_faults([
        {"kind": "loss", "probability": 0.3, "links": [[0, 1]], "at_s": 0, "until_s": 5},
        {"kind": "partition", "groups": [[0, 1]], "at_s": 1, "until_s": 3},
        {"kind": "slow_link", "peers": [2], "bandwidth_mbps": 2, "at_s": 2, "until_s": 4},
        {"kind": "crash", "peers": [1], "at_s": 2},
    ])
    net, _ = network(4)
    actions = resolve_faults(events, 4, seed=0)
    applied = [net.apply(a) for a in actions if a.trigger[1] <= 2]  # up to t=2
    assert applied == [True, True, True, False]
    assert net.loss(1, 0) == pytest.approx(0.3) and not net.reachable(1, 2) and net.bandwidth_mbps(3, 2) == pytest.approx(2)
    for a in actions:
        if a.trigger[1] > 2:
            net.apply(a)
    assert net.loss(1, 0) == 0 and net.reachable(1, 2) and net.bandwidth_mbps(3, 2) == pytest.approx(100)


def test_network_config_validation():
    with pytest.raises(ValidationError, match="not a link between two peers"):
        NetworkConfig.model_validate({"links": [{"peers": [1, 1]}]})
    with pytest.raises(ValidationError, match="listed twice"):
        NetworkConfig.model_validate({"links": [{"peers": [0, 1]}, {"peers": [1, 0]}]})
    with pytest.raises(ValidationError):
        NetworkConfig.model_validate({"peers": {0: {"uplink_mbps": 0}}})
    config = NetworkConfig.model_validate({"peers": {5: {"latency_s": 1}}, "links": [{"peers": [0, 6]}]})
    with pytest.raises(ValueError, match=r"^network.peers: peer 5 does not exist"):
        config.check_peers(4)
    with pytest.raises(ValueError, match=r"network.links.0.peers: peer 6 does not exist"):
        config.check_peers(6)
    config.check_peers(7)
    loaded = load_config(None, ["network.links=[{peers: [0, 1], latency_s: 0.5}]", "network.peers={2: {uplink_mbps: 5}}"])
    assert loaded.network.links[0].latency_s == 0.5 and loaded.network.peers[2].uplink_mbps == 5


def test_default_speeds_are_the_old_draw():
    config = ComputeConfig(speed_min=0.5, speed_max=2.0)
    old = np.random.default_rng([3, 0x7370656564]).uniform(0.5, 2.0, 10)
    assert np.array_equal(peer_speeds(config, 10, 3), old)
    assert np.array_equal(peer_speeds(ExperimentConfig().compute, 8, 0), np.ones(8))


def test_speed_tiers():
    config = ComputeConfig.model_validate({"speed_min": 1, "speed_max": 1, "tiers": [
        {"peers": [0, 1], "speed": 4}, {"fraction": 0.25, "speed": 0.25}, {"count": 3, "speed": 0.5}]})
    speeds = peer_speeds(config, 20, seed=5)
    assert np.array_equal(speeds, peer_speeds(config, 20, seed=5))
    assert speeds[0] == speeds[1] == 4
    assert (speeds == 0.25).sum() == 5 and (speeds == 0.5).sum() == 3 and (speeds == 1).sum() == 10
    draws = {tuple(np.flatnonzero(peer_speeds(config, 20, seed=s) == 0.25)) for s in range(10)}
    assert len(draws) > 5  # drawn from the seed
    assert all(0 not in d and 1 not in d for d in draws)  # never a peer another tier listed
    # the uniform base stays for peers outside every tier
    mixed = ComputeConfig.model_validate({"speed_min": 1, "speed_max": 2, "tiers": [{"count": 1, "speed": 0.1}]})
    base = peer_speeds(ComputeConfig(speed_min=1, speed_max=2), 6, 1)
    got = peer_speeds(mixed, 6, 1)
    assert (got == 0.1).sum() == 1 and np.array_equal(got[got != 0.1], base[got != 0.1])


def test_speed_tier_validation():
    with pytest.raises(ValidationError, match="exactly one of peers, count or fraction"):
        ComputeConfig.model_validate({"tiers": [{"count": 1, "fraction": 0.5, "speed": 2}]})
    with pytest.raises(ValidationError, match="speed"):
        ComputeConfig.model_validate({"tiers": [{"count": 1, "speed": 0}]})
    too_many = ComputeConfig.model_validate({"tiers": [{"count": 3, "speed": 2}, {"peers": [0, 1], "speed": 3}]})
    with pytest.raises(ValueError, match="compute.tiers: the tiers take 5 peers"):
        too_many.check_peers(4)
    with pytest.raises(ValueError, match=r"compute.tiers.0: needs 3 peers but only 2 are free"):
        peer_speeds(too_many, 4, 0)
    with pytest.raises(ValueError, match=r"compute.tiers.0.peers: peer 4 does not exist"):
        ComputeConfig.model_validate({"tiers": [{"peers": [4], "speed": 2}]}).check_peers(4)


# ---------------------------------------------------------------- heterogeneous links and compute tiers


def test_bandwidth_range_draws_each_pair_once_within_range_symmetric_and_from_the_seed():
    net, _ = network(8, seed=4, bandwidth_range_mbps=[5, 25])
    drawn = {(a, b): net.bandwidth_mbps(a, b) for a in range(8) for b in range(8) if a != b}
    assert all(5 <= mbps <= 25 for mbps in drawn.values())
    assert all(drawn[(a, b)] == pytest.approx(drawn[(b, a)]) for a, b in drawn)  # one draw per unordered pair
    assert len({round(mbps, 9) for mbps in drawn.values()}) == 28  # heterogeneous: 8 x 7 / 2 different pairs
    assert drawn[(2, 5)] == pytest.approx(pair_bandwidth_mbps(4, 5, 2, 5, 25))
    again, _ = network(8, seed=4, bandwidth_range_mbps=[5, 25])
    other, _ = network(8, seed=5, bandwidth_range_mbps=[5, 25])
    assert all(again.bandwidth_mbps(a, b) == drawn[(a, b)] for a, b in drawn)
    assert any(other.bandwidth_mbps(a, b) != pytest.approx(drawn[(a, b)]) for a, b in drawn)
    bigger, _ = network(20, seed=4, bandwidth_range_mbps=[5, 25])  # a pair's draw does not depend on the number of peers
    assert bigger.bandwidth_mbps(2, 5) == drawn[(2, 5)]
    fixed, _ = network(3, seed=4, bandwidth_range_mbps=[10, 10])
    assert fixed.bandwidth_mbps(0, 2) == pytest.approx(10)


def test_a_messages_transfer_time_reflects_its_pairs_drawn_bandwidth():
    net, out = network(4, seed=1, bandwidth_range_mbps=[5, 25], latency_s=0.1)
    net.send(0.0, 0, 1, "a", MB)
    net.send(0.0, 3, 2, "b", MB)
    for (at, _target, _m), (s, t) in zip(out, [(0, 1), (3, 2)], strict=True):
        assert at == pytest.approx(MB * 8 / (pair_bandwidth_mbps(1, s, t, 5, 25) * 1e6) + 0.1)
    assert out[0][0] != pytest.approx(out[1][0])


def test_links_override_the_draw_and_uplinks_and_slow_links_still_apply():
    net, out = network(4, seed=1, bandwidth_range_mbps=[5, 25], links=[{"peers": [0, 1], "bandwidth_mbps": 40}],
                       peers={3: {"uplink_mbps": 2}})
    assert net.bandwidth_mbps(1, 0) == pytest.approx(40)  # the pair's own value wins over the draw, both ways
    assert net.bandwidth_mbps(3, 2) == pytest.approx(2) and net.bandwidth_mbps(2, 3) == pytest.approx(pair_bandwidth_mbps(1, 2, 3, 5, 25))
    net.slow_links("slow", [(0, 2)], bandwidth_mbps=1)
    assert net.bandwidth_mbps(2, 0) == pytest.approx(1)
    net.restore_links("slow")
    assert net.bandwidth_mbps(2, 0) == pytest.approx(pair_bandwidth_mbps(1, 0, 2, 5, 25))
    plain, _ = network(4, links=[{"peers": [0, 1], "bandwidth_mbps": 400}])
    assert plain.bandwidth_mbps(0, 1) == pytest.approx(100)  # without a range a link's bandwidth caps bandwidth_mbps, as before


def test_bandwidth_range_validation_names_the_field():
    for bad in ("[25, 5]", "[0, 5]", "[-1, 5]"):
        with pytest.raises(ConfigError, match=r"^network.bandwidth_range_mbps: must be \[low, high\] with 0 < low <= high"):
            load_config(None, [f"network.bandwidth_range_mbps={bad}"])
    assert load_config(None, ["network.bandwidth_range_mbps=[5, 25]"]).network.bandwidth_range_mbps == (5, 25)


def test_grpc_peers_shape_their_sends_with_the_same_draw(tmp_path):
    config = load_config(None, ["peers=5", "network.bandwidth_range_mbps=[5, 25]", "seed=7",
                                "network.links=[{peers: [0, 4], bandwidth_mbps: 50, latency_s: 3}]"])
    shaping = TransportFaults(config, 0, tmp_path)
    sim, _ = network(5, seed=7, **config.network.model_dump())
    assert shaping.active and not shaping.actions
    for target in (1, 2, 3):
        assert shaping.delay(target, MB) == pytest.approx(MB * 8 / (sim.bandwidth_mbps(0, target) * 1e6))  # no latency of its own
    assert shaping.delay(4, MB) == pytest.approx(MB * 8 / 50e6) and not shaping.drops(1)
    unshaped = TransportFaults(load_config(None, ["peers=5", "network.links=[{peers: [0, 4], bandwidth_mbps: 50}]"]), 0, tmp_path)
    assert not unshaped.active and unshaped.delay(4, MB) == 0  # without a range, configured bandwidths stay the simulator's


def test_six_compute_tiers_of_five_give_thirty_peers_the_six_speeds():
    """The edge setting of 30 devices in 6 power modes, 5 per mode, is compute.tiers with count 5 each."""
    modes = [0.2, 0.35, 0.5, 0.65, 0.8, 1.0]
    config = load_config(None, ["peers=30", "compute.tiers=" + str([{"count": 5, "speed": s} for s in modes])])
    speeds = peer_speeds(config.compute, 30, config.seed)
    assert sorted(set(speeds.tolist())) == modes and all((speeds == s).sum() == 5 for s in modes)
    assert not np.array_equal(speeds, peer_speeds(config.compute, 30, config.seed + 1))  # who is in which mode: the seed
