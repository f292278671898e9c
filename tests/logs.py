"""Reading what a Trainer's CSVLogger wrote, for assertions on logged metrics."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metrics_csv(path: Path) -> dict[str, list[float]]:
    """Every metric of a ``metrics.csv`` as the list of its logged values, in order."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    metrics: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            if v not in ("", None):
                metrics.setdefault(k, []).append(float(v))
    return metrics
