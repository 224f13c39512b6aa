"""Summarise a ``scripts/bench_peers.sh`` output directory as one Markdown table.

usage: python scripts/peer_table.py OUT_DIR
Reads every ``OUT_DIR/<peer>-rate-<rate>/report.json`` and prints, per rate, one row per peer:
output tok/s, its ratio to the named baseline (``--baseline``, default vllm-bf16), TTFT and
inter-token latency p50/p99, E2E p99, wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(out: Path):
    for report in sorted(out.glob("*-rate-*/report.json")):
        peer, rate = report.parent.name.rsplit("-rate-", 1)
        data = json.loads(report.read_text())
        for run in data["runs"]:
            yield peer, rate, run["summary"], data["meta"]


def _goodput(s) -> str:
    if s.get("goodput") is None:
        return "-"
    met = round((s.get("goodput_fraction") or 0) * s["num_requests"])
    return f"{s['goodput']:.3f} ({met}/{s['num_requests']})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--baseline", default="vllm-bf16")
    args = ap.parse_args(argv)
    table = list(rows(args.out_dir))
    if not table:
        raise SystemExit(f"no report.json under {args.out_dir}")
    meta = table[0][3]
    print(f"platform: {meta.get('platform', '?')}\n")
    for rate in sorted({r for _, r, _, _ in table}, key=lambda r: float(r)):
        group = [(p, s) for p, r, s, _ in table if r == rate]
        base = next((s["output_throughput"] for p, s in group if p == args.baseline), None)
        print(f"request rate {rate}/s\n")
        print(f"| server | out tok/s | x {args.baseline} | TTFT p50 / p99 ms | ITL p50 / p99 ms "
              "| E2E p99 s | wall s | ok | goodput req/s (met) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for peer, s in sorted(group, key=lambda g: -g[1]["output_throughput"]):
            ratio = f"{s['output_throughput'] / base:.2f}" if base else "-"
            print(f"| {peer} | {s['output_throughput']:.1f} | {ratio} | "
                  f"{s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p99']:.0f} | "
                  f"{s['itl_ms']['p50']:.0f} / {s['itl_ms']['p99']:.0f} | "
                  f"{s['e2e_ms']['p99'] / 1e3:.1f} | {s['duration_s']:.1f} | "
                  f"{s['completed']}/{s['num_requests']} | {_goodput(s)} |")
        ranked = sorted(group, key=lambda g: -g[1]["output_throughput"])
        if len(ranked) > 1:
            (best, b), (second, n) = ranked[0], ranked[1]
            print(f"\nfastest at rate {rate}: {best} ({b['output_throughput']:.1f} output tok/s, "
                  f"{b['output_throughput'] / n['output_throughput']:.2f}x the next, {second})")
        print()


if __name__ == "__main__":
    main()
