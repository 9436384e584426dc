"""Read a server's Prometheus metrics (Triton's metrics port): the series of one metric, by labels."""

from __future__ import annotations

import re
import urllib.request

_LABEL = re.compile(r'(\w+)="([^"]*)"')


def server_series(server, name: str, labels: str = "") -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each series of `name` whose labels include `labels` ('stage="encode"')."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = dict(_LABEL.findall(labels))
    found = []
    for match in re.finditer(rf"^{name}(?:\{{(.*)\}})? (\S+)$", text, re.MULTILINE):
        series = dict(_LABEL.findall(match.group(1) or ""))
        if wanted.items() <= series.items():
            found.append((series, float(match.group(2))))
    return found


def server_metric(server, name: str, labels: str = "") -> float:
    """The sum of the series of `name` whose labels include `labels`; 0 before one appears."""
    return sum(value for _, value in server_series(server, name, labels))
