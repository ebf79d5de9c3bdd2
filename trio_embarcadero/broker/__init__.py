"""The broker service: the nursery tree around the log core.

A batch travels listener -> :mod:`.session` (handshake) -> :mod:`.publish`
(receive into :mod:`.staging`, or straight into the log) -> :mod:`.allocator`
(reserve with backoff, copy) -> the log core's commit -> :mod:`.commits`
(the commit feed) -> :mod:`.acks`, :mod:`.subscribe` wake-ups and
:mod:`.durability` (the disk). :mod:`.monitor` pauses receivers under
staging pressure; :mod:`.service` owns the tree (``serve``, ``open_broker``);
:mod:`.membership` keeps the broker's entry in the region's broker table.
:mod:`.cluster` runs several brokers as supervised processes (``open_cluster``).
"""

from .cluster import Cluster as Cluster
from .cluster import ClusterBroker as ClusterBroker
from .cluster import open_cluster as open_cluster
from .cluster import run_cluster as run_cluster
from .connection import ConnectionPhase as ConnectionPhase
from .service import Broker as Broker
from .service import open_broker as open_broker
from .service import serve as serve
from .statistics import BrokerStatistics as BrokerStatistics

__all__ = [
    "Broker",
    "BrokerStatistics",
    "Cluster",
    "ClusterBroker",
    "ConnectionPhase",
    "open_broker",
    "open_cluster",
    "run_cluster",
    "serve",
]
