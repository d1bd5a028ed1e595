"""Keyframes: the record on the wire, the frame picked for each second, and the producer publishing them."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image

from harness import committed, render_synthetic, spawn, worker_env
from pipeline.bus.records import FrameFeatures, InvalidRecord, Keyframe, MalformedRecord, decode, encode, record_key
from pipeline.video.keyframes import KeyframeSampler
from pipeline.video.source import SampledFrame


def jpeg(colour=(200, 30, 40), side=32) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(out, format="JPEG")
    return out.getvalue()


def test_keyframe_record_round_trips_and_refuses_what_is_not_a_jpeg():
    keyframe = Keyframe("cam-1", 7, 7.0, 1.7e9, jpeg(), "session-a")
    data = encode(keyframe)
    assert decode(data, Keyframe) == keyframe and record_key(keyframe) == b"cam-1"
    assert data.endswith(keyframe.jpeg)
    with pytest.raises(InvalidRecord, match="JPEG"):
        Keyframe("cam-1", 7, 7.0, 1.7e9, b"\x89PNG\r\n\x1a\n", "s")
    with pytest.raises(MalformedRecord, match="JPEG"):
        decode(data[: len(data) - len(keyframe.jpeg)] + b"not a jpeg")
    with pytest.raises(MalformedRecord, match="truncated"):
        decode(data[:20])


def frame(stream: str, media: float, shade: int, side: int = 64) -> SampledFrame:
    rgb = np.full((side, side, 3), shade, np.uint8)
    return SampledFrame(stream, int(media), media, 1000.0 + media, rgb)


def record(stream: str, t: int, second: int, last: bool = False) -> FrameFeatures:
    return FrameFeatures(stream, t, float(second), 1000.0 + second, np.ones(4), session="s1", last=last)


def shade_of(keyframe: Keyframe) -> float:
    return float(np.asarray(Image.open(io.BytesIO(keyframe.jpeg))).mean())


def test_each_second_gets_its_frame_nearest_the_middle_at_the_keyframe_side():
    sampler = KeyframeSampler(side=48)
    # 4 fps: the frames at .25 and .75 are equally near the middle; the first of them stays
    sampler.add([frame("a", 0.0, 10), frame("a", 0.25, 60), frame("a", 0.75, 110), frame("b", 0.4, 200)])
    assert sampler.take([]) == []
    sampler.add([frame("a", 1.0, 10), frame("a", 1.5, 250), frame("b", 1.1, 30)])
    first = sampler.take([record("a", 0, 0), record("b", 0, 0)])
    assert [(k.stream_id, k.t, k.session) for k in first] == [("a", 0, "s1"), ("b", 0, "s1")]
    assert abs(shade_of(first[0]) - 60) < 3 and abs(shade_of(first[1]) - 200) < 3
    assert Image.open(io.BytesIO(first[0].jpeg)).size == (48, 48)
    # the pooler may emit a full second before any frame of the next one arrives
    (second,) = sampler.take([record("a", 1, 1)])
    assert second.t == 1 and abs(shade_of(second) - 250) < 3
    # a reconnect skips media seconds: t goes on counting, the keyframe follows the record's media second
    sampler.add([frame("b", 5.5, 90), frame("b", 6.5, 20)])
    (after_gap,) = sampler.take([record("b", 1, 5)])
    assert after_gap.t == 1 and abs(shade_of(after_gap) - 90) < 3
    # the stream's last record frees it; a second without frames gets no keyframe
    assert [k.t for k in sampler.take([record("b", 2, 6, last=True)])] == [2]
    assert sampler.take([record("b", 3, 7, last=True)]) == []
    assert "b" not in sampler._best and not any(s == "b" for s, _ in sampler._held)


@pytest.mark.integration
def test_the_producer_publishes_one_keyframe_per_features_record(kafka_bootstrap, tmp_path):
    from pipeline.bus.topics import create_topics, topics

    prefix = f"kf-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix=prefix, partitions=2)
    names = topics(prefix)
    video = render_synthetic(tmp_path / "synthetic.mp4", duration=6.0)
    env = worker_env(kafka_bootstrap, prefix)
    with_frames = spawn(["producer", f"cam={video}", "--keyframe-size", "96"], env, tmp_path / "producer.log")
    assert with_frames.wait(240) == 0, (tmp_path / "producer.log").read_text()[-3000:]
    without = spawn(["producer", f"quiet={video}", "--no-keyframes"], env, tmp_path / "producer2.log")
    assert without.wait(240) == 0, (tmp_path / "producer2.log").read_text()[-3000:]
    features = committed(kafka_bootstrap, names.features, lambda r: sum(f.last for f in r) == 2,
                         expected=FrameFeatures)
    keyframes = committed(kafka_bootstrap, names.keyframes, expected=Keyframe)
    seconds = {(f.stream_id, f.t, f.session) for f in features if f.stream_id == "cam"}
    assert len(seconds) == 6
    assert sorted((k.stream_id, k.t, k.session) for k in keyframes) == sorted(seconds)  # none for "quiet"
    for keyframe in keyframes:
        image = Image.open(io.BytesIO(keyframe.jpeg))
        assert image.format == "JPEG" and image.size == (96, 96)
        assert np.asarray(image).std() > 1  # a rendered frame, not a blank
