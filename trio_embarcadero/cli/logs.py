"""How the command line logs: to stderr, as text lines or one JSON object a line.

Only the command line configures logging; the library never does.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

from ..config import Config


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line (``--log-format json``): ``time`` (UTC, ISO
    8601), ``level``, ``logger``, ``message``, and for a statistics line its
    numbers under ``stats``; ``exception`` with a traceback when there is one.

    Args:
        source: Whose lines they are (``"broker 2"``, ``"cluster"``) where
            several processes share stderr; "" for none.
    """

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.source = source

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.source:
            data["source"] = self.source
        stats = getattr(record, "stats", None)
        if stats is not None:
            data["stats"] = stats
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def set_up_logging(config: Config, who: str = "") -> None:
    """Log to stderr at ``logging.level`` in ``logging.format``; ``who`` says
    whose lines they are where several processes share stderr (a cluster)."""
    handler = logging.StreamHandler()
    if config.logging.format == "json":
        handler.setFormatter(JsonLogFormatter(who.strip()))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {who}%(levelname)s %(name)s: %(message)s")
        )
    logging.basicConfig(level=config.logging.level, handlers=[handler])
