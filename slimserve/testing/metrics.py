"""Read samples out of a Prometheus text exposition (what ``GET /metrics`` returns).

Tests compare single samples (a histogram's ``_count``, a counter with given labels); a full
parser would hide which line was meant, so this reads the one line that matches.
"""

from __future__ import annotations


def metric_value(text: str, name: str, **labels: str) -> float:
    """Value of one sample in a Prometheus text exposition (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0
