"""Load-test scenario presets: which routes a simulated user calls, and how often.

``make loadtest SCENARIO=...`` and ``loadtest/run.py --scenario`` pick one by name; the
locustfile reads it from ``SLIMSERVE_SCENARIO``. Weights are relative, as locust's ``@task(n)``.
``mixed`` is every task the server answers (the locustfile's behaviour before presets existed).
"""

from __future__ import annotations

# scenario -> {task name in the locustfile: weight}
SCENARIOS: dict[str, dict[str, int]] = {
    "streaming-chat": {"stream_chat": 1},
    "completions": {"stream_completion": 1},
    "images": {"image": 1},
    "videos": {"video": 1},
    "mixed": {"stream_chat": 3, "stream_completion": 2, "image": 1, "video": 1},
}

# The route each task needs; a scenario is refused up front when the server lacks all of its routes.
TASK_ROUTES: dict[str, str] = {
    "stream_chat": "/v1/chat/completions",
    "stream_completion": "/v1/completions",
    "image": "/v1/images/generations",
    "video": "/v1/videos/sync",
}


def routes_of(scenario: str) -> list[str]:
    """The routes a scenario calls (``KeyError`` names the known scenarios)."""
    if scenario not in SCENARIOS:
        raise KeyError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    return [TASK_ROUTES[name] for name in SCENARIOS[scenario]]
