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

Both survive a broker going away: given several brokers
(``brokers=[(host, port), ...]``), a publisher spreads its batches over them,
and when one fails (EOF, reset, error 5, a refused connect) sends what that
broker had not acknowledged to another one, or to the same one when it is
back, with the same ``batch_seq``; a subscriber reconnects and goes on from
the first message it has not received. The application sees a delay, not an
error, unless no broker can be reached for ``delivery_timeout_s`` (publisher)
or ``reconnect_timeout_s`` (subscriber): then
:class:`~trio_embarcadero.errors.NoBrokerError`. A publisher with acks
publishes in a session by default (``client_req = 2``), so its resends are
stored once; ``idempotent=False`` publishes plainly (a resend after a
``kill -9`` may store a batch twice).

Which calls are Trio checkpoints is said in each docstring: the per-message
fast paths (a publish with room in the window, iteration over messages
already received) skip the schedule point that makes a checkpoint cost
microseconds, and reach one at least once per batch or receive.

Modules, each importing only those before it and the base modules:

* ``batches``: the publish side without I/O (packing through
  :class:`~trio_embarcadero.wire.BatchEncoder`, sealing, the in-flight window);
* ``records``: the subscribe side without I/O (message records out of bytes);
* ``connect``: client ids, dialling and the handshake;
* ``failover``: the brokers a client knows, reconnect backoff;
* ``publisher`` and ``subscriber``: the Trio tasks and the ``open_*`` functions.

Error handling:
    Failures the broker reports arrive as :class:`~trio_embarcadero.errors.BrokerError`
    (its ``code`` is the error frame's; ``acked`` says how many of the
    publisher's messages were acknowledged before it). A connection that ends
    without an error frame means the broker failed; that is a ``BrokerError``
    with code :data:`BROKER_FAILED` (0), raised only with failover turned off
    (a timeout of 0, or a stream given to ``open_*_on_stream``); with it, such
    failures and error 5 are retried until the timeout and end in a
    :class:`~trio_embarcadero.errors.NoBrokerError` (a ``BrokerError``) if no
    broker comes back. Neither context manager wraps errors
    in exception groups: its background tasks report failures to the calling
    task instead of raising in a nursery.
"""

from ..errors import BROKER_FAILED as BROKER_FAILED
from ..wire import DEFAULT_BATCH_BYTES as DEFAULT_BATCH_BYTES
from ..wire import Message as Message
from ..wire import MessageView as MessageView
from .connect import random_client_id as random_client_id
from .failover import BrokerAddress as BrokerAddress
from .failover import Dialer as Dialer
from .publisher import DEFAULT_CLOSE_TIMEOUT as DEFAULT_CLOSE_TIMEOUT
from .publisher import DEFAULT_DELIVERY_TIMEOUT as DEFAULT_DELIVERY_TIMEOUT
from .publisher import DEFAULT_LINGER as DEFAULT_LINGER
from .publisher import Publisher as Publisher
from .publisher import open_publisher as open_publisher
from .publisher import open_publisher_on_stream as open_publisher_on_stream
from .records import MAX_RECORD_BYTES as MAX_RECORD_BYTES
from .records import MessageBatch as MessageBatch
from .subscriber import DEFAULT_RECEIVE_BUFFER as DEFAULT_RECEIVE_BUFFER
from .subscriber import DEFAULT_RECONNECT_TIMEOUT as DEFAULT_RECONNECT_TIMEOUT
from .subscriber import Subscriber as Subscriber
from .subscriber import open_subscriber as open_subscriber
from .subscriber import open_subscriber_on_stream as open_subscriber_on_stream

__all__ = [
    "BROKER_FAILED",
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_DELIVERY_TIMEOUT",
    "DEFAULT_LINGER",
    "DEFAULT_RECONNECT_TIMEOUT",
    "BrokerAddress",
    "Dialer",
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
