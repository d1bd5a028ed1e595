"""The Prometheus metrics every worker serves on --metrics-port, all named vmh_*.

Buckets are chosen for this work: stages take milliseconds to a second, while the end-to-end latency from frame
capture to match event is dominated by the one-second pooling and the moment length, so it spans 0.1 s to a minute.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
DELIVERY_ERRORS = Counter("vmh_delivery_errors_total", "Records the producer could not deliver to Kafka")
STREAMS = Gauge("vmh_streams", "Streams whose state the worker holds (freed when they end or go idle)", ["worker"])
CONSUMER_LAG = Gauge("vmh_consumer_lag_records", "Records behind the end of the input topic", ["topic", "partition"])
BATCH_SIZE = Histogram("vmh_batch_size", "Items per batch at a stage", ["stage"], buckets=BATCH_BUCKETS)
STAGE_LATENCY = Histogram("vmh_stage_seconds", "Time spent in a stage per batch", ["stage"], buckets=STAGE_BUCKETS)
END_TO_END = Histogram(
    "vmh_end_to_end_seconds", "Frame capture to match event publish", buckets=END_TO_END_BUCKETS
)


def serve(port: int) -> None:
    """Serve /metrics on ``port``; 0 leaves the endpoint off."""
    if port:
        start_http_server(port)
