"""A server's speculative-decoding counters, scraped from its Prometheus ``/metrics``.

Owns what ``conveyor bench serve`` reads from the server under test: vLLM's spec-decode counters
(``spec_decode_num_drafts``, ``..._num_draft_tokens``, ``..._num_accepted_tokens``,
``..._num_accepted_tokens_per_pos{position}``) under conveyor's ``conveyor:`` prefix or vLLM's
``vllm:`` (conveyor's first; series with other labels, e.g. vLLM's per-engine ones, are summed).
Read before and after a run, their change is the run's ``spec_decode`` entry, in the shape the
in-process bench reports (``offline.spec_delta``). A server without them, or without
``/metrics``, gives None: the report then says nothing about speculation.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIXES = ("conveyor:", "vllm:")
_TOTALS = ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
           "spec_decode_num_accepted_tokens_total")
_PER_POS = "spec_decode_num_accepted_tokens_per_pos_total"


def parse_spec_counters(text: str) -> tuple[int, int, int, list[int]] | None:
    """(drafts, draft tokens, accepted tokens, accepted per position) from exposition text, or
    None when no prefix carries them."""
    found: dict[str, dict] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                for prefix in PREFIXES:
                    if sample.name.startswith(prefix):
                        _add(found.setdefault(prefix, {}), sample.name[len(prefix):], sample)
    except ValueError:
        return None
    for prefix in PREFIXES:
        got = found.get(prefix, {})
        if all(name in got for name in _TOTALS):
            per_pos = got.get(_PER_POS, {})
            positions = [per_pos.get(i, 0) for i in range(max(per_pos, default=-1) + 1)]
            return (*(int(got[name]) for name in _TOTALS), [int(v) for v in positions])
    return None


def _add(into: dict, name: str, sample) -> None:
    if name == _PER_POS:
        try:
            position = int(sample.labels.get("position", ""))
        except ValueError:
            return
        slots = into.setdefault(name, {})
        slots[position] = slots.get(position, 0) + sample.value
    elif name in _TOTALS:
        into[name] = into.get(name, 0) + sample.value


def scrape_spec_counters(base_url: str, headers: dict | None = None,
                         timeout_s: float = 30.0) -> tuple[int, int, int, list[int]] | None:
    """GET ``base_url``/metrics and parse it; None when it cannot be read."""
    try:
        resp = httpx.get(base_url.rstrip("/") + "/metrics", headers=headers or {},
                         timeout=timeout_s)
        resp.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_spec_counters(resp.text)
