"""The simulator's supervisor and inbox: nothing is lost or misdelivered around timeouts and restarts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from pydantic import Field

from meshfl.algorithms.base import ALGORITHMS, Algorithm, register
from meshfl.config import load_config
from meshfl.core.messages import MESSAGE_NAMES, MESSAGE_TYPES, TYPE_IDS, Message, PeerLiveness
from meshfl.core.section import Section
from meshfl.experiment.run import simulate
from meshfl.runtime.peer import Inbox
from meshfl.runtime.sim.loop import VirtualClock, run_virtual


@dataclass(frozen=True, kw_only=True)
class Ping(Message):
    n: int


class PingConfig(Section):
    wait_s: float = Field(6.0, gt=0, description="how long peer 1 listens")


async def ping_peer(ctx) -> None:
    """Peer 0 sends one Ping at t=0; every incarnation of peer 1 logs what it hears."""
    if ctx.peer_id == 0:
        ctx.send(1, Ping(sender=0, n=7))
        await ctx.sleep(8.0)
        return
    if ctx.peer_id == 1:
        deadline = ctx.now() + 6.0
        while ctx.now() < deadline:
            message = await ctx.recv(deadline - ctx.now(), types=(Ping,))
            if message is not None:
                ctx.log("heard", message.n)


@pytest.fixture
def ping_algorithm():
    algorithm = register(Algorithm(name="test_ping", summary="test", config=PingConfig, messages=(Ping,),
                                   peer=lambda section, experiment: ping_peer))
    yield algorithm
    ALGORITHMS.pop("test_ping", None)
    MESSAGE_TYPES.pop(TYPE_IDS.pop(Ping), None)
    MESSAGE_NAMES.pop(Ping, None)


def test_a_message_put_in_the_instant_a_receive_times_out_is_not_lost():
    clock = VirtualClock(100.0, lambda: "")
    got: list = []

    async def main() -> None:
        inbox = Inbox(10)
        message = PeerLiveness(sender=0, peer=1, alive=False)
        asyncio.get_running_loop().call_at(1.0, inbox.put, message)
        received = await inbox.get(1.0, None)
        got.append(received if received is not None else inbox.take(None))

    run_virtual(main, clock)
    assert got and got[0] is not None  # received, or at least still queued: never dropped on the floor


def test_messages_in_flight_to_a_crashed_incarnation_are_lost_not_handed_to_the_next(ping_algorithm):
    # the Ping leaves at t=0 and lands at t=2; peer 1 crashes at t=1 and is back at t=1.5
    faults = "faults=[{kind: crash, peers: [1], at_s: 1.0}, {kind: restart, peers: [1], at_s: 1.5}]"
    config = load_config(None, ["peers=2", "data.dataset=digits", "algorithm=test_ping", "network.latency_s=2.0",
                                faults])
    _, metrics, _ = simulate(config)
    heard = [e for e in metrics.events if e.get("metric") == "heard"]
    assert heard == []
    started = [e["incarnation"] for e in metrics.events if e["event"] == "peer_started" and e["peer"] == 1]
    assert started == [0, 1]


def test_without_the_crash_the_same_message_arrives(ping_algorithm):
    config = load_config(None, ["peers=2", "data.dataset=digits", "algorithm=test_ping", "network.latency_s=2.0"])
    _, metrics, _ = simulate(config)
    heard = [(e["value"], e["virtual_time"]) for e in metrics.events if e.get("metric") == "heard"]
    assert len(heard) == 1 and heard[0][0] == 7 and heard[0][1] == pytest.approx(2.0, abs=0.01)
