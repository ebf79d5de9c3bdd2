"""What the bench reports: per-variant summaries and ratios, the table, the JSON, the plot.

:func:`build_report` turns a finished :class:`~.runner.Bench` into the
JSON-ready report (``--json``); :func:`render_table` prints it for people;
:func:`plot` draws throughput over time and the latency CDF (``--plot``).
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import trio

from ..procfs import cpu_list_text
from .plan import PROGRESS_INTERVAL, Pinning, Plan, Variant
from .results import RunResult, percentile_source, percentiles_ms
from .runner import Bench
from .stalls import QUIET_STALL_MS

#: The variants the ratio columns compare against (the fair and the best receiver).
BASELINE = "trio-sink"
BEST_RAW = "raw-sink"
#: The read path's baseline, the minimal sender (as many readers as the variant).
READ_BASELINE = "read-sink"
#: Targets from issue 4, printed next to the measured ratios.
TARGET_VS_TRIO_SINK = 0.90
TARGET_VS_RAW_SINK = 0.75
#: Targets from issue 11: subscribers next to the minimal sender, and ack latency
#: under paced load (p99 at 80 % of the peak, meant for 64 KiB batches).
TARGET_VS_READ_SINK = 0.80
TARGET_P99_MS = 5.0
TARGET_P99_RATE = 0.8
#: Issue 10: a run with retention keeps within 5 % of one without.
TARGET_RETENTION_COST = 0.05
#: Issue 12: order 5 (one total order across the brokers) moves at least this
#: much of order 0's GB/s with as many brokers (Embarcadero's own costs ~14 %).
TARGET_ORDER5_VS_ORDER0 = 0.85


# -- summaries -------------------------------------------------------------------------


def _spread(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def summarize(plan: Plan, runs: Sequence[RunResult]) -> dict[str, Any]:
    """Per-variant medians, spreads, ratios and pooled latency percentiles
    (of the unpaced runs), and per ``--rate`` the paced runs' figures."""
    good = [r for r in runs if r.ok and r.rate is None]
    medians: dict[str, float] = {}
    per_round: dict[tuple[str, int], float] = {}
    for run in good:
        per_round[(run.variant, run.round)] = run.gb_per_s
    for v in plan.variants:
        values = [r.gb_per_s for r in good if r.variant == v.name]
        if values:
            medians[v.name] = statistics.median(values)

    def ratio(name: str, base: Variant | None) -> float | None:
        if base is None or name not in medians or not medians.get(base.name):
            return None
        return medians[name] / medians[base.name]

    def paired(name: str, base: Variant | None) -> float | None:
        if base is None:
            return None
        # Same-round ratios, so drift between rounds cancels out.
        pairs = [
            per_round[(name, rnd)] / per_round[(base.name, rnd)]
            for rnd in range(1, plan.rounds + 1)
            if (name, rnd) in per_round and per_round.get((base.name, rnd))
        ]
        return statistics.median(pairs) if pairs else None

    variants: dict[str, Any] = {}
    for v in plan.variants:
        mine = [r for r in good if r.variant == v.name]
        bases = _baselines(plan, v)
        latency = [x for r in mine for x in r.latency_us]
        after_send = [x for r in mine for x in r.latency_after_send_us]
        pool_peaks = [r.pool_peak for r in mine if r.pool_peak is not None]
        pauses = [r.pauses for r in mine if r.pauses is not None]
        cpu = _spread([r.cpu_s_per_gb for r in mine])
        variants[v.name] = {
            "receiver": v.kind,
            "ack": v.ack,
            "readers": v.readers,
            "tags": list(v.tags),
            "broker_options": v.options,
            "batch_messages": v.batch_messages,
            "batch_total_size": plan.batch_total_size(v),
            "bytes_per_run": plan.batches_per_run(v) * plan.batch_payload(v),
            "cxl_size_mb": plan.cxl_size_mb(v) if v.is_broker else None,
            "runs": len(mine),
            "failed_runs": sum(
                1 for r in runs if r.variant == v.name and r.rate is None and not r.ok
            ),
            "gb_per_s": _spread([r.gb_per_s for r in mine]),
            "msgs_per_s": _spread([r.msgs_per_s for r in mine]),
            **{f"ratio_to_{key}": ratio(v.name, base) for key, base in bases.items()},
            **{f"paired_ratio_to_{key}": paired(v.name, base) for key, base in bases.items()},
            "latency_ms": percentiles_ms(latency),
            "latency_after_send_ms": percentiles_ms(after_send),
            "server_cpu_s_per_gb": cpu,
            "busy": _spread(_busy(mine)),
            "server_peak_rss_bytes": max((r.server_peak_rss for r in mine), default=None),
            "server_peak_anon_bytes": max((r.server_peak_anon for r in mine), default=None),
            "loadgen_cpu_s_per_gb": _spread(
                [r.loadgen_cpu_s / (r.payload_bytes / 1e9) for r in mine if r.payload_bytes]
            ),
            "pool_peak": max(pool_peaks, default=None),
            "pool_size": next((r.pool_size for r in mine if r.pool_size is not None), None),
            "pauses": _spread([float(p) for p in pauses]),
            "time_bounded_runs": sum(1 for r in mine if r.time_bounded),
            "storage_bytes": _spread(
                [float(r.storage_bytes) for r in mine if r.storage_bytes is not None]
            ),
            "paced": (
                [_paced(v, rate, runs, cpu["median"]) for rate in plan.rates] if v.paced else []
            ),
            "brokers": v.brokers,
            "order": v.order,
            "session": v.session,
            "connections": plan.connections_for(v),
            # Cluster runs: each broker's share (by id), median over rounds.
            "broker_gb_per_s": _per_broker([r.broker_gb_per_s for r in mine]),
            # Each broker's CPU seconds per GB it received (broker 0's
            # include the sequencer), median over rounds.
            "broker_cpu_s_per_gb": _per_broker(
                [
                    [
                        cpu / (got / 1e9) if got else 0.0
                        for cpu, got in zip(r.broker_cpu_s, r.broker_payload_bytes, strict=True)
                    ]
                    for r in mine
                    if r.broker_cpu_s and r.broker_payload_bytes
                ]
            ),
        }
    return variants


def _per_broker(rows: Sequence[Sequence[float]]) -> list[float]:
    """Per broker (column), the median over the runs (rows) that have a figure
    for every broker."""
    rows = [row for row in rows if row]
    return [statistics.median(column) for column in zip(*rows, strict=True)] if rows else []


def _baselines(plan: Plan, v: Variant) -> dict[str, Variant | None]:
    """What ``v``'s ratios compare it with, by the key of the ratio (None: not run,
    or not a comparison that means anything for ``v``)."""
    ingest = not v.is_read
    return {
        "trio_sink": (
            plan.counterpart(v, kind=BASELINE, ack=1, tags=(), brokers=1, order=0, session=False)
            if ingest
            else None
        ),
        "raw_sink": (
            plan.counterpart(v, kind=BEST_RAW, ack=1, tags=(), brokers=1, order=0, session=False)
            if ingest
            else None
        ),
        # The minimal sender serving as many readers.
        "read_sink": None if ingest else plan.counterpart(v, kind=READ_BASELINE, tags=()),
        # The broker at ack 0 or 2 next to the same path at ack 1: the cost
        # of durability (ack 2) or of waiting for acks at all (ack 0).
        "ack1": plan.counterpart(v, ack=1) if ingest and v.is_broker and v.ack != 1 else None,
        # Retention and other +tags next to the same variant without them.
        "untagged": plan.counterpart(v, tags=()) if v.tags else None,
        # A cluster's order 5 next to order 0 with as many brokers (the cost
        # of the total order), and N brokers next to one (the gain of more
        # broker processes).
        "order0": plan.counterpart(v, order=0) if v.is_cluster and v.order else None,
        "one_broker": plan.counterpart(v, brokers=1) if v.is_cluster and v.brokers > 1 else None,
        # Publishing in sessions next to the same variant publishing plainly.
        "plain": plan.counterpart(v, session=False) if v.session else None,
    }


def _paced(
    v: Variant, rate: float, runs: Sequence[RunResult], unpaced_cpu: float | None
) -> dict[str, Any]:
    """The figures of ``v``'s runs paced at ``rate`` of its peak, latencies
    pooled; ``unpaced_cpu`` is its unpaced runs' median CPU s/GB."""
    mine = [r for r in runs if r.variant == v.name and r.rate == rate]
    good = [r for r in mine if r.ok]
    cpu = _spread([r.cpu_s_per_gb for r in good])
    return {
        "rate": rate,
        "runs": len(good),
        "failed_runs": len(mine) - len(good),
        "offered_gb_per_s": _spread([(r.offered_bytes_per_s or 0.0) / 1e9 for r in good]),
        "gb_per_s": _spread([r.gb_per_s for r in good]),
        "latency_ms": percentiles_ms([x for r in good for x in r.latency_us]),
        # Pooled, one run that fell behind its schedule (a peak measured high,
        # so the offered rate was more than that run could take) is the p99
        # of all; each run's own p99 shows whether that is the rule.
        "p99_per_run_ms": _spread(
            [p99 for r in good if (p99 := percentiles_ms(r.latency_us)["p99"]) is not None]
        ),
        "latency_after_send_ms": percentiles_ms([x for r in good for x in r.latency_after_send_us]),
        "send_lag_ms": percentiles_ms([x for r in good for x in r.send_lag_us]),
        "time_bounded_runs": sum(1 for r in good if r.time_bounded),
        # What the receiver spent: a batch that arrives alone wakes it, and a
        # wake-up costs CPU of its own, so a paced batch costs more than an
        # unpaced one. How busy that leaves the receiver says how much room
        # it has to catch up after a stall.
        "server_cpu_s_per_gb": cpu,
        "cpu_vs_unpaced": (
            cpu["median"] / unpaced_cpu if cpu["median"] is not None and unpaced_cpu else None
        ),
        "busy": _spread(_busy(good)),
        "machine_stalls": _stalls(good),
    }


def _stalls(runs: Sequence[RunResult]) -> dict[str, Any] | None:
    """``--stall-probe``: the longest stall of the machine in each run, and each
    run's own p99 split by whether the machine was quiet (None: not probed)."""
    probed = [r for r in runs if r.longest_stall_ms is not None]
    if not probed:
        return None
    quiet = [r for r in probed if (r.longest_stall_ms or 0.0) <= QUIET_STALL_MS]
    stalled = [r for r in probed if (r.longest_stall_ms or 0.0) > QUIET_STALL_MS]

    def p99s(group: Sequence[RunResult]) -> dict[str, Any]:
        return _spread(
            [p99 for r in group if (p99 := percentiles_ms(r.latency_us)["p99"]) is not None]
        )

    return {
        "longest_ms": _spread([r.longest_stall_ms or 0.0 for r in probed]),
        "quiet_runs": len(quiet),
        "p99_quiet_runs_ms": p99s(quiet),
        "p99_stalled_runs_ms": p99s(stalled),
    }


def _busy(runs: Sequence[RunResult]) -> list[float]:
    """Each run's receiver CPU seconds per second of the run (1.0: one CPU all the time)."""
    return [r.server_cpu_s / r.elapsed_s for r in runs if r.elapsed_s]


# -- the table, the notes, the JSON, the plot ------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def _median_range(spread: dict[str, Any], spec: str = ".2f") -> str:
    """A :func:`_spread` as ``median [min-max]``."""
    return (
        f"{_fmt(spread['median'], spec)} [{_fmt(spread['min'], spec)}-{_fmt(spread['max'], spec)}]"
    )


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """``rows`` under ``columns``, each column as wide as its widest cell."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return lines


def _latency(lat: dict[str, Any], empty: str) -> str:
    """``p50/p99/p99.9`` in ms, or ``empty`` without samples."""
    return "/".join(_fmt(lat[k], ".1f") for k in ("p50", "p99", "p99.9")) if lat["count"] else empty


def render_table(report: dict[str, Any]) -> str:
    """The human-readable summary of a report made by :func:`build_report`."""
    setup = report["setup"]
    shapes = ", ".join(
        f"{b['messages']} per batch ({b['total_size']:,} B batch payload)"
        for b in setup["batch_sizes"]
    )
    head = (
        f"trio-embarcadero bench: {setup['rounds']} round(s) of "
        f"{', '.join(setup['variants'])}; {setup['connections']} connection(s), "
        f"{setup['message_size']} B messages, {shapes}, "
        f"{setup['bytes_per_run'] / 1e9:.2f} GB of message payload per run"
    )
    if setup["pin"] is not None:
        head += "; " + Pinning(**{k: tuple(v) for k, v in setup["pin"].items()}).describe()
    send_buffer = setup["send_buffer"]
    if not send_buffer:
        head += "; publisher send buffer autotuned by the kernel"
    elif send_buffer % 1024:  # as given, not rounded down to a KiB figure
        head += f"; publisher send buffer {send_buffer:,} B"
    else:
        head += f"; publisher send buffer {send_buffer // 1024} KiB"
    reading = any(v["readers"] for v in report["variants"].values())
    probed = setup.get("stall_probe") is not None
    columns = [
        "variant",
        "GB/s median [min-max]",
        "M msg/s",
        "x trio-sink",
        "x raw-sink",
        *(["x read-sink"] if reading else []),
        "ack ms p50/p99/p99.9",
        "CPU s/GB",
        "RSS MiB (anon)",
        "pool peak",
        "pauses",
    ]
    rows: list[list[str]] = []
    for name, v in report["variants"].items():
        gb = v["gb_per_s"]
        rss = v["server_peak_rss_bytes"]
        anon = v["server_peak_anon_bytes"]
        rows.append(
            [
                name + ("" if not v["failed_runs"] else f" ({v['failed_runs']} failed)"),
                _median_range(gb),
                _fmt(v["msgs_per_s"]["median"] and v["msgs_per_s"]["median"] / 1e6),
                _fmt(v["ratio_to_trio_sink"]),
                _fmt(v["ratio_to_raw_sink"]),
                *([_fmt(v["ratio_to_read_sink"])] if reading else []),
                _latency(v["latency_ms"], "-" if v["readers"] else "- (ack 0)"),
                _fmt(v["server_cpu_s_per_gb"]["median"]),
                f"{rss / 2**20:.0f} ({anon / 2**20:.0f})" if rss else "-",
                f"{v['pool_peak']}/{v['pool_size']}" if v["pool_size"] else "-",
                _fmt(v["pauses"]["median"], ".0f"),
            ]
        )
    lines = [head, "", *_table(columns, rows), ""]
    paced = [
        [
            name + ("" if not p["failed_runs"] else f" ({p['failed_runs']} failed)"),
            f"{p['rate'] * 100:g}%",
            _fmt(p["offered_gb_per_s"]["median"]),
            _median_range(p["gb_per_s"]),
            _latency(p["latency_ms"], "-"),
            _median_range(p["p99_per_run_ms"], ".1f"),
            _fmt(p["send_lag_ms"]["p99"], ".2f"),
            _fmt(p["server_cpu_s_per_gb"]["median"])
            + (f" ({p['cpu_vs_unpaced']:.2f}x)" if p["cpu_vs_unpaced"] else ""),
            _fmt(p["busy"]["median"]),
            *([_stall_cell(p["machine_stalls"])] if probed else []),
        ]
        for name, v in report["variants"].items()
        for p in v["paced"]
    ]
    clusters = [
        [
            name + ("" if not v["failed_runs"] else f" ({v['failed_runs']} failed)"),
            str(v["brokers"]),
            str(v["order"]),
            _median_range(v["gb_per_s"]),
            " + ".join(_fmt(x) for x in v["broker_gb_per_s"]) or "-",
            _fmt(v["ratio_to_order0"]),
            _fmt(v["ratio_to_one_broker"]),
            _latency(v["latency_ms"], "- (ack 0)"),
            _fmt(v["server_cpu_s_per_gb"]["median"]),
            " / ".join(_fmt(x) for x in v["broker_cpu_s_per_gb"]) or "-",
        ]
        for name, v in report["variants"].items()
        if v["receiver"] == "cluster"
    ]
    if clusters:
        lines.append("Clusters: broker processes on one region, the load spread over them")
        columns = [
            "variant",
            "brokers",
            "order",
            "GB/s median [min-max]",
            "per broker GB/s",
            "x order 0",
            "x 1 broker",
            "ack ms p50/p99/p99.9",
            "CPU s/GB",
            "per broker CPU s/GB",
        ]
        lines.extend([*_table(columns, clusters), ""])
    if paced:
        lines.append("Paced load: ack latency from each batch's scheduled send, pooled over rounds")
        columns = [
            "variant",
            "rate",
            "offered GB/s",
            "GB/s median [min-max]",
            "ack ms p50/p99/p99.9",
            "p99 ms a run: median [min-max]",
            "send lag ms p99",
            "CPU s/GB (x unpaced)",
            "busy",
            *(["longest machine stall ms (quiet runs)"] if probed else []),
        ]
        lines.extend([*_table(columns, paced), ""])
    lines.extend(report["notes"])
    return "\n".join(lines)


def _stall_cell(stalls: dict[str, Any] | None) -> str:
    """``"3.1 [0.0-27.6] (2/5)"``: the longest stall a run, and how many runs were quiet."""
    if stalls is None:
        return "-"
    longest = stalls["longest_ms"]
    return f"{_median_range(longest, '.1f')} ({stalls['quiet_runs']}/{len(longest['values'])})"


def _notes(
    plan: Plan,
    variants: dict[str, Any],
    storage: dict[str, Any] | None,
    stall_probe: dict[str, Any] | None = None,
) -> list[str]:
    """The lines under the tables: what the columns mean, the load generator's own rate,
    the ack-2 set-up and cost, the stall probe, the targets, and runs cut short by
    ``--seconds``."""
    notes = [
        "GB/s: message payload (message size x messages, 10**9 B) from the first send to the "
        "last ack (ack 1 and 2) or to the receiver closing after reading everything (ack 0).",
        "x trio-sink / x raw-sink: ratio of medians; same-round (paired) ratios are in --json.",
        "ack ms: per batch, from the start of its sendall to the ack covering it (includes "
        "time blocked on a full socket), pooled over rounds; after-send latency is in --json.",
        "CPU s/GB: the receiver process (broker or sink), utime+stime over the run. "
        "RSS: VmHWM, which for the broker includes the mapped CXL region; (anon) is the "
        "private part (peak RssAnon sampled every 0.5 s).",
    ]
    if any(v["readers"] for v in variants.values()):
        notes.append(
            "Read variants: GB/s is the message payload delivered to the reader process (every "
            "connection reads the whole topic from offset 0; all connections together), from "
            "the subscribe handshakes to the last byte; the broker's topic is filled first, "
            "not timed. x read-sink: against the minimal sender with as many readers. CPU "
            "s/GB: the sender (broker or read-sink) while the readers read."
        )
    if any(v["receiver"] == "cluster" for v in variants.values()):
        notes.append(
            "Clusters: clusterN-orderO runs N broker processes on one region (serve "
            "--broker-id i, the direct path), the topic of order O (5: one total order across "
            "them, given by broker 0's sequencer; acks wait for it); the load generator spreads "
            "its connections over them round-robin (at least 2 a broker, all drawing from one "
            "budget). GB/s: all brokers together; per broker: each one's share over the same "
            "window. CPU s/GB: every broker process together (per broker: over what it "
            "received; broker 0's includes the sequencer). x order 0: against the same number "
            "of brokers at order 0; x 1 broker: against one broker at the same order."
        )
    if plan.rates:
        notes.append(
            "Paced: each ingest variant with acks, right after its unpaced run, is offered "
            "that fraction of the run's GB/s, every connection sending on a fixed schedule; "
            "ack latency runs from a batch's scheduled send (so a batch queued behind late "
            "ones counts its wait), send lag is how late its send began. Paced runs stop at "
            "--seconds too (low rates): their percentiles need no fixed byte count. CPU s/GB: "
            "the receiver's, against its unpaced runs' (a batch that arrives alone pays for "
            "waking the receiver); busy: its CPU seconds per second of the run (1.00: one CPU "
            "all the time), which leaves 1 - busy to catch up after a stall."
        )
    for name, raw in variants.items():
        if raw["receiver"] == BEST_RAW and raw["gb_per_s"]["median"]:
            notes.append(
                f"Load generator alone: {raw['gb_per_s']['median']:.2f} GB/s median "
                f"[{raw['gb_per_s']['min']:.2f}-{raw['gb_per_s']['max']:.2f}] into {name} "
                f"(its own CPU {_fmt(raw['loadgen_cpu_s_per_gb']['median'])} s/GB)."
            )
    if storage is not None:
        notes.append(
            f"ack 2: the count comes once the batch is fdatasync'ed to the broker's disk log "
            f"(a fresh directory per run under {storage['dir']}, {storage['filesystem']}); "
            f"group commit: one sync {storage['sync_interval_ms']:g} ms after the first "
            f"unsynced commit, or once {storage['sync_bytes'] / 2**20:g} MiB wait."
        )
    if stall_probe is not None:
        priority = (
            "at real-time priority, so a late wake-up is the machine's (a hypervisor's pause, "
            "a kernel section that cannot be preempted), not a busy process's"
            if stall_probe["realtime"]
            else "NOT at real-time priority (it needs root or CAP_SYS_NICE), so its stalls "
            "include waits behind the bench's own busy processes"
        )
        notes.append(
            f"Machine stalls: a probe on each of CPUs {cpu_list_text(stall_probe['cpus'])} "
            f"sleeps {stall_probe['period_ms']:g} ms in a loop, {priority}; a stall is a "
            f"wake-up over {stall_probe['threshold_ms']:g} ms late, and a run is quiet when "
            f"none in its window was over {stall_probe['quiet_ms']:g} ms."
        )
    by_variant = {v.name: v for v in plan.variants}
    for name, v in variants.items():
        notes.extend(_variant_notes(plan, by_variant[name], v, variants))
    bounded = [n for n, v in variants.items() if v["time_bounded_runs"]]
    if bounded:
        notes.append(f"Stopped by --seconds {plan.seconds:g} before --bytes: {', '.join(bounded)}.")
    return notes


def _cost_note(
    title: str,
    name: str,
    base: str,
    key: str,
    v: dict[str, Any],
    variants: dict[str, Any],
    target: str = "",
) -> str:
    """A line saying what ``name`` moves next to ``base`` (its ratio under
    ``key``) and both ack latencies."""
    mine, theirs = v["latency_ms"], variants[base]["latency_ms"]
    paired = v[f"paired_ratio_to_{key}"]
    return (
        f"{title}: {name} moves {v[f'ratio_to_{key}']:.0%} of {base}'s GB/s (same-round "
        f"median {_fmt(paired and paired * 100, '.0f')}%{target}); ack p50 "
        f"{_fmt(theirs['p50'], '.1f')} -> {_fmt(mine['p50'], '.1f')} ms, p99 "
        f"{_fmt(theirs['p99'], '.1f')} -> {_fmt(mine['p99'], '.1f')} ms."
    )


def _variant_notes(
    plan: Plan, variant: Variant, v: dict[str, Any], variants: dict[str, Any]
) -> list[str]:
    """One variant's lines under the tables: its costs next to its counterparts
    and its targets."""
    notes = []
    ack1 = plan.counterpart(variant, ack=1)
    if variant.durable and ack1 is not None and v["ratio_to_ack1"] is not None:
        notes.append(
            _cost_note(f"Ack-2 cost ({variant.kind})", variant.name, ack1.name, "ack1", v, variants)
        )
    order0 = plan.counterpart(variant, order=0)
    if variant.is_cluster and variant.order and order0 is not None and v["ratio_to_order0"]:
        notes.append(
            _cost_note(
                f"Order-5 cost ({variant.brokers} broker(s))",
                variant.name,
                order0.name,
                "order0",
                v,
                variants,
                f"; target >= {TARGET_ORDER5_VS_ORDER0:.0%}",
            )
        )
    plain = plan.counterpart(variant, session=False)
    if variant.session and plain is not None and v["ratio_to_plain"] is not None:
        notes.append(_cost_note("Session cost", variant.name, plain.name, "plain", v, variants))
    untagged = plan.counterpart(variant, tags=())
    if variant.tags and untagged is not None and v["ratio_to_untagged"] is not None:
        paired = v["paired_ratio_to_untagged"]
        target = (
            f" (target: within {TARGET_RETENTION_COST:.0%})" if "retention" in variant.tags else ""
        )
        notes.append(
            f"{'+'.join(('', *variant.tags))} cost: {variant.name} moves "
            f"{v['ratio_to_untagged']:.0%} of {untagged.name}'s GB/s (same-round median "
            f"{_fmt(paired and paired * 100, '.0f')}%){target}."
        )
    if variant.kind in ("staged", "direct") and variant.ack in (0, 1) and not variant.tags:
        vs_trio, vs_raw = v["ratio_to_trio_sink"], v["ratio_to_raw_sink"]
        if variant.kind == "staged" and (vs_trio is not None or vs_raw is not None):
            notes.append(
                f"Targets ({variant.name}): >= {TARGET_VS_TRIO_SINK:.0%} of {BASELINE} -> "
                f"{_fmt(vs_trio and vs_trio * 100, '.0f')}%; >= {TARGET_VS_RAW_SINK:.0%} of "
                f"{BEST_RAW} -> {_fmt(vs_raw and vs_raw * 100, '.0f')}%."
            )
    if variant.kind == "read-sub" and v["ratio_to_read_sink"] is not None:
        notes.append(
            f"Target ({variant.name}): >= {TARGET_VS_READ_SINK:.0%} of {READ_BASELINE} with "
            f"{variant.readers} reader(s) -> {v['ratio_to_read_sink'] * 100:.0f}%."
        )
    notes.extend(
        f"Target ({variant.name}, {plan.batch_total_size(variant):,} B batches): ack "
        f"p99 < {TARGET_P99_MS:g} ms at {TARGET_P99_RATE:.0%} of the peak (meant for "
        f"64 KiB batches) -> {p['latency_ms']['p99']:.2f} ms pooled; a run's own p99 (median "
        f"[min-max] of {len(p['p99_per_run_ms']['values'])}): "
        f"{_median_range(p['p99_per_run_ms'])} ms; the broker was busy "
        f"{_median_range(p['busy'])} of each run (unpaced {_fmt(v['busy']['median'])})."
        + (
            ""
            if plan.pin is not None
            else " Not pinned: the scheduler may put the broker on its load generator's core "
            "(--pin keeps them apart)."
        )
        + _quiet_note(p["machine_stalls"])
        for p in v["paced"]
        if variant.is_broker and p["rate"] == TARGET_P99_RATE and p["latency_ms"]["count"]
    )
    return notes


def _quiet_note(stalls: dict[str, Any] | None) -> str:
    """The target note's words on the runs the machine left alone and the others."""
    if stalls is None:
        return ""
    quiet, stalled = stalls["p99_quiet_runs_ms"], stalls["p99_stalled_runs_ms"]
    text = (
        f" Runs with no machine stall over {QUIET_STALL_MS:g} ms: {len(quiet['values'])} of "
        f"{len(stalls['longest_ms']['values'])}"
    )
    if quiet["values"]:
        text += f", their p99 {_median_range(quiet)} ms"
    if stalled["values"]:
        text += f"; the others' {_median_range(stalled)} ms"
    return text + "."


def build_report(bench: Bench) -> dict[str, Any]:
    """The JSON-ready report of a finished bench."""
    plan = bench.plan
    variants = summarize(plan, bench.runs)
    storage = bench.storage_setup()
    first = plan.variants[0]
    shapes: dict[int, dict[str, Any]] = {}
    for v in plan.variants:
        shapes.setdefault(
            v.batch_messages,
            {
                "label": v.batch,
                "messages": v.batch_messages,
                "payload_bytes": plan.batch_payload(v),
                "total_size": plan.batch_total_size(v),
                "bytes_per_run": plan.batches_per_run(v) * plan.batch_payload(v),
            },
        )
    return {
        "setup": {
            "variants": [v.name for v in plan.variants],
            "rounds": plan.rounds,
            "connections": plan.connections,
            "message_size": plan.message_size,
            # These four are the first batch size's; every size is in batch_sizes.
            "batch_messages": first.batch_messages,
            "batch_payload_bytes": plan.batch_payload(first),
            "batch_total_size": plan.batch_total_size(first),
            "bytes_per_run": plan.batches_per_run(first) * plan.batch_payload(first),
            "batch_sizes": list(shapes.values()),
            "bytes_requested": plan.bytes,
            "seconds_limit": plan.seconds,
            "rates": list(plan.rates),
            "pin": None if plan.pin is None else plan.pin.to_json(),
            "send_buffer": plan.send_buffer,
            "stall_probe": None if bench.stall_probes is None else bench.stall_probes.setup(),
            "broker_options": plan.broker_options,
            "variant_options": {v.name: v.options for v in plan.variants if v.options},
            "broker_env": bench.broker_env,
            # The region of the broker variants without a size of their own.
            "cxl_size_mb": plan.cxl_size_mb(attrs.evolve(first, options={})),
            "storage": storage,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "trio": trio.__version__,
            "percentiles_from": percentile_source(),
        },
        "units": {
            "gb_per_s": "10**9 bytes of message payload per second (read variants: delivered "
            "to the reader, all connections together)",
            "latency_ms": "per batch, send start to covering ack (ack 2: durable on disk); "
            "paced runs: scheduled send to covering ack",
            "latency_after_send_ms": "per batch, send completion to covering ack",
            "send_lag_ms": "paced runs: per batch, scheduled send to the start of its sendall",
            "storage_bytes": "bytes in the ack-2 run's disk log after the broker stopped",
            "busy": "the receiver's CPU seconds (utime+stime) per second of the run",
            "cpu_vs_unpaced": "paced runs: the receiver's CPU s/GB over its unpaced runs' "
            "(ratio of medians)",
        },
        "variants": variants,
        "runs": [r.to_json() for r in bench.runs],
        "notes": _notes(
            plan,
            variants,
            storage,
            None if bench.stall_probes is None else bench.stall_probes.setup(),
        ),
        "ok": all(r.ok for r in bench.runs),
    }


def plot(report: dict[str, Any], runs: Sequence[RunResult], path: str) -> None:
    """Throughput over time (every unpaced run), the latency CDF (every
    variant) and, with ``--rate``, the latency CDF per variant and rate, as a PNG."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    rates = report["setup"]["rates"]
    fig, axes = plt.subplots(1, 3 if rates else 2, figsize=(19 if rates else 13, 5))
    left, right = axes[0], axes[1]
    colors: dict[str, Any] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name in report["variants"]:
        colors[name] = cycle[len(colors) % len(cycle)]
    labelled: set[str] = set()
    for run in runs:
        if not run.ok or run.rate is not None:
            continue
        # From the first send (0, 0) to the end of the window (everything sent).
        series = [(0.0, 0), *run.series, (run.elapsed_s, run.payload_bytes)]
        points = [
            (t1, (b1 - b0) / (t1 - t0) / 1e9)
            for (t0, b0), (t1, b1) in itertools.pairwise(series)
            if t1 > t0
        ]
        left.plot(
            [t for t, _ in points],
            [rate for _, rate in points],
            marker=".",
            color=colors[run.variant],
            label=None if run.variant in labelled else run.variant,
            alpha=0.8,
        )
        labelled.add(run.variant)
    left.set_xlabel("seconds since first send (read variants: since subscribing)")
    left.set_ylabel("GB/s sent or read (message payload)")
    left.set_title(f"Throughput over time (every run, {PROGRESS_INTERVAL:g} s steps)")
    if labelled:
        left.legend(fontsize="small")
    unpaced = [r for r in runs if r.ok and r.rate is None]
    curves = {
        name: [x for r in unpaced if r.variant == name for x in r.latency_us]
        for name in report["variants"]
    }
    _cdf(right, curves, colors, {})
    right.set_xlabel("ack latency per batch, ms (send start to ack)")
    right.set_title("Ack latency CDF (ack 1 and 2 variants, pooled rounds)")
    if rates:
        styles = dict(zip(rates, itertools.cycle(("-", "--", ":", "-.")), strict=False))
        paced: dict[str, list[int]] = {}
        color_of: dict[str, Any] = {}
        style_of: dict[str, str] = {}
        for name in report["variants"]:
            for rate in rates:
                key = f"{name} at {rate * 100:g}%"
                paced[key] = [
                    x for r in runs if r.ok and r.variant == name and r.rate == rate
                    for x in r.latency_us
                ]  # fmt: skip
                color_of[key], style_of[key] = colors[name], styles[rate]
        _cdf(axes[2], paced, color_of, style_of)
        axes[2].set_xlabel("ack latency per batch, ms (scheduled send to ack)")
        axes[2].set_title("Ack latency CDF at paced load (pooled rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cdf(
    axis: Any, curves: dict[str, list[int]], colors: dict[str, Any], styles: dict[str, str]
) -> None:
    """One CDF per non-empty list of latencies (us) in ``curves``, on a log ms axis."""
    drawn = 0
    for label, latencies in curves.items():
        values = np.sort(np.array(latencies))
        if len(values):
            axis.plot(
                values / 1000,
                np.arange(1, len(values) + 1) / len(values),
                color=colors[label],
                linestyle=styles.get(label, "-"),
                label=label,
            )
            drawn += 1
    axis.set_xscale("log")
    axis.set_ylabel("fraction of batches")
    if drawn:
        axis.legend(fontsize="small")
