"""The log core: the CXL region, its disk tier and readers for other processes.

Nothing here imports Trio or touches sockets. The writer (:class:`CxlLog`)
reserves space, commits and recovers, and returns what it committed; the
broker service above fans that out. :mod:`.layout` is the one description of
the file; :mod:`.reader` maps it read-only in any process; :mod:`.disk` keeps
the disk copy behind ack level 2; :mod:`.members` is the broker table (who
serves the region, and their heartbeats); :mod:`.sequencer` gives order-5
topics one total order across brokers, which :mod:`.ordered` reads, run by
the broker that holds the sequencer lease (:mod:`.lease`).
"""

from .disk import DiskLog as DiskLog
from .disk import DiskStatistics as DiskStatistics
from .layout import Geometry as Geometry
from .members import BrokerMember as BrokerMember
from .members import MemberStatus as MemberStatus
from .ownership import remove_region as remove_region
from .reader import BatchInfo as BatchInfo
from .reader import LogReader as LogReader
from .reader import StreamInfo as StreamInfo
from .reader import TopicInfo as TopicInfo
from .reader import open_log as open_log
from .region import CommittedBatch as CommittedBatch
from .region import CxlLog as CxlLog
from .region import CxlStatistics as CxlStatistics
from .region import Reservation as Reservation
from .region import Stream as Stream
