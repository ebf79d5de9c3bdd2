"""A cancel scope that others can reach while it is entered."""

from __future__ import annotations

import math
from types import TracebackType
from typing import Protocol

import trio


class ScopeTracker(Protocol):
    """Who may cancel a :class:`TrackedScope` while it is entered."""

    def scope_entered(self, scope: trio.CancelScope) -> None:
        """``scope`` was entered (cancel it at once if it is too late for it)."""

    def scope_exited(self, scope: trio.CancelScope) -> None:
        """``scope`` is about to exit: forget it."""


class TrackedScope:
    """A :class:`trio.CancelScope` that tells each of its trackers once it is
    entered and just before it exits, so whoever may cancel it can find it
    meanwhile.

    A plain context manager, not a generator: connection tasks enter one for
    every wait of an idle connection, and a generator-based one costs several
    times as much. One scope can serve several trackers (a graceful stop and
    the pause gate), which costs half as much as one scope each.

    Args:
        trackers: Told of the scope's entry and exit.
        deadline: The scope's deadline (given here, it costs less than set
            on the scope after).
    """

    __slots__ = ("_scope", "_trackers")

    def __init__(self, *trackers: ScopeTracker, deadline: float = math.inf) -> None:
        self._trackers = trackers
        self._scope = trio.CancelScope(deadline=deadline)

    def __enter__(self) -> trio.CancelScope:
        scope = self._scope.__enter__()
        for tracker in self._trackers:
            tracker.scope_entered(scope)
        return scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        for tracker in self._trackers:
            tracker.scope_exited(self._scope)
        return self._scope.__exit__(exc_type, exc, tb)
