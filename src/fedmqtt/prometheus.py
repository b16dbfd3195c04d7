"""Metrics for Prometheus: ``fedmqtt aggregator --metrics-port 9464`` (and, optionally, ``fedmqtt edge
--metrics-port ...``) serve ``/metrics``.

The HTTP server runs in a thread of its own; it reads the last :class:`~fedmqtt.schemas.Metrics` that the
event loop handed over (:meth:`Exporter.update`, every second), never the live state.

Series: ``fedmqtt_version``, ``fedmqtt_updates_accepted_total``, ``fedmqtt_updates_rejected_total{reason}``,
``fedmqtt_update_staleness`` (a histogram of accepted updates' staleness, in versions),
``fedmqtt_update_handling_seconds`` (a histogram of the aggregator's time per update), ``fedmqtt_agents_online``,
``fedmqtt_updates_per_second``, ``fedmqtt_accuracy`` and ``fedmqtt_loss`` (of the evaluated version, when the
aggregator evaluates), ``fedmqtt_dropped_total``, ``fedmqtt_held_updates``, ``fedmqtt_models_restored_total``,
``fedmqtt_statuses_refused_total`` and, with central DP, ``fedmqtt_dp_epsilon`` and ``fedmqtt_dp_delta``.

On the edge: ``fedmqtt_edge_updates_sent_total``, ``fedmqtt_edge_acks_total{outcome}`` (accepted, rejected,
unknown), ``fedmqtt_edge_outbox`` (updates waiting for an ack), ``fedmqtt_edge_model_version``,
``fedmqtt_edge_connected`` and ``fedmqtt_edge_loss`` (of the last local round).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fedmqtt.schemas import Metrics

STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)


def _histogram(name: str, doc: str, counts: Mapping[float, int], bounds: tuple[float, ...]) -> Metric:
    """A Prometheus histogram from exact per-value counts."""
    buckets, total, running = [], sum(counts.values()), 0
    for le in bounds:
        running = sum(n for v, n in counts.items() if v <= le)
        buckets.append((repr(float(le)), running))
    buckets.append(("+Inf", total))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=sum(v * n for v, n in counts.items()))


class _Served(Collector):
    """A collector with its own HTTP server thread."""

    def __init__(self) -> None:
        self.server: Any = None
        self.port = 0

    def start(self, port: int, addr: str = "127.0.0.1") -> int:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self.server, _ = start_http_server(port, addr, registry=registry)
        self.port = int(self.server.server_port)
        return self.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class Exporter(_Served):
    """The aggregator's: serves the latest metrics it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.latest: Metrics | None = None
        self.handling: tuple[tuple[float, ...], list[int], float] | None = None  # bounds, counts, sum

    def update(self, metrics: Metrics, handling: tuple[tuple[float, ...], list[int], float] | None = None) -> None:
        self.latest, self.handling = metrics, handling  # plain assignments: atomic for the server's thread

    def collect(self) -> Iterator[Metric]:
        m = self.latest
        if m is None:
            return
        yield GaugeMetricFamily("fedmqtt_version", "Global model version", value=m.version)
        yield CounterMetricFamily("fedmqtt_updates_accepted", "Updates accepted", value=m.accepted)
        rejected = CounterMetricFamily("fedmqtt_updates_rejected", "Updates rejected, by reason",
                                       labels=["reason"])
        for reason, n in sorted(m.rejected_by_reason.items()):
            rejected.add_metric([reason], n)
        yield rejected
        hist = {float(k): v for k, v in m.staleness_hist.items()}
        yield _histogram("fedmqtt_update_staleness", "Staleness of accepted updates (versions)", hist,
                         STALENESS_BUCKETS)
        if self.handling is not None:
            bounds, counts, total = self.handling
            cumulative, running = [], 0
            for le, n in zip(bounds, counts, strict=False):
                running += n
                cumulative.append((repr(le), running))
            cumulative.append(("+Inf", running + sum(counts[len(bounds):])))
            yield HistogramMetricFamily("fedmqtt_update_handling_seconds", "Aggregator time per update",
                                        buckets=cumulative, sum_value=total)
        yield GaugeMetricFamily("fedmqtt_agents_online", "Agents whose status is online", value=m.agents_online)
        yield GaugeMetricFamily("fedmqtt_updates_per_second", "Accepted updates per second (last 10 s)",
                                value=m.updates_per_s)
        if m.accuracy is not None:
            yield GaugeMetricFamily("fedmqtt_accuracy", "Accuracy of the evaluated version", value=m.accuracy)
        if m.loss is not None:
            yield GaugeMetricFamily("fedmqtt_loss", "Loss of the evaluated version", value=m.loss)
        yield CounterMetricFamily("fedmqtt_dropped", "Messages or acks that did not fit a bounded queue",
                                  value=m.dropped)
        yield GaugeMetricFamily("fedmqtt_held_updates", "Updates held for the next step", value=m.held)
        yield CounterMetricFamily("fedmqtt_models_restored", "Foreign models replaced on the model topic",
                                  value=m.models_restored)
        yield CounterMetricFamily("fedmqtt_statuses_refused", "Payloads on agents' status topics that are not a "
                                  "status (ignored)", value=m.statuses_refused)
        extra = m.model_extra or {}
        if isinstance(epsilon := extra.get("dp_epsilon"), (int, float)):
            yield GaugeMetricFamily("fedmqtt_dp_epsilon", "Central DP: ε spent by the most-charged device, at "
                                    "fedmqtt_dp_delta", value=float(epsilon))
            yield GaugeMetricFamily("fedmqtt_dp_delta", "Central DP: the δ of fedmqtt_dp_epsilon",
                                    value=float(extra.get("dp_delta", 0.0)))


class EdgeReading(NamedTuple):
    sent: int
    acks: Mapping[str, int]  # accepted, rejected, unknown
    outbox: int
    model_version: int | None
    connected: bool
    loss: float | None


class EdgeExporter(_Served):
    """An agent's: serves the latest reading it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.latest: EdgeReading | None = None

    def update(self, reading: EdgeReading) -> None:
        self.latest = reading

    def collect(self) -> Iterator[Metric]:
        r = self.latest
        if r is None:
            return
        yield CounterMetricFamily("fedmqtt_edge_updates_sent", "Update publishes, re-sends included", value=r.sent)
        acks = CounterMetricFamily("fedmqtt_edge_acks", "Acknowledgements, by outcome", labels=["outcome"])
        for outcome, n in sorted(r.acks.items()):
            acks.add_metric([outcome], n)
        yield acks
        yield GaugeMetricFamily("fedmqtt_edge_outbox", "Updates waiting for an ack", value=r.outbox)
        if r.model_version is not None:
            yield GaugeMetricFamily("fedmqtt_edge_model_version", "Version of the model held", value=r.model_version)
        yield GaugeMetricFamily("fedmqtt_edge_connected", "1 while connected to the broker", value=int(r.connected))
        if r.loss is not None:
            yield GaugeMetricFamily("fedmqtt_edge_loss", "Training loss of the last local round", value=r.loss)
