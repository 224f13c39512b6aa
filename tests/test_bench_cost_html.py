"""``conveyor bench`` with a price: each run's dollars and dollars per 1M output / total tokens,
static vs continuous as a ratio, in report.json, the console table and the self-contained
report.html (tables, and every plot embedded)."""

from __future__ import annotations

import json
import math
import re

import pytest
from test_bench_metrics import _run, _static_batch_log

from conveyor.bench.console import format_table
from conveyor.bench.records import RequestRecord
from conveyor.bench.report import report_meta
from conveyor.bench.suite import write_outputs
from conveyor.cli import main


def _runs():
    slow = [RequestRecord("x", 4, 2, 0.0, 1.0, 2.0, 2, [1.0, 2.0])]     # 2 s, 2 out + 4 in
    fast = [RequestRecord("x", 4, 2, 0.0, 0.5, 1.0, 2, [0.5, 1.0])]     # 1 s
    return [_run("static", math.inf, slow, _static_batch_log()), _run("continuous", math.inf, fast)]


def test_report_prices_every_run_and_compares_with_static(tmp_path):
    meta = report_meta("compare", {"kind": "test"}, argv=["conveyor", "bench", "<script>"])
    report = write_outputs(meta, _runs(), str(tmp_path), price_per_hour=3.6)
    static, cont = json.loads((tmp_path / "report.json").read_text())["runs"]
    assert static["cost"] == pytest.approx({"price_per_hour": 3.6, "usd": 0.002,
                                            "usd_per_million_output_tokens": 1000.0,
                                            "usd_per_million_total_tokens": 0.002 / 6 * 1e6})
    assert cont["cost"]["usd_per_million_output_tokens"] == pytest.approx(500.0)
    assert cont["vs_static"]["usd_per_million_output_tokens"] == pytest.approx(0.5)
    table = format_table(report)
    assert "$/1M out" in table and "1000.00" in table and "500.00" in table

    page = (tmp_path / "report.html").read_text()
    assert "<h2>serving economics</h2>" in page and "0.50x static" in page
    assert "$/1M out" in page and "<td>1000.00</td>" in page
    assert "&lt;script&gt;" in page and "<script>" not in page
    images = re.findall(r'<img alt="([^"]+)" src="([^"]+)"', page)
    assert sorted(name for name, _ in images) == sorted(p.rsplit("/", 1)[-1]
                                                        for p in report["plots"])
    assert all(src.startswith("data:image/png;base64,") for _, src in images)
    assert not re.search(r'(src|href)="(https?:)?//', page)          # nothing to fetch


def test_without_a_price_there_is_no_cost(tmp_path):
    report = write_outputs(report_meta("compare", {}), _runs(), str(tmp_path), plots=False)
    assert all(e["cost"] is None for e in report["runs"])
    assert "$/1M out" not in format_table(report)
    page = (tmp_path / "report.html").read_text()
    assert "serving economics" not in page and "<table>" in page and "<img" not in page


def test_bench_rejects_a_bad_price(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "offline", "--price-per-hour", "-1"])
    assert exc.value.code == 2 and "positive number of USD" in capsys.readouterr().err
