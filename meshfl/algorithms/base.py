"""What an algorithm declares about itself, and the registry that collects the declarations.

An algorithm module builds one `Algorithm` and passes it to `register`. From that the
experiment config gains a section named after the algorithm (shown by `meshfl config` and
`--help`), its messages get wire types (so the encoder, the door and the simulator's byte
counts know them), and `algorithm: <name>` in a config runs its peer coroutine. Nothing
outside the module names the algorithm.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshfl.core.context import NodeContext
from meshfl.core.messages import Message, register_message
from meshfl.core.section import Section

if TYPE_CHECKING:
    from meshfl.config import ExperimentConfig

PeerMain = Callable[[NodeContext], Awaitable[None]]


@dataclass(frozen=True)
class Algorithm:
    """An algorithm's declaration.

    Attributes
    ----------
    name : str
        The algorithm's name: `algorithm: <name>` in a config, and the name of its config section.
    summary : str
        One line describing the algorithm.
    config : type[Section]
        The config section class.
    messages : tuple[type[Message], ...]
        The message classes it sends (registered as `<name>.<Class>`).
    peer : callable
        `peer(section, experiment)` returns the coroutine function one peer runs; the runtime
        calls it afresh for every incarnation (a restart starts the coroutine again, and the
        algorithm recovers from `ctx.store` and `ctx.incarnation`).
    check : callable, optional
        `check(section, experiment)` raises ValueError naming its fields when the section does
        not fit the experiment.
    quick : tuple[str, ...]
        Overrides that make a chaos run fast.
    worst_case_s : callable, optional
        `worst_case_s(section, experiment)` bounds a run's virtual time.
    timeline : tuple[str, ...]
        Metrics whose events are moments worth listing in the summary and the report
        (e.g. `coordinating`: who coordinates from which round), not series to plot.
    """

    name: str
    summary: str
    config: type[Section]
    messages: tuple[type[Message], ...]
    peer: Callable[[Any, ExperimentConfig], PeerMain]
    check: Callable[[Any, ExperimentConfig], None] | None = None
    quick: tuple[str, ...] = ()
    worst_case_s: Callable[[Any, ExperimentConfig], float] | None = None
    timeline: tuple[str, ...] = ()


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Make `algorithm` known to config, wire, door and report; its messages are named `<name>.<Class>`.

    Parameters
    ----------
    algorithm : Algorithm
        The declaration; registering the same object again is a no-op.

    Returns
    -------
    Algorithm
        `algorithm` itself, so a module can write `ALGORITHM = register(Algorithm(...))`.

    Raises
    ------
    ValueError
        If the name is not an identifier, or another algorithm already has it.
    """
    if not algorithm.name.isidentifier():
        raise ValueError(f"algorithm name {algorithm.name!r} must be an identifier (it names a config section)")
    known = ALGORITHMS.get(algorithm.name)
    if known is not None and known is not algorithm:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    for cls in algorithm.messages:
        register_message(cls, f"{algorithm.name}.{cls.__name__}")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm called `name`.

    Parameters
    ----------
    name : str
        The algorithm's name, as in `algorithm: <name>` of a config.

    Returns
    -------
    Algorithm
        Its declaration.

    Raises
    ------
    ValueError
        If no algorithm of that name is registered (the message lists those that are).
    """
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algorithm must be one of {', '.join(sorted(ALGORITHMS))}, got {name!r}") from None
