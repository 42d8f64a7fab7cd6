import asyncio
import time

import pytest

from meshfl.runtime.sim.loop import SimulationStalled, VirtualClock, run_virtual


def clock(end=1e9, waiters="peer 3 (recv)"):
    return VirtualClock(end, lambda: waiters)


def test_time_jumps_instead_of_sleeping():
    c = clock()
    seen = []

    async def main():
        loop = asyncio.get_running_loop()
        await asyncio.sleep(3600)
        seen.append(loop.time())
        await asyncio.gather(asyncio.sleep(5), asyncio.sleep(2))
        seen.append(loop.time())

    started = time.perf_counter()
    run_virtual(main, c)
    assert seen == [3600.0, 3605.0]
    assert time.perf_counter() - started < 5  # an hour of virtual time did not pass for real


def test_timeouts_fire_at_virtual_deadlines_in_order():
    order = []

    async def waiter(name, delay):
        await asyncio.sleep(delay)
        order.append((name, asyncio.get_running_loop().time()))

    async def main():
        await asyncio.gather(waiter("b", 2.0), waiter("a", 1.0), waiter("c", 2.0))
        try:
            async with asyncio.timeout(10):
                await asyncio.Event().wait()
        except TimeoutError:
            order.append(("timeout", asyncio.get_running_loop().time()))

    run_virtual(main, clock())
    assert order == [("a", 1.0), ("b", 2.0), ("c", 2.0), ("timeout", 12.0)]


def test_deadlock_raises_naming_the_waiting_peers():
    async def main():
        await asyncio.Event().wait()

    with pytest.raises(SimulationStalled, match=r"deadlock.*peer 3 \(recv\)"):
        run_virtual(main, clock())


def test_hard_end_time_raises_naming_the_waiting_peers():
    async def main():
        await asyncio.sleep(50)

    with pytest.raises(SimulationStalled, match=r"max_virtual_time_s=10.*peer 3"):
        run_virtual(main, clock(end=10))
