"""``report.html``: a benchmark report as one self-contained page, beside ``report.json``.

Owns the HTML rendering only: the same header, run table, per-group table, engine counters and
scenario findings as the console (``console``'s column definitions, so the two never disagree),
with a price the cost of each run against the static baseline, and every plot the report drew,
embedded as a base64 PNG (the file needs nothing else: no CDN, no sibling files). Every value
from the report is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import os

from conveyor.bench.console import (GROUP_COLUMNS, GROUP_TITLE, engine_line, group_rows,
                                    run_columns, scenario_lines)
from conveyor.bench.report import BASELINE

_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em}
body{color:#1d232b}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #e3e6ea;padding:.25em .6em;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f3f5f7}
.meta{color:#56606b}code{background:#f3f5f7;padding:0 .3em}img{max-width:100%;margin:.5em 0}
h2{margin-top:1.4em;font-size:1.15em}.scroll{overflow-x:auto}"""


def _e(value) -> str:
    return html.escape(str(value))


def _table(columns, rows: list) -> str:
    head = "".join(f"<th>{_e(name)}</th>" for name, _ in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(get(r))}</td>" for _, get in columns) + "</tr>"
                   for r in rows)
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def _economics(runs: list[dict]) -> list[str]:
    """One sentence per priced run: its dollars per 1M output tokens, and versus static."""
    lines = []
    for e in runs:
        cost = e.get("cost") or {}
        usd = cost.get("usd_per_million_output_tokens")
        if usd is None:
            continue
        vs = (e.get(f"vs_{BASELINE}") or {}).get("usd_per_million_output_tokens")
        versus = f" ({vs:.2f}x {BASELINE})" if vs is not None and e["label"] != BASELINE else ""
        lines.append(f"{e['label']}: ${usd:,.2f} per 1M output tokens{versus}, "
                     f"${cost['usd']:.4f} for the run at ${cost['price_per_hour']:g}/h")
    return lines


def _image(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
    except OSError:
        return f"<p>(plot {_e(path)} is missing)</p>"
    name = os.path.basename(path)
    return f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{data}"></figure>'


def render_html(report: dict) -> str:
    """The whole page for ``report`` (``report.build_report``'s document)."""
    meta = report["meta"]
    parts = [f"<h1>conveyor bench {_e(meta['mode'])}</h1>",
             f"<p class=meta>{_e(meta['date'])}, conveyor {_e(meta['conveyor_version'])}<br>"
             f"command: <code>{_e(meta['command'])}</code><br>platform: {_e(meta['platform'])}</p>",
             "<h2>runs</h2>", _table(run_columns(report), report["runs"])]
    economics = _economics(report["runs"])
    if economics:
        parts += ["<h2>serving economics</h2><ul>"] + [f"<li>{_e(x)}</li>" for x in economics]
        parts.append("</ul>")
    groups = group_rows(report["runs"])
    if groups:
        parts += [f"<h2>{_e(GROUP_TITLE)}</h2>", _table(GROUP_COLUMNS, groups)]
    engine = [line for line in map(engine_line, report["runs"]) if line]
    if engine:
        parts += ["<h2>engine counters</h2><ul>"] + [f"<li>{_e(x)}</li>" for x in engine]
        parts.append("</ul>")
    scenario = scenario_lines(report.get("scenario"))
    if scenario:
        parts += ["<h2>scenario</h2><pre>", _e("\n".join(scenario)), "</pre>"]
    if report["plots"]:
        parts += ["<h2>plots</h2>"] + [_image(p) for p in report["plots"]]
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>conveyor bench {_e(meta['mode'])}</title><style>{_STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write_html(report: dict, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))
    return path
