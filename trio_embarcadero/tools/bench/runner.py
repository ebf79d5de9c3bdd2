"""How the bench runs: the receiver and load-generator processes, the rounds, the sampling.

:class:`Bench` runs every variant of a :class:`~.plan.Plan` once per round
(with ``--rate``, each paced run right after the unpaced run it takes its
peak from). A run starts the receiver (``python -m trio_embarcadero serve``
with a config written for it, or ``python -m trio_embarcadero.tools.sink``),
waits for its "listening on" line, then starts
``python -m trio_embarcadero.tools.loadgen`` against it and reads its JSON
lines, while sampling the receiver's CPU time and memory from ``/proc``. A
read run first fills the broker's topic with the load generator (not timed;
the read sink fills its own), then times
``python -m trio_embarcadero.tools.reader`` reading it. This process only
watches.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TextIO

import trio

from ...config import StorageConfig, load_config
from ...log import remove_region
from ..procfs import (
    cpu_list_text,
    filesystem,
    process_cpu_seconds,
    process_cpus,
    process_memory,
)
from .children import pump, stop_process
from .plan import PROGRESS_INTERVAL, Plan, Variant
from .results import RunResult, percentiles
from .stalls import StallProbes

_LISTENING_RE = re.compile(r"listening on (\S+):(\d+)")
# The broker's statistics line: "... staging 3 of 32 buffers in use (peak 12); ... 0 pauses, ...".
_STATS_RE = re.compile(
    r"staging ([\d,]+) of ([\d,]+) buffers in use \(peak ([\d,]+)\).*?; ([\d,]+) pauses?\b"
)
# Keys the bench sets itself; environment overrides of them are not passed on.
_CONTROLLED_ENV = frozenset(
    {
        "EMBARCADERO_USE_NONBLOCKING",
        "TRIO_EMBARCADERO_BROKER__HOST",
        "TRIO_EMBARCADERO_BROKER__PORT",
        "TRIO_EMBARCADERO_NETWORK__USE_NONBLOCKING",
        "TRIO_EMBARCADERO_NETWORK__STATS_INTERVAL_S",
        "TRIO_EMBARCADERO_CXL__PATH",
        "TRIO_EMBARCADERO_CXL__SIZE_MB",
        "TRIO_EMBARCADERO_CXL__SEGMENT_MB",
        "TRIO_EMBARCADERO_LOGGING__LEVEL",
        "TRIO_EMBARCADERO_STORAGE__DIR",
    }
)
_LIVE_INTERVAL = 1.0  # live lines printed here
_STATS_INTERVAL = 0.5  # the broker's statistics log line
_ATTEMPTS = 3  # per run, when the receiver fails (not when it is merely slow)


class BenchError(Exception):
    """A run could not be carried out (receiver failed to start, died, ...)."""


def _tree_bytes(directory: str) -> int:
    """The sizes of the disk log files (``*.log``, not the lock file) under
    ``directory``, added up."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(directory)
        for name in names
        if name.endswith(".log")
    )


def _take_result(result: RunResult, final: dict[str, Any]) -> None:
    """Take what every client's result line says (load generator or reader) into ``result``."""
    result.errors.extend(final["errors"])
    result.ok = bool(final["ok"]) and not result.errors
    result.payload_bytes = final["payload_bytes"]
    result.messages = final["messages"]
    result.elapsed_s = final["elapsed_s"]
    result.time_bounded = final["time_bounded"]


class Server:
    """A receiver process (sink or broker) and what its output says."""

    def __init__(self, variant: Variant, process: trio.Process) -> None:
        self.variant = variant
        self.process = process
        self.address: tuple[str, int] | None = None
        self.listening = trio.Event()
        self.tail: deque[str] = deque(maxlen=30)
        self.pool_used: int | None = None
        self.pool_size: int | None = None
        self.pool_peak: int | None = None
        self.pauses: int | None = None
        self.stats_seen = trio.Event()

    def on_line(self, line: str) -> None:
        """Take one line of the receiver's stdout or stderr."""
        self.tail.append(line)
        if self.address is None and (m := _LISTENING_RE.search(line)):
            self.address = (m.group(1), int(m.group(2)))
            self.listening.set()
        elif m := _STATS_RE.search(line):
            used, size, peak, pauses = (int(g.replace(",", "")) for g in m.groups())
            self.pool_used, self.pool_size, self.pool_peak, self.pauses = used, size, peak, pauses
            self.stats_seen.set()


# -- the bench ---------------------------------------------------------------------


def _toml_value(value: object) -> str:
    """``value`` written as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


class Bench:
    """Runs the plan; holds the results."""

    def __init__(self, plan: Plan, *, live: TextIO | None) -> None:
        self.plan = plan
        self.live = live
        self.runs: list[RunResult] = []
        #: The signal that stopped :meth:`run` early (``"SIGTERM"``), if one did.
        self.stopped_by: str | None = None
        self.broker_env = {
            k: v
            for k, v in os.environ.items()
            if (k.startswith("TRIO_EMBARCADERO_") or k.startswith("EMBARCADERO_"))
            and k not in _CONTROLLED_ENV
        }
        #: ``--stall-probe``'s probes (None without it).
        self.stall_probes = StallProbes(plan.probe_cpus()) if plan.stall_probe else None
        self._tmp = tempfile.TemporaryDirectory(prefix="trio-embarcadero-bench-")
        self._storage: StorageConfig | None = None

    def close(self) -> None:
        """Remove the broker configs written so far."""
        self._tmp.cleanup()

    # -- broker config ---------------------------------------------------------------

    def broker_settings(
        self, variant: Variant, cxl_path: str, storage_path: str | None = None
    ) -> dict[str, object]:
        """The broker's config keys for one run; ``storage_path`` is the ack-2 disk log."""
        plan = self.plan
        settings: dict[str, object] = {}
        needed_mb = -(-plan.batch_total_size(variant) // 2**20)
        if needed_mb > 4:  # the default staging buffer: make room for the batch
            settings["network.staging_pool_buffer_size_mb"] = needed_mb
        settings.update(plan.options(variant))
        settings.update(
            {
                "broker.host": plan.host,
                "broker.port": 0,
                # read-sub: the fill takes the direct path, the faster one
                # here; so do clusters.
                "network.use_nonblocking": variant.kind == "staged",
                "network.stats_interval_s": _STATS_INTERVAL,
                "cxl.path": cxl_path,
                "cxl.segment_mb": plan.segment_mb(variant),
                "cxl.size_mb": plan.cxl_size_mb(variant),
                "logging.level": "INFO",
                # Only ack-2 runs get a disk log: with one, the broker writes
                # every committed batch to disk, whatever the ack level.
                "storage.dir": (storage_path or plan.storage_dir) if variant.durable else "",
            }
        )
        if variant.is_cluster:
            settings["cxl.max_brokers"] = max(variant.brokers, 4)
            settings["topics.order"] = variant.order
        return settings

    def write_broker_config(
        self, variant: Variant, cxl_path: str, storage_path: str | None = None
    ) -> str:
        """Write :meth:`broker_settings` as the run's TOML config; returns its path."""
        tables: dict[str, list[str]] = {}
        for key, value in self.broker_settings(variant, cxl_path, storage_path).items():
            section, name = key.split(".")
            tables.setdefault(section, []).append(f"{name} = {_toml_value(value)}")
        text = "".join(f"[{s}]\n" + "\n".join(lines) + "\n\n" for s, lines in tables.items())
        path = Path(self._tmp.name) / f"{variant.name}.toml"
        path.write_text(text)
        return str(path)

    def check_broker_config(self) -> None:
        """Fail before running anything if the broker would refuse its config."""
        env = {**self.broker_env}
        for v in self.plan.variants:
            if v.is_broker:
                config = load_config(self.write_broker_config(v, "/dev/shm/unused"), env=env)
                if v.durable and self._storage is None:
                    self._storage = config.storage

    def storage_config(self) -> StorageConfig | None:
        """The ack-2 runs' ``[storage]`` settings (None without ack-2 variants)."""
        if self._storage is None and any(v.durable for v in self.plan.variants):
            self.check_broker_config()
        return self._storage

    def storage_setup(self) -> dict[str, Any] | None:
        """Where the ack-2 disk logs go and the group commit they use (for the report)."""
        storage = self.storage_config()
        if storage is None:
            return None
        return {
            "dir": self.plan.storage_dir,
            "filesystem": filesystem(self.plan.storage_dir),
            "sync_interval_ms": storage.sync_interval_ms,
            "sync_bytes": storage.sync_bytes,
        }

    def check_storage_dir(self) -> str | None:
        """Why the ack-2 variants cannot run (None if they can, or if there are none)."""
        if not any(v.durable for v in self.plan.variants):
            return None
        where = self.plan.storage_dir
        if not os.path.isdir(where):
            return f"--storage-dir {where}: not a directory"
        if not os.access(where, os.W_OK | os.X_OK):
            return f"--storage-dir {where}: not writable"
        return None

    # -- running ---------------------------------------------------------------------

    def say(self, text: str) -> None:
        """Print a live line (unless ``--quiet``)."""
        if self.live is not None:
            print(text, file=self.live, flush=True)

    async def run(self) -> None:
        """Every variant once per round, in order, each paced run right after its
        unpaced one; a run whose receiver failed is retried.

        SIGTERM or SIGHUP stops it as SIGINT does: the run under way is
        given up, its processes are stopped and :attr:`stopped_by` names the
        signal; the runs done are kept. (By default either signal would end
        this process at once and leave its brokers running, each holding a
        region of several GB.)
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_on_signal, nursery.cancel_scope)
            if self.stall_probes is not None:
                await nursery.start(self.stall_probes.serve)
            try:
                await self._run_all()
            finally:
                self._note_stalls()
            nursery.cancel_scope.cancel()

    def _note_stalls(self) -> None:
        """Give every run the stalls its window saw (again at the end: a stall
        that ended a run's window may be reported just after it)."""
        probes = self.stall_probes
        if probes is None:
            return
        for run in self.runs:
            if run.window is not None:
                run.machine_stalls_ms = probes.during(*run.window)

    async def _stop_on_signal(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                self.stopped_by = signal.Signals(signum).name
                scope.cancel()
                return

    async def _run_all(self) -> None:
        plan = self.plan
        per_round = sum(1 + (len(plan.rates) if v.paced else 0) for v in plan.variants)
        total = per_round * plan.rounds
        done = 0
        for rnd in range(1, plan.rounds + 1):
            for variant in plan.variants:
                for rate in (None, *(plan.rates if variant.paced else ())):
                    done += 1
                    label = f"[{done}/{total} r{rnd}] {variant.name}"
                    if rate is not None:
                        label += f" at {rate * 100:g}%"
                    started = time.monotonic()
                    result = await self.run_with_retries(variant, rnd, label, rate)
                    self.runs.append(result)
                    self._note_stalls()
                    self.say(self.run_line(label, result, time.monotonic() - started))

    def peak(self, variant: Variant) -> float | None:
        """The payload bytes per second of ``variant``'s latest good unpaced run."""
        for run in reversed(self.runs):
            if run.variant == variant.name and run.rate is None and run.ok:
                return run.gb_per_s * 1e9
        return None

    async def run_with_retries(
        self, variant: Variant, rnd: int, label: str, rate: float | None = None
    ) -> RunResult:
        """One run of ``variant`` (paced at ``rate`` of its peak, if given),
        tried again while its receiver fails."""
        offered = None
        if rate is not None:
            peak = self.peak(variant)
            if peak is None:
                return RunResult(
                    variant.name,
                    rnd,
                    ok=False,
                    rate=rate,
                    errors=[f"no good unpaced run of {variant.name} to take the peak from"],
                )
            offered = rate * peak
        earlier: list[str] = []
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                result = await self.run_once(variant, rnd, label, rate, offered)
            except* BenchError as group:
                errors = [str(e) for e in group.exceptions]
                result = RunResult(
                    variant.name,
                    rnd,
                    ok=False,
                    errors=errors,
                    receiver_failed=True,
                    rate=rate,
                    offered_bytes_per_s=offered,
                )
            result.attempts = attempt
            result.earlier_errors = earlier
            # A receiver that died or never started (a stray signal, a port
            # race) says nothing about throughput: try that run again.
            if result.ok or not result.receiver_failed or attempt == _ATTEMPTS:
                break
            self.say(f"{label}: retrying: {'; '.join(result.errors)[:300]}")
            earlier = [*earlier, *result.errors]
        return result

    def run_line(self, label: str, r: RunResult, wall: float) -> str:
        """The line printed after a run."""
        if not r.ok:
            return f"{label}: FAILED: {'; '.join(r.errors)}"
        lat = percentiles(r.latency_us, (50.0, 99.0))
        lat_text = (
            f"ack p50 {lat[0] / 1000:.1f} ms p99 {lat[1] / 1000:.1f} ms"
            if r.latency_us
            else "no acks"
        )
        offered = (
            f" ({r.offered_bytes_per_s / 1e9:.2f} GB/s offered)" if r.offered_bytes_per_s else ""
        )
        pool = f", pool peak {r.pool_peak}/{r.pool_size}, pauses {r.pauses}" if r.pool_size else ""
        disk = f", {r.storage_bytes / 1e9:.2f} GB on disk" if r.storage_bytes is not None else ""
        stalls = r.machine_stalls_ms
        machine = ""
        if stalls is not None:
            machine = (
                f", {len(stalls)} machine stall(s), longest {max(stalls):.1f} ms"
                if stalls
                else ", no machine stall"
            )
        fill = f"; untimed fill {r.fill_s:.1f} s" if r.fill_s is not None else ""
        return (
            f"{label}: {r.gb_per_s:.2f} GB/s{offered}, {r.msgs_per_s / 1e6:.2f} M msg/s, "
            f"{lat_text}, receiver CPU {r.cpu_s_per_gb:.2f} s/GB{pool}{disk}{machine} "
            f"({r.payload_bytes / 1e9:.2f} GB in {r.elapsed_s:.2f} s{fill}; wall {wall:.1f} s)"
        )

    def pin(self, process: trio.Process, role: Literal["servers", "clients"]) -> None:
        """Bind a child just started to ``--pin``'s CPUs for ``role`` (if pinning)."""
        pin = self.plan.pin
        if pin is None:
            return
        # At once, while the child's interpreter is still starting up and runs
        # no other thread: the threads it starts later (the load generator's,
        # Trio's workers) inherit the setting. Each run checks it held.
        with contextlib.suppress(ProcessLookupError):  # gone already: its run says why
            os.sched_setaffinity(process.pid, getattr(pin, role))

    async def start_servers(
        self, nursery: trio.Nursery, variant: Variant, cxl: str, storage: str | None = None
    ) -> list[Server]:
        """Start the variant's receivers (a cluster's brokers one after the
        other, broker 0 making the region) and wait until each listens.

        Raises:
            BenchError: One exited or did not listen in time (the ones
                started are stopped).
        """
        servers: list[Server] = []
        try:
            while len(servers) < variant.brokers:  # broker ids 0, 1, ...
                server = await self.start_server(nursery, variant, cxl, storage, len(servers))
                servers.append(server)
        except BaseException:
            for server in servers:
                await stop_process(server.process, signal.SIGKILL)
            raise
        return servers

    async def start_server(
        self,
        nursery: trio.Nursery,
        variant: Variant,
        cxl: str,
        storage: str | None = None,
        broker_id: int = 0,
    ) -> Server:
        """Start the variant's receiver (or sender; a cluster's broker
        ``broker_id``) and wait until it listens.

        Raises:
            BenchError: It exited or did not listen in time.
        """
        plan = self.plan
        python = sys.executable
        env = dict(os.environ)
        if variant.is_broker:
            for key in _CONTROLLED_ENV:
                env.pop(key, None)
            config = self.write_broker_config(variant, cxl, storage)
            cmd = [python, "-m", "trio_embarcadero", "serve", "--config", config]
            # The first broker makes the region anew; the others attach.
            cmd += ["--broker-id", str(broker_id)] if broker_id else ["--reset"]
            prefault_mb = plan.cxl_size_mb(variant)
        else:
            kind = variant.kind.removesuffix("-sink")
            cmd = [python, "-m", "trio_embarcadero.tools.sink", kind, "--host", plan.host]
            prefault_mb = 0
            if variant.is_read:
                cmd += [
                    *("--batches", str(plan.batches_per_run(variant))),
                    *("--batch-messages", str(variant.batch_messages)),
                    *("--message-size", str(plan.message_size)),
                    *("--dir", plan.cxl_dir),
                ]
                prefault_mb = plan.batches_per_run(variant) * plan.batch_total_size(variant) >> 20
        process = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.pin(process, "servers")
        server = Server(variant, process)
        nursery.start_soon(pump, process.stdout, server.on_line)
        nursery.start_soon(pump, process.stderr, server.on_line)
        # Broker start-up faults the whole CXL region in (~1 GB/s here); the
        # read sink fills its topic first.
        with trio.move_on_after(60 + prefault_mb / 200):
            while not server.listening.is_set():
                if process.poll() is not None:
                    break
                with trio.move_on_after(0.1):
                    await server.listening.wait()
        if server.address is None:
            await stop_process(process, signal.SIGKILL)
            tail = " | ".join(server.tail)
            who = f" broker {broker_id}" if variant.is_cluster else ""
            raise BenchError(f"{variant.name}:{who} receiver did not start: {tail}")
        return server

    async def run_once(
        self,
        variant: Variant,
        rnd: int,
        label: str,
        rate: float | None = None,
        offered: float | None = None,
    ) -> RunResult:
        """One run: a fresh CXL file (and disk log), the receiver, the load, the cleanup."""
        plan = self.plan
        cxl = str(Path(plan.cxl_dir) / f"trio-embarcadero-bench-{uuid.uuid4().hex[:12]}")
        result = RunResult(variant.name, rnd, ok=False, rate=rate, offered_bytes_per_s=offered)
        storage: str | None = None
        try:
            if variant.durable:
                # A fresh disk log per run, on --storage-dir (a disk).
                try:
                    storage = tempfile.mkdtemp(
                        prefix="trio-embarcadero-bench-", dir=plan.storage_dir
                    )
                except OSError as exc:
                    raise BenchError(f"{variant.name}: no disk-log directory: {exc}") from None
            async with trio.open_nursery() as nursery:
                servers = await self.start_servers(nursery, variant, cxl, storage)
                try:
                    if variant.is_read:
                        await self.drive_read(servers[0], variant, result, label)
                    else:
                        await self.drive(servers, variant, result, label, offered)
                finally:
                    # The others first: broker 0 (the head) orders their last batches.
                    for server in reversed(servers):
                        await stop_process(
                            server.process, signal.SIGINT if variant.is_broker else signal.SIGTERM
                        )
                for server in servers:
                    if variant.is_broker and server.process.returncode not in (0, None):
                        result.receiver_failed = True
                        result.errors.append(
                            f"broker exited with {server.process.returncode}: "
                            + " | ".join(list(server.tail)[-5:])
                        )
                        result.ok = False
            if storage is not None:
                # The broker has stopped: everything it acked is in the files.
                result.storage_bytes = _tree_bytes(storage)
                if result.ok and result.storage_bytes != result.wire_bytes:
                    result.ok = False
                    result.errors.append(
                        f"the disk log holds {result.storage_bytes} bytes after acking "
                        f"{result.wire_bytes} wire bytes at ack 2"
                    )
        finally:
            remove_region(cxl)
            if storage is not None:
                shutil.rmtree(storage, ignore_errors=True)
        return result

    def loadgen_command(
        self,
        addresses: list[tuple[str, int]],
        variant: Variant,
        ack: int,
        rate: float | None = None,
    ) -> list[str]:
        """The load generator's command line against ``addresses`` (one
        host; its connections spread over the ports), paced at ``rate``
        payload bytes per second, if given."""
        plan = self.plan
        host = addresses[0][0]
        ports = ",".join(str(port) for _, port in addresses)
        cmd = [
            *(sys.executable, "-m", "trio_embarcadero.tools.loadgen"),
            *("--host", host, "--port", ports),
            *("--connections", str(plan.connections_for(variant)), "--ack", str(ack)),
            *("--message-size", str(plan.message_size)),
            *("--batch-messages", str(variant.batch_messages)),
            *("--bytes", str(plan.bytes), "--seconds", str(plan.seconds)),
            *("--interval", str(PROGRESS_INTERVAL)),
            *("--send-buffer", str(plan.send_buffer)),
            *(("--session",) if variant.session else ()),
        ]
        return cmd if rate is None else [*cmd, "--rate", str(round(rate))]

    async def drive(
        self,
        servers: list[Server],
        variant: Variant,
        result: RunResult,
        label: str,
        offered: float | None = None,
    ) -> None:
        """Run the load generator against ``servers`` (paced at ``offered``
        payload bytes per second, if given), sampling them; fills in ``result``."""
        addresses = [server.address for server in servers if server.address is not None]
        assert len(addresses) == len(servers)
        cmd = self.loadgen_command(addresses, variant, variant.ack, offered)
        track = self.progress(label, servers[0], result, "sent_bytes", acks=variant.ack > 0)
        final = await self.measure(
            servers, result, functools.partial(self.client, servers, cmd, result, track)
        )
        if not final:
            return
        _take_result(result, final)
        if variant.is_cluster:
            received = {entry["port"]: entry["payload_bytes"] for entry in final["per_port"]}
            result.broker_payload_bytes = [received[port] for _, port in addresses]
        result.wire_bytes = final["wire_bytes"]
        result.batches = final["batches"]
        result.latency_us = final["latency_us"]
        result.latency_after_send_us = final["latency_after_send_us"]
        result.send_lag_us = final["send_lag_us"]
        result.loadgen_cpu_s = final["loadgen_cpu_s"]

    async def drive_read(
        self, server: Server, variant: Variant, result: RunResult, label: str
    ) -> None:
        """Fill the broker's topic (not timed), then read it with
        :mod:`~trio_embarcadero.tools.reader`, sampling the sender; fills in ``result``."""
        plan = self.plan
        assert server.address is not None
        records = plan.batches_per_run(variant) * variant.batch_messages
        if variant.kind == "read-sub":
            started = time.monotonic()
            self.say(f"  {label}: filling the topic (not timed)")
            cmd = self.loadgen_command([server.address], variant, ack=1)
            fill = await self.client([server], cmd, result, lambda _: None)
            result.fill_s = time.monotonic() - started
            if fill and not fill["ok"]:
                result.errors.append(f"the fill failed: {'; '.join(fill['errors'])}")
            if result.errors:
                return
            records = fill["messages"]
        host, port = server.address
        cmd = [
            *(sys.executable, "-m", "trio_embarcadero.tools.reader"),
            *("--host", host, "--port", str(port)),
            *("--connections", str(variant.readers), "--records", str(records)),
            *("--message-size", str(plan.message_size)),
            *("--seconds", str(plan.seconds), "--interval", str(PROGRESS_INTERVAL)),
        ]
        track = self.progress(label, server, result, "payload_bytes", acks=False)
        final = await self.measure(
            [server], result, functools.partial(self.client, [server], cmd, result, track)
        )
        if not final:
            return
        _take_result(result, final)
        result.wire_bytes = final["received_bytes"]
        result.batches = final["messages"] // variant.batch_messages
        result.loadgen_cpu_s = final["reader_cpu_s"]

    def progress(
        self, label: str, server: Server, result: RunResult, key: str, *, acks: bool
    ) -> Callable[[dict[str, Any]], None]:
        """What takes a client's progress lines: ``result.series`` (the
        payload bytes under ``key``) and a live line a second."""
        last = [0.0, 0]  # elapsed, bytes at the previous live line

        def track(record: dict[str, Any]) -> None:
            elapsed, moved = record["elapsed"], record[key]
            result.series.append((elapsed, moved))
            if elapsed - last[0] >= _LIVE_INTERVAL - 1e-3:
                rate = (moved - last[1]) / (elapsed - last[0])
                sent_msgs = record.get("sent_msgs")
                acked = record["acked_msgs"] / sent_msgs if acks and sent_msgs else None
                self.say(self.live_line(label, elapsed, rate, acked, server))
                last[:] = [elapsed, moved]

        return track

    async def measure(
        self,
        servers: list[Server],
        result: RunResult,
        run: Callable[[], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        """Await ``run()`` (a client's run) with the servers' CPU time and
        memory measured around it; returns what it returns. Several servers
        (a cluster's brokers): their CPU and private memory added up, the
        largest peak RSS (each maps the one region), the first one's pool."""
        cpu0 = [process_cpu_seconds(s.process.pid) for s in servers]
        memory0 = [process_memory(s.process.pid) for s in servers]
        final = await run()
        server = servers[0]
        if server.variant.is_broker and server.process.returncode is None:
            # One more statistics line, so short runs get their pool peak too.
            server.stats_seen = trio.Event()
            with trio.move_on_after(_STATS_INTERVAL * 1.5):
                await server.stats_seen.wait()
        cpu1 = [process_cpu_seconds(s.process.pid) for s in servers]
        memory1 = [process_memory(s.process.pid) for s in servers]
        result.server_cpus = sorted({cpu for s in servers for cpu in process_cpus(s.process.pid)})
        result.client_cpus = final.get("cpus", [])
        self.check_pinning(result)
        for each in servers:
            if each.process.returncode is not None:
                result.receiver_failed = True
                result.errors.append(
                    f"receiver died ({each.process.returncode}): " + " | ".join(each.tail)
                )
        spent = [after - before for before, after in zip(cpu0, cpu1, strict=True)]
        result.server_cpu_s = sum(spent)
        if server.variant.is_cluster:
            result.broker_cpu_s = spent
        result.server_peak_rss = max(
            m1.get("VmHWM", m0.get("VmHWM", 0)) for m0, m1 in zip(memory0, memory1, strict=True)
        )
        result.server_peak_anon = max(
            result.server_peak_anon, sum(m.get("RssAnon", 0) for m in memory1)
        )
        result.pool_peak, result.pool_size, result.pauses = (
            server.pool_peak,
            server.pool_size,
            server.pauses,
        )
        return final

    def check_pinning(self, result: RunResult) -> None:
        """Fail ``result`` if ``--pin`` did not hold: a server thread or the
        client ran on a CPU outside its set (say, one started before it was pinned)."""
        pin = self.plan.pin
        if pin is None:
            return
        for role, found in (("servers", result.server_cpus), ("clients", result.client_cpus)):
            wanted = list(getattr(pin, role))
            if found and found != wanted:  # empty: gone before it was read; the run says why
                result.errors.append(
                    f"--pin did not hold: the {role} could run on CPUs {cpu_list_text(found)}, "
                    f"not only {cpu_list_text(wanted)}"
                )

    async def client(
        self,
        servers: list[Server],
        cmd: list[str],
        result: RunResult,
        on_progress: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any]:
        """Run one client process (load generator or reader) to its end, handing
        its progress lines to ``on_progress`` and sampling the servers' private
        memory (added up); returns its result line ({} if none: the reason is
        in ``result.errors``)."""
        final: dict[str, Any] = {}
        stderr: deque[str] = deque(maxlen=10)
        name = cmd[2].rpartition(".")[2]

        def on_line(line: str) -> None:
            try:
                record = json.loads(line)
            except ValueError:
                stderr.append(line)
                return
            if record.get("type") == "result":
                final.update(record)
                # The client's own window, on the clock its stall probes share.
                now = time.monotonic()
                result.window = (now - float(record["elapsed_s"]), now)
            elif record.get("type") == "progress":
                on_progress(record)

        process = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.pin(process, "clients")
        try:
            async with trio.open_nursery() as pumps:
                pumps.start_soon(pump, process.stdout, on_line)
                pumps.start_soon(pump, process.stderr, stderr.append)
                with trio.move_on_after(self.plan.seconds + 120) as scope:
                    while process.poll() is None:
                        anon = sum(process_memory(s.process.pid).get("RssAnon", 0) for s in servers)
                        result.server_peak_anon = max(result.server_peak_anon, anon)
                        if any(s.process.poll() is not None for s in servers):
                            break
                        with trio.move_on_after(0.5):
                            await process.wait()
                if scope.cancelled_caught:
                    result.errors.append(f"{name} did not finish in time")
        finally:
            await stop_process(process, signal.SIGKILL if result.errors else signal.SIGTERM)
        if not final:
            result.errors.append(f"{name} failed: " + " | ".join(stderr))
        return final

    def live_line(
        self, label: str, elapsed: float, rate: float, acked: float | None, server: Server
    ) -> str:
        """The once-a-second line during a run."""
        parts = [
            f"  {label} {elapsed:5.1f}s",
            f"{rate / 1e6:8.0f} MB/s",
            f"{rate / self.plan.message_size / 1e6:6.2f} M msg/s",
        ]
        if acked is not None:
            parts.append(f"acked {acked:4.0%}")
        if server.pool_size is not None:
            parts.append(
                f"pool {server.pool_used}/{server.pool_size} (peak {server.pool_peak})"
                f" pauses {server.pauses}"
            )
        return "  ".join(parts)
