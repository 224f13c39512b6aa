"""One Prometheus exposition from many: every replica's samples under a ``replica`` label.

``merge_expositions({replica: text})`` parses each replica's ``/metrics`` text with
``prometheus_client``'s parser and renders one exposition in which each metric family appears
once (its ``# HELP`` / ``# TYPE`` from the first replica that has it) and every sample carries
``replica="<id>"``, so ``sum by (replica)`` and ``sum`` both work as with vLLM's per-engine
labels. No Ray here.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"


class _Families:
    """A collector that yields fixed, already merged families."""

    def __init__(self, families: Iterable[Metric]):
        self._families = list(families)

    def collect(self):
        return iter(self._families)


def merge_expositions(texts: Mapping[str, str], label: str = REPLICA_LABEL) -> str:
    """The expositions of ``texts`` (replica id -> text format) as one, each sample labelled
    with its replica; a sample that already has ``label`` keeps the replica's value instead.
    An exposition that does not parse is skipped whole (a replica's bug must not hide the
    others)."""
    families: dict[str, Metric] = {}
    for replica, text in texts.items():
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            merged.samples.extend(s._replace(labels={**s.labels, label: replica})
                                  for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry).decode()
