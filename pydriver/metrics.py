"""Counters for operators, in the Prometheus text format (served only when asked for with
--metrics-address). Pure bookkeeping: no I/O here."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{bound}"}} {count}'
            for bound, count in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        brace = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{brace} {self.sum:.6f}")
        out.append(f"{name}_count{brace} {self.total}")
        return out


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.durations: dict[str, Histogram] = {}
        self.repairs: Counter[str] = Counter()
        self.loop_lag = Histogram(LAG_BUCKETS)
        self.loop_lag_max = 0.0
        self.loop_late_max = 0.0

    def observe_request(self, method: str, outcome: str, seconds: float) -> None:
        self.requests[(method, outcome)] += 1
        self.durations.setdefault(method, Histogram(BUCKETS)).observe(seconds)

    def observe_lag(self, seconds: float, raw: float | None = None) -> None:
        self.loop_lag.observe(seconds)
        self.loop_lag_max = max(self.loop_lag_max, seconds)
        self.loop_late_max = max(self.loop_late_max, seconds if raw is None else raw)

    def count_repairs(self, kind: str, number: int = 1) -> None:
        if number:
            self.repairs[kind] += number

    def render(self, gauges: Mapping[str, float]) -> str:
        out = [
            "# HELP pydriver_requests_total Protocol requests served, by method and outcome.",
            "# TYPE pydriver_requests_total counter",
        ]
        for (method, outcome), count in sorted(self.requests.items()):
            out.append(f'pydriver_requests_total{{method="{method}",outcome="{outcome}"}} {count}')
        out += [
            "# HELP pydriver_request_duration_seconds Time to answer a request, by method.",
            "# TYPE pydriver_request_duration_seconds histogram",
        ]
        for method, histogram in sorted(self.durations.items()):
            out += histogram.lines("pydriver_request_duration_seconds", f'method="{method}"')
        out += [
            "# HELP pydriver_repairs_total Things pybridge found broken and repaired, by kind.",
            "# TYPE pydriver_repairs_total counter",
        ]
        for kind, count in sorted(self.repairs.items()):
            out.append(f'pydriver_repairs_total{{kind="{kind}"}} {count}')
        out += [
            "# HELP pydriver_event_loop_lag_seconds How long the event loop was busy or blocked "
            "when a timer was due (time spent waiting for a CPU excluded).",
            "# TYPE pydriver_event_loop_lag_seconds histogram",
            *self.loop_lag.lines("pydriver_event_loop_lag_seconds"),
            "# HELP pydriver_event_loop_lag_max_seconds Largest event loop lag seen.",
            "# TYPE pydriver_event_loop_lag_max_seconds gauge",
            f"pydriver_event_loop_lag_max_seconds {self.loop_lag_max:.6f}",
            "# HELP pydriver_event_loop_late_max_seconds Largest lateness of a timer, CPU "
            "starvation included.",
            "# TYPE pydriver_event_loop_late_max_seconds gauge",
            f"pydriver_event_loop_late_max_seconds {self.loop_late_max:.6f}",
        ]
        for name, value in sorted(gauges.items()):
            out += [f"# TYPE pydriver_{name} gauge", f"pydriver_{name} {value:g}"]
        return "\n".join(out) + "\n"
