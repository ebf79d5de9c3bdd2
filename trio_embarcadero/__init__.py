"""trio-embarcadero: the broker ingest path of Embarcadero on Trio.

The names below are loaded when first used (PEP 562), not by ``import
trio_embarcadero``: a process that needs only the wire format or a client
(the load generator, a subscriber) does not load the broker, and ``serve``,
which starts itself again once to set a glibc tunable, decides that before
loading it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .broker import Broker as Broker
    from .broker import BrokerStatistics as BrokerStatistics
    from .broker import Cluster as Cluster
    from .broker import ConnectionPhase as ConnectionPhase
    from .broker import open_broker as open_broker
    from .broker import open_cluster as open_cluster
    from .broker import run_cluster as run_cluster
    from .broker import serve as serve
    from .client import Message as Message
    from .client import MessageBatch as MessageBatch
    from .client import MessageView as MessageView
    from .client import Publisher as Publisher
    from .client import Subscriber as Subscriber
    from .client import open_publisher as open_publisher
    from .client import open_publisher_on_stream as open_publisher_on_stream
    from .client import open_subscriber as open_subscriber
    from .client import open_subscriber_on_stream as open_subscriber_on_stream
    from .config import Config as Config
    from .config import load_config as load_config
    from .errors import BrokerError as BrokerError
    from .errors import ClusterError as ClusterError
    from .errors import ConfigError as ConfigError
    from .errors import ConnectionLost as ConnectionLost
    from .errors import EmbarcaderoError as EmbarcaderoError
    from .errors import ErrorCode as ErrorCode
    from .errors import LayoutError as LayoutError
    from .errors import LogFullError as LogFullError
    from .errors import NoBrokerError as NoBrokerError
    from .errors import ProtocolError as ProtocolError
    from .errors import StorageError as StorageError
    from .log import BrokerMember as BrokerMember
    from .log import LogReader as LogReader
    from .log import open_log as open_log

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "Broker": ".broker",
    "BrokerStatistics": ".broker",
    "Cluster": ".broker",
    "ConnectionPhase": ".broker",
    "open_broker": ".broker",
    "open_cluster": ".broker",
    "run_cluster": ".broker",
    "serve": ".broker",
    "Message": ".client",
    "MessageBatch": ".client",
    "MessageView": ".client",
    "Publisher": ".client",
    "Subscriber": ".client",
    "open_publisher": ".client",
    "open_publisher_on_stream": ".client",
    "open_subscriber": ".client",
    "open_subscriber_on_stream": ".client",
    "Config": ".config",
    "load_config": ".config",
    "BrokerError": ".errors",
    "ClusterError": ".errors",
    "ConfigError": ".errors",
    "ConnectionLost": ".errors",
    "EmbarcaderoError": ".errors",
    "ErrorCode": ".errors",
    "LayoutError": ".errors",
    "LogFullError": ".errors",
    "NoBrokerError": ".errors",
    "ProtocolError": ".errors",
    "StorageError": ".errors",
    "BrokerMember": ".log",
    "LogReader": ".log",
    "open_log": ".log",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
