"""``--price-per-hour USD``, the machine's price, for ``conveyor bench`` (a ``ReportOptions``
field, ``conveyor.bench.options``): what turns tokens/s into dollars per 1M tokens
(``conveyor.metrics.windows.cost_per_million``)."""

from __future__ import annotations

import argparse
import math

PRICE_HELP = {"bench": "the machine's price per hour: every run's cost in dollars and per 1M "
                       "output / total tokens goes into the report"}


def parse_price(text: str) -> float:
    """A positive, finite number of USD (else argparse's one-line error, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of USD, got {text!r}")
    return value
