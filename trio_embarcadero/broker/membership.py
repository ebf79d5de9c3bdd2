"""The broker's entry in the region's broker table, and the task that renews it.

A broker joins the table (state live, its pid, host and port) once it
listens, says it is draining when its graceful stop begins, and leaves the
table when the drain is over; meanwhile :meth:`Membership.run` renews its
heartbeat every ``broker.heartbeat_interval_s``. What the table holds and
how readers judge it is in :mod:`trio_embarcadero.log.members`.

A broker that is killed leaves its entry behind; readers see from its lock
(or its stale heartbeat) that it is gone, and its next start overwrites it.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import trio

from ..config import BrokerConfig
from ..log import CxlLog
from ..log.members import MemberEntry

logger = logging.getLogger(__name__)


class Membership:
    """One broker's membership of its region.

    Args:
        log: The broker's region handle (its broker id's entry is written).
        config: The broker's identity and heartbeat settings.
    """

    def __init__(self, log: CxlLog, config: BrokerConfig) -> None:
        self.entry = MemberEntry(log.region, log.broker_id)
        self._config = config

    @property
    def joined(self) -> bool:
        """Whether the broker is listed (live or draining)."""
        return self.entry.record is not None

    def join(self, port: int) -> None:
        """List the broker as live at ``broker.host:port`` (it listens now)."""
        config = self._config
        self.entry.join(
            config.host,
            port,
            interval_s=config.heartbeat_interval_s,
            timeout_s=config.heartbeat_timeout_s,
        )

    def drain(self) -> None:
        """Say the broker's graceful stop has begun."""
        self.entry.drain()

    def leave(self) -> None:
        """Clear the broker's entry (the drain is over; the log is about to close)."""
        self.entry.leave()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Renew the heartbeat until cancelled (nothing is written before :meth:`join`)."""
        task_status.started()
        while True:
            await trio.sleep(self._config.heartbeat_interval_s)
            self.entry.beat()


__all__ = ["Membership"]
