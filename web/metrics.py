"""Prometheus metrics — computed when scraped, from what node and workers already write down.

Node, worker processes and web server are separate processes (often on separate hosts), so no
in-process counter would see everything. Instead a custom collector reads, at scrape time:

* the audit trail (``audit.path``, shared by every process; read incrementally from the byte offset
  of the previous scrape): instances received, studies queued and analysed, task durations and
  inference times, deliveries and delivery failures, reviewer verdicts;
* the broker: how many study messages wait in the ``lungvision`` queue;
* the dead-letter list (a table of the outcome store): deliveries that ran out of attempts and
  analyses that failed.

Counters therefore survive restarts of every process (the trail is the source of truth), and a
worker on another host is counted as long as it writes the same trail (shared volume).
"""

import bisect
import logging
from collections.abc import Callable, Iterator

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from common.failures import describe_failure
from common.results import Finding, GateAction, GateReason, Verdict
from web.context import WebContext
from web.worklist import AuditIndex

DURATION_BUCKETS_S = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
INFERENCE_BUCKETS_MS = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
log = logging.getLogger("lungvision.web.metrics")


def histogram(name: str, documentation: str, values: list[float], bounds: tuple[float, ...]) -> HistogramMetricFamily:
    ordered = sorted(values)
    buckets = [(str(float(bound)), bisect.bisect_right(ordered, bound)) for bound in bounds]
    buckets.append(("+Inf", len(ordered)))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum(ordered))


class LungVisionCollector(Collector):
    """``queue_depth`` and ``dead_letter_count`` ask the broker and the store at each scrape."""

    def __init__(self, audit: AuditIndex, queue_depth: Callable[[], int], dead_letter_count: Callable[[], int]) -> None:
        self.audit, self.queue_depth, self.dead_letter_count = audit, queue_depth, dead_letter_count
        self._failing: set[str] = set()  # sources that failed at the last scrape: logged once, not every scrape

    def _source_failed(self, source: str, consequence: str, error: Exception) -> None:
        """A source the scrape reads failed: say so in the log when it starts failing (a scrape every few
        seconds would repeat it), with the error's type and code line only, never its message."""
        if source not in self._failing:
            self._failing.add(source)
            log.warning(
                "metrics: %s failed, %s (logged again after it recovers): %s",
                source,
                consequence,
                describe_failure(error),
            )

    def _source_answered(self, source: str) -> None:
        if source in self._failing:
            self._failing.discard(source)
            log.info("metrics: %s answers again", source)

    def collect(self) -> Iterator:
        index = self.audit.refresh()
        counts = index.counts
        yield CounterMetricFamily(
            "lungvision_instances_received",
            "DICOM instances the node stored for analysis",
            value=counts.get("received", 0),
        )
        yield CounterMetricFamily(
            "lungvision_studies_queued", "Study rounds the node queued for analysis", value=counts.get("queued", 0)
        )
        analysed = CounterMetricFamily(
            "lungvision_studies_analysed", "Study rounds analysed, by finding", labels=["finding"]
        )
        for finding in (Finding.POSITIVE, Finding.NEGATIVE, Finding.NOT_ANALYSED):
            analysed.add_metric([finding.value], counts.get(f"analysed:{finding.value}", 0))
        yield analysed
        yield histogram(
            "lungvision_task_duration_seconds",
            "Wall time of the analysis task per study round",
            index.durations_s,
            DURATION_BUCKETS_S,
        )
        yield histogram(
            "lungvision_inference_milliseconds",
            "Model forward pass and Grad-CAM per study round",
            index.inference_ms,
            INFERENCE_BUCKETS_MS,
        )
        delivered = CounterMetricFamily("lungvision_deliveries", "Successful deliveries", labels=["kind"])
        failures = CounterMetricFamily(
            "lungvision_delivery_failures",
            "Failed delivery attempts; final=true: given up (dead-lettered)",
            labels=["kind", "final"],
        )
        for kind, stage in (("dicom", "delivery"), ("hl7", "hl7")):
            delivered.add_metric([kind], counts.get(f"delivered:{kind}", 0))
            for final in ("final", "retry"):
                failures.add_metric([kind, str(final == "final").lower()], counts.get(f"failed:{stage}:{final}", 0))
        yield delivered
        yield failures
        yield CounterMetricFamily(
            "lungvision_replays", "Dead letters replayed by an operator", value=counts.get("replayed", 0)
        )
        reviews = CounterMetricFamily(
            "lungvision_reviews", "Reviewer verdicts on findings (a changed mind counts again)", labels=["verdict"]
        )
        for verdict in Verdict:
            reviews.add_metric([verdict.value], counts.get(f"reviewed:{verdict.value}", 0))
        yield reviews
        gate = CounterMetricFamily(
            "lungvision_images_outside_intended_use",
            "Images outside the model's intended use, by gate rule; action refused (not "
            "analysed) or flagged (analysed and marked)",
            labels=["rule", "action"],
        )
        for rule in GateReason:
            for action in GateAction:
                key = f"gate:{action.value}:{rule.value}"
                gate.add_metric([rule.value, action.value], counts.get(key, 0))
        yield gate
        up = 1
        try:
            depth = self.queue_depth()
        except Exception as error:  # the broker is down: say so (gauge and log) instead of failing the scrape
            up = 0
            self._source_failed("the broker", "lungvision_queue_depth left out and lungvision_broker_up 0", error)
        else:
            self._source_answered("the broker")
            yield GaugeMetricFamily("lungvision_queue_depth", "Study rounds waiting in the analysis queue", value=depth)
        yield GaugeMetricFamily("lungvision_broker_up", "1 when the broker answered this scrape", value=up)
        try:
            dead_letters = self.dead_letter_count()
        except Exception as error:  # the outcome store is unreachable: the other metrics are still worth a scrape
            self._source_failed("counting dead letters in the outcome store", "lungvision_dead_letters left out", error)
        else:
            self._source_answered("counting dead letters in the outcome store")
            yield GaugeMetricFamily(
                "lungvision_dead_letters", "Deliveries that ran out of attempts, not yet replayed", value=dead_letters
            )


def router(context: WebContext) -> APIRouter:
    """``/metrics``: the collector over the context's audit trail, broker and dead-letter list."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        LungVisionCollector(context.worklist.audit, context.publisher.waiting, lambda: len(context.dead_letters.list()))
    )
    metrics = APIRouter(include_in_schema=False)

    @metrics.get("/metrics")
    def scrape():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
