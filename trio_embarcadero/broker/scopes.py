"""A cancel scope that others can reach while it is entered."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import trio


class TrackedScope:
    """A :class:`trio.CancelScope` that calls ``on_enter(scope)`` once it is
    entered and ``on_exit(scope)`` just before it exits, so whoever may
    cancel it can find it meanwhile.

    A plain context manager, not a generator: connection tasks enter one for
    every wait of an idle connection, and a generator-based one costs several
    times as much.
    """

    __slots__ = ("_on_enter", "_on_exit", "_scope")

    def __init__(
        self,
        on_enter: Callable[[trio.CancelScope], object],
        on_exit: Callable[[trio.CancelScope], object],
    ) -> None:
        self._on_enter = on_enter
        self._on_exit = on_exit
        self._scope = trio.CancelScope()

    def __enter__(self) -> trio.CancelScope:
        scope = self._scope.__enter__()
        self._on_enter(scope)
        return scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._on_exit(self._scope)
        return self._scope.__exit__(exc_type, exc, tb)
