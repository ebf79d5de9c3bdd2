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

import numpy as np
import trio

from .plan import PROGRESS_INTERVAL, Plan
from .results import RunResult, percentile_source, percentiles_ms
from .runner import Bench

#: The variants the ratio columns compare against (the fair and the best receiver).
BASELINE = "trio-sink"
BEST_RAW = "raw-sink"
#: Targets from issue 4, printed next to the measured ratios.
TARGET_VS_TRIO_SINK = 0.90
TARGET_VS_RAW_SINK = 0.75


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
    """Per-variant medians, spreads, ratios and pooled latency percentiles."""
    good = [r for r in runs if r.ok]
    medians: dict[str, float] = {}
    per_round: dict[tuple[str, int], float] = {}
    for run in good:
        per_round[(run.variant, run.round)] = run.gb_per_s
    for v in plan.variants:
        values = [r.gb_per_s for r in good if r.variant == v.name]
        if values:
            medians[v.name] = statistics.median(values)

    def ratio(name: str, base: str) -> float | None:
        if name not in medians or base not in medians or not medians[base]:
            return None
        return medians[name] / medians[base]

    def paired(name: str, base: str) -> float | None:
        # Same-round ratios, so drift between rounds cancels out.
        pairs = [
            per_round[(name, rnd)] / per_round[(base, rnd)]
            for rnd in range(1, plan.rounds + 1)
            if (name, rnd) in per_round and per_round.get((base, rnd))
        ]
        return statistics.median(pairs) if pairs else None

    variants: dict[str, Any] = {}
    for v in plan.variants:
        mine = [r for r in good if r.variant == v.name]
        # The broker at ack 0 or 2 next to the same path at ack 1: the cost of
        # durability (ack 2) or of waiting for acks at all (ack 0).
        ack1 = f"{v.kind}-ack1" if v.is_broker and v.ack != 1 else None
        latency = [x for r in mine for x in r.latency_us]
        after_send = [x for r in mine for x in r.latency_after_send_us]
        pool_peaks = [r.pool_peak for r in mine if r.pool_peak is not None]
        pauses = [r.pauses for r in mine if r.pauses is not None]
        variants[v.name] = {
            "receiver": v.kind,
            "ack": v.ack,
            "runs": len(mine),
            "failed_runs": sum(1 for r in runs if r.variant == v.name and not r.ok),
            "gb_per_s": _spread([r.gb_per_s for r in mine]),
            "msgs_per_s": _spread([r.msgs_per_s for r in mine]),
            "ratio_to_trio_sink": ratio(v.name, BASELINE),
            "ratio_to_raw_sink": ratio(v.name, BEST_RAW),
            "paired_ratio_to_trio_sink": paired(v.name, BASELINE),
            "paired_ratio_to_raw_sink": paired(v.name, BEST_RAW),
            "ratio_to_ack1": ratio(v.name, ack1) if ack1 else None,
            "paired_ratio_to_ack1": paired(v.name, ack1) if ack1 else None,
            "latency_ms": percentiles_ms(latency),
            "latency_after_send_ms": percentiles_ms(after_send),
            "server_cpu_s_per_gb": _spread([r.cpu_s_per_gb for r in mine]),
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
        }
    return variants


# -- the table, the notes, the JSON, the plot ------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def render_table(report: dict[str, Any]) -> str:
    """The human-readable summary of a report made by :func:`build_report`."""
    setup = report["setup"]
    head = (
        f"trio-embarcadero bench: {setup['rounds']} round(s) of "
        f"{', '.join(setup['variants'])}; {setup['connections']} connection(s), "
        f"{setup['message_size']} B messages, {setup['batch_messages']} per batch "
        f"({setup['batch_total_size']:,} B batch payload), "
        f"{setup['bytes_per_run'] / 1e9:.2f} GB of message payload per run"
    )
    columns = (
        "variant",
        "GB/s median [min-max]",
        "M msg/s",
        "x trio-sink",
        "x raw-sink",
        "ack ms p50/p99/p99.9",
        "CPU s/GB",
        "RSS MiB (anon)",
        "pool peak",
        "pauses",
    )
    rows: list[tuple[str, ...]] = []
    for name, v in report["variants"].items():
        gb = v["gb_per_s"]
        lat = v["latency_ms"]
        rss = v["server_peak_rss_bytes"]
        anon = v["server_peak_anon_bytes"]
        pauses = v["pauses"]["median"]
        rows.append(
            (
                name + ("" if not v["failed_runs"] else f" ({v['failed_runs']} failed)"),
                f"{_fmt(gb['median'])} [{_fmt(gb['min'])}-{_fmt(gb['max'])}]",
                _fmt(v["msgs_per_s"]["median"] and v["msgs_per_s"]["median"] / 1e6),
                _fmt(v["ratio_to_trio_sink"]),
                _fmt(v["ratio_to_raw_sink"]),
                "/".join(_fmt(lat[k], ".1f") for k in ("p50", "p99", "p99.9"))
                if lat["count"]
                else "- (ack 0)",
                _fmt(v["server_cpu_s_per_gb"]["median"]),
                f"{rss / 2**20:.0f} ({anon / 2**20:.0f})" if rss else "-",
                f"{v['pool_peak']}/{v['pool_size']}" if v["pool_size"] else "-",
                _fmt(pauses, ".0f"),
            )
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = [head, ""]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    lines.append("")
    lines.extend(report["notes"])
    return "\n".join(lines)


def _notes(plan: Plan, variants: dict[str, Any], storage: dict[str, Any] | None) -> list[str]:
    """The lines under the table: what the columns mean, the load generator's own rate,
    the ack-2 set-up and cost, the targets, and runs cut short by ``--seconds``."""
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
    for kind in ("staged", "direct"):
        durable, acked = variants.get(f"{kind}-ack2"), variants.get(f"{kind}-ack1")
        if durable is None or acked is None or durable["ratio_to_ack1"] is None:
            continue
        lat2, lat1 = durable["latency_ms"], acked["latency_ms"]
        paired = durable["paired_ratio_to_ack1"]
        notes.append(
            f"Ack-2 cost ({kind}): {kind}-ack2 moves {durable['ratio_to_ack1']:.0%} of "
            f"{kind}-ack1's GB/s (same-round median {_fmt(paired and paired * 100, '.0f')}"
            f"%); ack p50 {_fmt(lat1['p50'], '.1f')} -> {_fmt(lat2['p50'], '.1f')} ms, "
            f"p99 {_fmt(lat1['p99'], '.1f')} -> {_fmt(lat2['p99'], '.1f')} ms."
        )
    for name in ("staged-ack1", "staged-ack0"):
        v = variants.get(name)
        if v is None:
            continue
        vs_trio, vs_raw = v["ratio_to_trio_sink"], v["ratio_to_raw_sink"]
        if vs_trio is not None or vs_raw is not None:
            notes.append(
                f"Targets ({name}): >= {TARGET_VS_TRIO_SINK:.0%} of {BASELINE} -> "
                f"{_fmt(vs_trio and vs_trio * 100, '.0f')}%; >= {TARGET_VS_RAW_SINK:.0%} of "
                f"{BEST_RAW} -> {_fmt(vs_raw and vs_raw * 100, '.0f')}%."
            )
    bounded = [n for n, v in variants.items() if v["time_bounded_runs"]]
    if bounded:
        notes.append(f"Stopped by --seconds {plan.seconds:g} before --bytes: {', '.join(bounded)}.")
    return notes


def build_report(bench: Bench) -> dict[str, Any]:
    """The JSON-ready report of a finished bench."""
    plan = bench.plan
    variants = summarize(plan, bench.runs)
    storage = bench.storage_setup()
    return {
        "setup": {
            "variants": [v.name for v in plan.variants],
            "rounds": plan.rounds,
            "connections": plan.connections,
            "message_size": plan.message_size,
            "batch_messages": plan.batch_messages,
            "batch_payload_bytes": plan.batch_payload,
            "batch_total_size": plan.batch_total_size,
            "bytes_requested": plan.bytes,
            "bytes_per_run": plan.batches_per_run * plan.batch_payload,
            "seconds_limit": plan.seconds,
            "broker_options": plan.broker_options,
            "broker_env": bench.broker_env,
            "cxl_size_mb": plan.cxl_size_mb,
            "storage": storage,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "trio": trio.__version__,
            "percentiles_from": percentile_source(),
        },
        "units": {
            "gb_per_s": "10**9 bytes of message payload per second",
            "latency_ms": "per batch, send start to covering ack (ack 2: durable on disk)",
            "latency_after_send_ms": "per batch, send completion to covering ack",
            "storage_bytes": "bytes in the ack-2 run's disk log after the broker stopped",
        },
        "variants": variants,
        "runs": [r.to_json() for r in bench.runs],
        "notes": _notes(plan, variants, storage),
        "ok": all(r.ok for r in bench.runs),
    }


def plot(report: dict[str, Any], runs: Sequence[RunResult], path: str) -> None:
    """Throughput over time (every run) and the latency CDF (every variant) as a PNG."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors: dict[str, Any] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name in report["variants"]:
        colors[name] = cycle[len(colors) % len(cycle)]
    labelled: set[str] = set()
    for run in runs:
        if not run.ok:
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
    left.set_xlabel("seconds since first send")
    left.set_ylabel("GB/s sent (message payload)")
    left.set_title(f"Throughput over time (every run, {PROGRESS_INTERVAL:g} s steps)")
    if labelled:
        left.legend(fontsize="small")
    curves = 0
    for name in report["variants"]:
        values = np.sort(
            np.array([x for r in runs if r.ok and r.variant == name for x in r.latency_us])
        )
        if len(values):
            right.plot(
                values / 1000,
                np.arange(1, len(values) + 1) / len(values),
                color=colors[name],
                label=name,
            )
            curves += 1
    right.set_xscale("log")
    right.set_xlabel("ack latency per batch, ms (send start to ack)")
    right.set_ylabel("fraction of batches")
    right.set_title("Ack latency CDF (ack 1 and 2 variants, pooled rounds)")
    if curves:
        right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
