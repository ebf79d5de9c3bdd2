"""trio-embarcadero: the broker ingest path of Embarcadero on Trio."""

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

__version__ = "0.1.0"
