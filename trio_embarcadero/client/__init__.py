"""Trio clients of a trio-embarcadero broker: a publisher and a subscriber.

Both speak the wire protocol of ``shared/reference/wire-protocol.md`` and come
as async context managers, in two flavours each:

* :func:`open_publisher` / :func:`open_subscriber` dial a broker over TCP;
* :func:`open_publisher_on_stream` / :func:`open_subscriber_on_stream` run the
  same protocol over a stream you already have: an in-memory stream to a
  broker started with ``open_broker(config, listeners=[...])`` (deterministic
  tests with a mock clock), a Unix socket, TLS.

A publisher packs messages into batches in preallocated buffers (one
``struct.pack_into`` and one slice copy per message; runs of messages given to
:meth:`Publisher.publish_many` with a few numpy operations), a sender task
writes sealed batches while the application goes on publishing, and a reader
task turns the broker's ack counts into :attr:`Publisher.acked`. Memory is
bounded by an in-flight window: :meth:`Publisher.publish` waits while too many
bytes are published but not yet acknowledged, and
:meth:`Publisher.publish_nowait` raises ``trio.WouldBlock`` instead.

A subscriber receives into a buffer it owns and decodes each receive's
records together. Iterating it hands out messages with a copy of their
payload (``bytes``, yours to keep); :meth:`Subscriber.receive_views` and
:meth:`Subscriber.batches` are the zero-copy opt-ins, whose payloads are views
of that buffer, valid until the next receive: a :class:`MessageBatch` holds
one receive's records as one view and their fields as numpy arrays.

Which calls are Trio checkpoints is said in each docstring: the per-message
fast paths (a publish with room in the window, iteration over messages
already received) skip the schedule point that makes a checkpoint cost
microseconds, and reach one at least once per batch or receive.

Modules, each importing only those before it and the base modules:

* ``batches``: the publish side without I/O (packing through
  :class:`~trio_embarcadero.wire.BatchEncoder`, sealing, the in-flight window);
* ``records``: the subscribe side without I/O (message records out of bytes);
* ``connect``: client ids, dialling and the handshake;
* ``publisher`` and ``subscriber``: the Trio tasks and the ``open_*`` functions.

Error handling:
    Failures the broker reports arrive as :class:`~trio_embarcadero.errors.BrokerError`
    (its ``code`` is the error frame's; ``acked`` says how many of the
    publisher's messages were acknowledged before it). A connection that ends
    without an error frame means the broker failed; that is a ``BrokerError``
    with code :data:`BROKER_FAILED` (0). Neither context manager wraps errors
    in exception groups: its background tasks report failures to the calling
    task instead of raising in a nursery.
"""

from ..errors import BROKER_FAILED as BROKER_FAILED
from ..wire import Message as Message
from ..wire import MessageView as MessageView
from .connect import random_client_id as random_client_id
from .publisher import DEFAULT_BATCH_BYTES as DEFAULT_BATCH_BYTES
from .publisher import DEFAULT_CLOSE_TIMEOUT as DEFAULT_CLOSE_TIMEOUT
from .publisher import DEFAULT_LINGER as DEFAULT_LINGER
from .publisher import Publisher as Publisher
from .publisher import open_publisher as open_publisher
from .publisher import open_publisher_on_stream as open_publisher_on_stream
from .records import MAX_RECORD_BYTES as MAX_RECORD_BYTES
from .records import MessageBatch as MessageBatch
from .subscriber import DEFAULT_RECEIVE_BUFFER as DEFAULT_RECEIVE_BUFFER
from .subscriber import Subscriber as Subscriber
from .subscriber import open_subscriber as open_subscriber
from .subscriber import open_subscriber_on_stream as open_subscriber_on_stream

__all__ = [
    "BROKER_FAILED",
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_LINGER",
    "Message",
    "MessageBatch",
    "MessageView",
    "Publisher",
    "Subscriber",
    "open_publisher",
    "open_publisher_on_stream",
    "open_subscriber",
    "open_subscriber_on_stream",
    "random_client_id",
]
