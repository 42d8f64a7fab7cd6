"""An asyncio event loop whose clock is virtual.

asyncio asks its selector to wait `timeout` seconds for I/O when nothing is ready. Here
the selector instead advances the virtual clock by `timeout` and returns at once, so time
jumps to the next timer only when every task is blocked (the scheduler, not the clock,
decides). Before it moves, the clock's `at_rest` hook runs the work every blocked task waits for
at this instant (the simulator's queued training and evaluation); if there was any, the loop
runs again at the same instant. No timer pending while tasks still wait is a deadlock: it raises, naming the
waiting peers. Passing the hard end time raises the same way. Ties between timers due at
the same instant are broken by asyncio's heap in insertion order, which is deterministic
because everything runs on one thread.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable


class SimulationStalled(RuntimeError):
    """Every peer waits and nothing can wake them (deadlock), or the hard end time passed."""


class _VirtualSelector(selectors.DefaultSelector):
    """Registers file objects like a real selector but never sleeps: it moves the clock."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list:
        ready = super().select(0)  # only asyncio's self-pipe can be registered; poll it
        if ready or timeout == 0:
            return ready
        if self._clock.at_rest():  # work of this instant was done: its waiters run before time moves
            return []
        if timeout is None:
            raise SimulationStalled(f"deadlock at t={self._clock.now:.3f}s: every peer is waiting and no timer is pending: "
                                    f"{self._clock.describe_waiters()}")
        self._clock.advance(timeout)
        return []


class VirtualClock:
    """Virtual seconds since the run started, with a hard end."""

    def __init__(self, end_time: float, describe_waiters: Callable[[], str],
                 at_rest: Callable[[], bool] = lambda: False) -> None:
        self.now = 0.0
        self.end_time = end_time
        self.describe_waiters = describe_waiters
        self.at_rest = at_rest
        """Called when every task is blocked, before the clock moves; True: it did work, run the loop again."""

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        if target > self.end_time:
            raise SimulationStalled(f"virtual time would pass max_virtual_time_s={self.end_time:g} "
                                    f"(next timer at t={target:.3f}s): {self.describe_waiters()}")
        self.now = target


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        super().__init__(selector=_VirtualSelector(clock))
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self.clock.now


def run_virtual(main: Callable[[], asyncio.Future | object], clock: VirtualClock):
    """Run coroutine function `main` to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop(clock)
    task = loop.create_task(main())
    try:
        return loop.run_until_complete(task)
    finally:
        _cancel_pending(loop)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: it propagates from here, asyncio need not log it again
        loop.close()


def _cancel_pending(loop: VirtualTimeLoop) -> None:
    """Cancel every task still running and let each finish, so none is destroyed pending.

    An interrupt (Ctrl-C) may end a task with KeyboardInterrupt while we wait; it is already
    propagating from the caller, so here it is only collected.
    """
    loop.clock.end_time = float("inf")  # let cancellation run to completion
    for _ in range(3):
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if not pending:
            break
        for task in pending:
            task.cancel()
        try:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        except BaseException:  # noqa: BLE001 - see docstring
            pass
        for task in pending:
            if task.done() and not task.cancelled():
                task.exception()
