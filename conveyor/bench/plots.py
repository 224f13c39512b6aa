"""PNG plots for benchmark reports: latency CDFs, throughput versus rate, and the batch timeline.

Owns drawing only; inputs are records, step samples and report entries. Uses matplotlib's
object API (``Figure`` + Agg canvas), never ``pyplot``, so no global figure state and no display
is needed. Every function writes one file and returns its path.

The timeline puts batch slots on the y axis and steps on the x axis. Each request is a coloured
bar while it holds a slot and computes real tokens, and a grey hatched bar while it holds the slot
doing nothing useful (a finished member of a static batch waiting for the longest one): the
straggler problem at a glance. The strip below shows the queue depth and KV-cache occupancy.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from conveyor.bench.records import RequestRecord, StepSample

IDLE_COLOUR = "#d0d0d0"


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _cdf(ax, values_ms: list[float], label: str) -> None:
    if not values_ms:
        return
    xs = np.sort(np.asarray(values_ms))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    ax.step(np.r_[xs[0], xs], np.r_[0.0, ys], where="post", label=label)


def plot_latency_cdfs(runs: list[tuple[str, list[RequestRecord]]], path: str, title: str = "") -> str:
    """TTFT and end-to-end latency CDFs, one line per (label, records)."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for label, records in runs:
        ok = [r for r in records if r.success]
        _cdf(axes[0], [r.ttft * 1000 for r in ok if r.ttft is not None], label)
        _cdf(axes[1], [r.e2e * 1000 for r in ok], label)
    for ax, name in zip(axes, ("time to first token", "end-to-end latency")):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            lo, hi = ax.dataLim.x0, ax.dataLim.x1
            if lo > 0 and hi / lo > 50:
                ax.set_xscale("log")
    if any(ax.lines for ax in axes):
        axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "latency CDFs")
    return _save(fig, path)


def plot_throughput_vs_rate(entries: list[dict], path: str, title: str = "") -> str:
    """Output tokens/s and TTFT p99 versus offered request rate, one line per run label.

    An infinite rate ("inf", everything at once) is drawn at 1.5x the largest finite rate.
    """
    finite = [e["request_rate"] for e in entries if isinstance(e["request_rate"], (int, float))]
    inf_x = 1.5 * max(finite) if finite else 1.0
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for label in dict.fromkeys(e["label"] for e in entries):
        rows = [e for e in entries if e["label"] == label]
        xs = [inf_x if e["request_rate"] == "inf" else e["request_rate"] for e in rows]
        order = np.argsort(xs)
        tput = [rows[i]["summary"]["output_throughput"] for i in order]
        ttft = [rows[i]["summary"]["ttft_ms"]["p99"] for i in order]
        x_sorted = [xs[i] for i in order]
        axes[0].plot(x_sorted, tput, marker="o", label=label)
        axes[1].plot(x_sorted, [math.nan if v is None else v for v in ttft], marker="o", label=label)
    axes[0].set_ylabel("output tokens/s")
    axes[1].set_ylabel("TTFT p99 (ms)")
    for ax in axes:
        ax.set_xlabel("offered request rate (req/s)" + ("; rightmost = all at once" if "inf" in
                                                          [e["request_rate"] for e in entries] else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "throughput versus request rate")
    return _save(fig, path)


def timeline_segments(steps: list[StepSample]) -> list[tuple[str, int, int, int, bool]]:
    """(request id, slot, first step, number of steps, useful) for each maximal run of steps in which
    a request holds the same slot in the same state (useful or idle)."""
    open_seg: dict[tuple[str, int], list] = {}
    done = []
    for s in steps:
        useful = set(s.useful_ids)
        seen = set()
        for rid, slot in s.slot_of.items():
            key, state = (rid, slot), rid in useful
            seen.add(key)
            seg = open_seg.get(key)
            if seg is not None and seg[2] == state and seg[0] + seg[1] == s.index:
                seg[1] += 1
                continue
            if seg is not None:
                done.append((rid, slot, seg[0], seg[1], seg[2]))
            open_seg[key] = [s.index, 1, state]
        for key in [k for k in open_seg if k not in seen]:
            seg = open_seg.pop(key)
            done.append((key[0], key[1], seg[0], seg[1], seg[2]))
    done += [(k[0], k[1], seg[0], seg[1], seg[2]) for k, seg in open_seg.items()]
    return sorted(done, key=lambda t: (t[2], t[1]))


def plot_timeline(steps: list[StepSample], path: str, title: str = "") -> str:
    """The batch timeline (see the module docstring); needs a step log (in-process runs)."""
    fig = Figure(figsize=(12, 6))
    ax, strip = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    colours = {}
    palette = _palette()
    for rid, slot, start, width, useful in timeline_segments(steps):
        colour = colours.setdefault(rid, palette[len(colours) % len(palette)])
        if useful:
            ax.broken_barh([(start, width)], (slot - 0.4, 0.8), facecolors=colour, edgecolor="none")
        else:
            ax.broken_barh([(start, width)], (slot - 0.4, 0.8), facecolors=IDLE_COLOUR,
                           edgecolor="#888888", hatch="///", linewidth=0)
    num_slots = max((s.max_num_seqs for s in steps), default=1)
    ax.set_ylim(-0.6, num_slots - 0.4)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("batch slot")
    ax.invert_yaxis()
    ax.set_title(title or "batch timeline (coloured: computing; grey hatched: holding a slot idle)")
    idx = [s.index for s in steps]
    strip.step(idx, [s.num_waiting for s in steps], where="post", color="tab:red", lw=1)
    strip.set_ylabel("queued", color="tab:red")
    kv = strip.twinx()
    kv.step(idx, [s.kv_usage for s in steps], where="post", color="tab:blue", lw=1)
    kv.set_ylim(0, 1.05)
    kv.set_ylabel("KV used", color="tab:blue")
    strip.set_xlabel("engine step")
    strip.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def _palette() -> list:
    cmap = colormaps["tab20"]
    return [cmap(i) for i in range(cmap.N)]
