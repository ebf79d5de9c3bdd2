"""``trio-embarcadero bench``: broker throughput and ack latency next to the machine's limit.

One invocation runs every *variant* against the same load generator, in
interleaved rounds (round 1: every variant once, round 2: again, ...), because
shared machines drift by tens of percent within minutes; figures are medians
with their min-max spread, and every ratio compares runs of the same
invocation. A variant is a receiver and an ack level:

* ``trio-sink``: a minimal Trio receiver (``stream.socket.recv_into`` into
  one reused buffer, same framing, an 8-byte ack per batch); the fair baseline.
* ``raw-sink``: blocking-socket ``recv_into`` with ``MSG_WAITALL`` in a plain
  Python process; the best raw receiver, and the measure of what the load
  generator alone can push.
* ``staged`` / ``direct``: the broker with ``network.use_nonblocking`` true
  or false.
* ``clusterN-orderO``: N broker processes on one region (``serve --broker-id
  i``, the direct path), the topic of order O (0, or 5: one total order
  across them, which the head's sequencer gives); the load generator spreads
  its connections round-robin over the brokers, at least two a broker. GB/s
  is all brokers together, and each broker's share is reported too; CPU s/GB
  counts every broker process. ``cluster1-order0`` next to ``cluster2-order0``
  is the gain of a second broker process on this machine, ``clusterN-order5``
  next to ``clusterN-order0`` the cost of the total order.

Written ``NAME-ack0`` or ``NAME-ack1``; plain ``trio-sink`` and ``raw-sink``
mean ack 1. A broker variant with acks may end in ``-session``
(``staged-ack1-session``, ``cluster2-order5-session``): the load generator
then publishes in publish sessions (``client_req = 2``, one a connection,
batch_seq 0, 1, 2, ...), and the report sets it next to the same variant
publishing plainly (the cost of a session). The broker also runs as
``staged-ack2`` / ``direct-ack2`` (not in the default list): the broker
config gets ``storage.dir``, a fresh directory under ``--storage-dir``
removed after the run, and every ack waits for the disk log's
group-committed ``fdatasync``; the load generator counts those acks like
ack 1, so the difference to ``NAME-ack1`` is the cost of durability on disk.

The read path, on request: ``read-subN`` fills the broker's topic with the
load generator (not timed), then times N subscribers, each reading it all
from offset 0 (:mod:`trio_embarcadero.tools.reader`); ``read-sinkN``, the
baseline, is a minimal Trio sender of the same bytes from a mapping of the
same kind (``python -m trio_embarcadero.tools.sink read``).

A broker variant may carry ``+NAME`` tags: ``+retention`` (a preset: the
shipped 1 GiB region keeping 256 MiB of the topic) or any name whose broker
settings ``--variant-option NAME:SECTION.KEY=VALUE`` gives, so variants with
and without them interleave in one run. With several ``--batch-size`` values
every variant runs at each, as ``VARIANT@SIZE``. With ``--rate`` each ingest
variant with acks runs again right after each unpaced run, paced at those
fractions of the GB/s that run measured, and its ack latency is measured
from each batch's scheduled send. With ``--pin`` the servers (brokers,
sinks, the read path's sender) and the clients (load generator, readers)
are bound to separate CPUs, and every run checks that the binding held.
With ``--stall-probe`` a process on each CPU in use watches for stalls of
the machine itself (:mod:`trio_embarcadero.tools.stallprobe`), and every run
reports the ones in its window, so a paced run's tail can be told apart from
a stall of the machine.

Every receiver, sender, load generator and reader is a process of its own
(:mod:`trio_embarcadero.tools.sink`, :mod:`trio_embarcadero.tools.loadgen`,
:mod:`trio_embarcadero.tools.reader` and ``python -m trio_embarcadero
serve``), so the broker's event loop never
shares an interpreter with its client; this process only watches.

What is measured (see :mod:`trio_embarcadero.tools.loadgen` for the client side):

* throughput: message payload bytes (``message_size x messages``, the C++
  evaluation's formula, without record and batch headers) from the first
  send to the last ack (ack 1; ack 2: the last ack saying it is on disk) or
  to the receiver closing the connection after reading everything (ack 0);
  GB = 10**9 bytes;
* ack latency per batch, from the start of its ``sendall`` (paced runs: from
  its scheduled send) to the ack covering it, pooled over every round of a
  variant (and fraction);
* on the read path, the message payload the reader receives, all its
  connections together, from the subscribe handshakes to the last byte;
* the receiver's CPU seconds per GB (``/proc/PID/stat`` utime + stime over
  the run) and its peak RSS (``VmHWM``; for the broker that includes the
  mapped CXL region, so the private part, peak ``RssAnon``, is shown too);
* for ack 2, the bytes the disk log holds after the run (``storage_bytes``;
  it must equal the wire bytes sent).

Optional: ``hdrhistogram`` (the ``bench`` extra) for percentiles, otherwise
numpy; ``matplotlib`` for ``--plot``.

Where things are:

* :mod:`.plan`: what to run: the options, the variants, the batch and region
  sizes (:class:`Plan`);
* :mod:`.runner`: running it: the processes, the rounds, the ``/proc``
  sampling, the live lines (:class:`Bench`);
* :mod:`.results`: one run's figures (:class:`RunResult`) and latency percentiles;
* :mod:`.report`: the summaries and ratios, the table, the JSON, the plot;
* :mod:`.command`: the command itself (:func:`run`), which ties them together.
"""

from ..loadgen import parse_size
from ..procfs import filesystem
from .command import build_parser, main, run
from .plan import (
    ACK2_VARIANTS,
    CLUSTER_VARIANTS,
    DEFAULT_VARIANTS,
    PRESETS,
    READ_VARIANTS,
    Pinning,
    Plan,
    Variant,
    add_arguments,
    make_plan,
    pinning,
)
from .report import build_report, plot, render_table, summarize
from .results import RunResult, percentiles
from .runner import Bench, BenchError

__all__ = [
    "ACK2_VARIANTS",
    "CLUSTER_VARIANTS",
    "DEFAULT_VARIANTS",
    "PRESETS",
    "READ_VARIANTS",
    "Bench",
    "BenchError",
    "Pinning",
    "Plan",
    "RunResult",
    "Variant",
    "add_arguments",
    "build_parser",
    "build_report",
    "filesystem",
    "main",
    "make_plan",
    "parse_size",
    "percentiles",
    "pinning",
    "plot",
    "render_table",
    "run",
    "summarize",
]
