"""The Prometheus metrics every worker serves on --metrics-port, all named vmh_*, and its health check.

Buckets are chosen for this work: stages take milliseconds to a second, while the end-to-end latency from frame
capture to match event is dominated by the one-second pooling and the moment length, so it spans 0.1 s to a minute.

``/healthz`` on the same server answers 503 once the worker's loop has not completed a poll (``HEARTBEAT.beat()``)
for ``--health-deadline`` seconds: a worker stuck in a call looks alive to its process supervisor, not to this.
The dashboard and alert rules in deploy/ name these metrics; tests/test_monitoring.py checks that they exist.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
END_TO_END_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

FRAMES_DECODED = Counter("vmh_frames_decoded_total", "Sampled frames decoded", ["stream"])
VIDEO_SECONDS = Counter("vmh_video_seconds_total", "Seconds of video turned into features", ["stream"])
MOMENTS = Counter("vmh_moments_total", "Candidate moment codes published")
MATCHES = Counter("vmh_matches_total", "Match events published")
ERRORS = Counter("vmh_errors_total", "Errors by kind (each also published as an error record)", ["kind"])
DROPPED_SECONDS = Counter("vmh_dropped_seconds_total", "Media seconds of live streams dropped to keep up (gaps)",
                          ["stream"])
STAGE_CPU = Counter("vmh_stage_cpu_seconds_total", "CPU seconds of the worker's main thread per stage", ["stage"])
DELIVERY_ERRORS = Counter("vmh_delivery_errors_total", "Records the producer could not deliver to Kafka")
STREAMS = Gauge("vmh_streams", "Streams whose state the worker holds (freed when they end or go idle)", ["worker"])
CONSUMER_LAG = Gauge("vmh_consumer_lag_records", "Records behind the end of the input topic", ["topic", "partition"])
BATCH_SIZE = Histogram("vmh_batch_size", "Items per batch at a stage", ["stage"], buckets=BATCH_BUCKETS)
STAGE_LATENCY = Histogram("vmh_stage_seconds", "Time spent in a stage per batch", ["stage"], buckets=STAGE_BUCKETS)
END_TO_END = Histogram(
    "vmh_end_to_end_seconds", "Frame capture to match event publish", buckets=END_TO_END_BUCKETS
)


class Heartbeat:
    """When the worker's loop last completed a poll. Starts beating when created, so start-up counts against the
    deadline too."""

    def __init__(self, deadline_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.deadline_s, self._clock = deadline_s, clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        """Seconds since the last completed poll."""
        return self._clock() - self._last

    def healthy(self) -> bool:
        return self.age() <= self.deadline_s

    def report(self) -> tuple[int, bytes]:
        """The /healthz status code and JSON body."""
        age = self.age()
        body = {"healthy": age <= self.deadline_s, "last_poll_seconds_ago": round(age, 3), "deadline": self.deadline_s}
        return (200 if body["healthy"] else 503), json.dumps(body).encode()


HEARTBEAT = Heartbeat()
LOOP_AGE = Gauge("vmh_loop_idle_seconds", "Seconds since the worker's loop last completed a poll (see /healthz)")
LOOP_AGE.set_function(HEARTBEAT.age)


def serve(port: int, address: str = "127.0.0.1", health_deadline: float = 60.0) -> WSGIServer | None:
    """Serve /metrics and /healthz on ``address``:``port`` from a daemon thread; port 0 leaves the server off."""
    HEARTBEAT.deadline_s = health_deadline
    HEARTBEAT.beat()
    if not port:
        return None
    server = make_server(address, port, health_app(HEARTBEAT, make_wsgi_app()),
                         _Server6 if ":" in address else _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def health_app(heartbeat: Heartbeat, metrics_app):
    """A WSGI app: /healthz from ``heartbeat``, anything else from the Prometheus app."""
    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/healthz":
            return metrics_app(environ, start_response)
        status, body = heartbeat.report()
        start_response("200 OK" if status == 200 else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # a scrape every few seconds is not news
        pass
