"""Server metrics in the Prometheus text format (counters, gauges, histograms), thread-safe.

Small on purpose: the few families a server needs, rendered by hand, no client library.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{v}"' for k, v in labels] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    return "+Inf" if v == math.inf else repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    """A registry of metric families; ``render()`` gives the ``/metrics`` page."""

    def __init__(self, prefix: str = "matformer") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._hists: dict[str, dict[Labels, list[float]]] = defaultdict(dict)
        self._buckets: dict[str, tuple[float, ...]] = {}

    def describe(self, name: str, kind: str, help_: str,
                 buckets: tuple[float, ...] | None = None) -> None:
        """Declare a family: ``kind`` is counter, gauge or histogram."""
        self._help[name] = (kind, help_)
        if buckets is not None:
            self._buckets[name] = buckets

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = value

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Add one observation to a histogram (bucket counts, then sum and count)."""
        bounds = self._buckets[name]
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hists[name].setdefault(key, [0.0] * (len(bounds) + 3))  # +Inf, sum, count
            h[bisect.bisect_left(bounds, value)] += 1
            h[-2] += value
            h[-1] += 1

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        out: list[str] = []
        with self._lock:
            for name, (kind, help_) in self._help.items():
                full = f"{self.prefix}_{name}"
                out += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}"]
                if kind != "histogram":
                    for labels, v in sorted(self._values[name].items()):
                        out.append(f"{full}{_labels(labels)} {_num(v)}")
                    continue
                bounds = self._buckets[name]
                for labels, h in sorted(self._hists[name].items()):
                    cum = 0.0
                    for le, c in zip((*bounds, math.inf), h[:-2], strict=True):
                        cum += c
                        le_label = 'le="' + _num(le) + '"'
                        out.append(f"{full}_bucket{_labels(labels, le_label)} {_num(cum)}")
                    out.append(f"{full}_sum{_labels(labels)} {_num(h[-2])}")
                    out.append(f"{full}_count{_labels(labels)} {_num(h[-1])}")
        return "\n".join(out) + "\n"


def server_metrics() -> Metrics:
    """The families the server reports (see docs/serving.md)."""
    m = Metrics()
    m.describe("requests_total", "counter", "Finished requests by submodel and outcome "
               "(stop, length, cancelled, error).")
    m.describe("rejected_total", "counter", "Requests refused before running, by reason.")
    m.describe("prompt_tokens_total", "counter", "Prompt tokens prefilled, by submodel.")
    m.describe("completion_tokens_total", "counter", "Tokens generated, by submodel.")
    m.describe("request_latency_seconds", "histogram", "Time from arrival to the last token, "
               "by submodel.", LATENCY_BUCKETS_S)
    m.describe("time_to_first_token_seconds", "histogram", "Time from arrival to the first "
               "token, by submodel.", LATENCY_BUCKETS_S)
    m.describe("batch_size", "histogram", "Rows in each decode step.", BATCH_BUCKETS)
    m.describe("step_seconds", "histogram", "Wall time of each scheduler iteration (the gap "
               "between two tokens of a running request).", LATENCY_BUCKETS_S)
    m.describe("active_requests", "gauge", "Requests decoding now.")
    m.describe("queued_requests", "gauge", "Requests waiting for a slot.")
    m.describe("auto_step_downs_total", "counter", "Running auto requests moved to a smaller "
               "submodel.")
    m.describe("auto_level", "gauge", "Level of the auto policy (0 = cheapest submodel).")
    m.describe("auto_submodel", "gauge", "1 for the submodel auto requests get now.")
    return m
