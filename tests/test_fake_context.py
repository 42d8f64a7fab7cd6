"""FakeContext itself: it is the whole NodeContext, and its clock and inbox behave as documented."""

import asyncio
import time

import pytest

from meshfl.core.context import NodeContext
from meshfl.core.messages import Heartbeat, PeerLiveness, Reply, Request
from meshfl.testing import FakeContext, FakeStalled


def test_implements_every_member_of_node_context():
    members = {n for n in vars(NodeContext) if not n.startswith("_")} | set(NodeContext.__annotations__)
    ctx = FakeContext()
    assert [m for m in sorted(members) if not hasattr(ctx, m)] == []


def test_recv_jumps_the_clock_filters_by_type_and_keeps_later_messages():
    ctx = FakeContext(0, peers=3)
    ctx.deliver(Heartbeat(sender=1), at=5.0)
    ctx.kill(2, at=2.0)

    async def main():
        assert await ctx.recv(1.0) is None and ctx.now() == 1.0  # nothing due within 1 s
        notice = await ctx.recv(10.0, types=(PeerLiveness,))
        assert notice == PeerLiveness(sender=0, peer=2, alive=False) and ctx.now() == 2.0
        assert not ctx.is_alive(2) and ctx.alive == {0, 1}
        assert await ctx.recv(2.0) is None and ctx.now() == 4.0  # the heartbeat at 5 stays queued
        assert await ctx.recv(1.0) == Heartbeat(sender=1) and ctx.now() == 5.0  # due exactly at the timeout
        with pytest.raises(FakeStalled):
            await ctx.recv()

    started = time.perf_counter()
    asyncio.run(main())
    assert time.perf_counter() - started < 1.0  # no real waiting


def test_request_reply_and_send_are_scripted_and_recorded():
    ctx = FakeContext(0, peers=3, reply_delay_s=0.5)
    ctx.replies[(1, Request)] = Reply(sender=1)
    ctx.replies[(2, Request)] = lambda request: None

    async def main():
        assert await ctx.request(1, Request(sender=0), timeout=2.0) == Reply(sender=1, in_reply_to=1)
        assert await ctx.request(2, Request(sender=0), timeout=2.0) is None

    asyncio.run(main())
    assert ctx.now() == 2.5 and ctx.sent == [(1, Request(sender=0, request_id=1)), (2, Request(sender=0, request_id=2))]
    ctx.reply(Request(sender=2, request_id=9), Reply(sender=0))
    assert ctx.sent[-1] == (2, Reply(sender=0, in_reply_to=9))
    with pytest.raises(ValueError):
        ctx.send(0, Heartbeat(sender=0))


def test_train_evaluate_log_and_seeded_rng():
    ctx = FakeContext(0, train_delta=0.5, train_time_s=3.0)
    result = asyncio.run(ctx.train(ctx.initial_params()))
    assert result.params.flat.tolist() == [0.5] * 6 and ctx.now() == 3.0 and result.samples == 100
    assert asyncio.run(ctx.evaluate(result.params))["global_accuracy"] == 0.5
    ctx.log("x", 1.0, round=2)
    ctx.log("y", 3.0, round=2, about=4)
    assert ctx.logged == [("x", 1.0, 2, None), ("y", 3.0, 2, 4)] and ctx.logs("x") == [(1.0, 2)]
    assert FakeContext(0, seed=3).rng.integers(1 << 30) == FakeContext(0, seed=3).rng.integers(1 << 30)
