"""The producer's logic without Kafka or a CNN: sessions, extractor ids, the end of a stream; and the extractor a
producer takes from a checkpoint."""

import argparse
import json
import threading
import time

import numpy as np
import pytest

from pipeline.bus.records import extractor_id
from pipeline.features.live import LiveFeaturizer
from pipeline.video.multi import MultiSource, StreamEnded
from pipeline.video.source import SampledFrame, Shedding, SourceOptions
from workers.producer import differences, use_checkpoint_extractor

IDENTITY = {"backbone": "fake", "weights_sha256": "00", "frame_size": 4, "sample_rate": 2.0, "dim": 3}


class FakeEncoder:
    sample_rate, dim, motion_dim = 2.0, 3, 0

    def __init__(self):
        self.forgotten = []

    def encode_frames(self, frames):
        return np.ones((len(frames), self.dim), np.float32)

    def forget(self, stream_id):
        self.forgotten.append(stream_id)

    def identity(self):
        return IDENTITY


def frames(stream, seconds, per_second=2):
    return [SampledFrame(stream, s, s + i / per_second, 100.0 + s, np.zeros((4, 4, 3), np.uint8))
            for s in seconds for i in range(per_second)]


def test_records_name_their_session_and_extractor_and_the_end_is_marked():
    featurizer = LiveFeaturizer(FakeEncoder(), session="s1")
    done = featurizer.process(frames("a", range(3)) + frames("b", range(2), per_second=1))
    assert {(r.stream_id, r.t) for r in done.records} == {("a", 0), ("a", 1), ("a", 2), ("b", 0)}
    assert {(r.session, r.extractor) for r in done.records} == {("s1", extractor_id(IDENTITY))}
    assert not any(r.last for r in done.records)
    ended = featurizer.process([StreamEnded("a"), StreamEnded("b")])
    # a's final second went out complete: it goes out again as the end marker; b's was still open: it is marked
    assert [(r.stream_id, r.t, r.last) for r in ended.records] == [("a", 2, True), ("b", 1, True)]
    assert ended.ended == ["a", "b"] and featurizer.encoder.forgotten == ["a", "b"]  # their motion state too


def test_the_second_in_progress_goes_out_when_its_source_begins_shedding():
    """Without the marker, second 3's half would wait out the decoder's hole (up to a keyframe) for second 9."""
    featurizer = LiveFeaturizer(FakeEncoder(), session="s1")
    half = frames("a", [3])[:1]
    done = featurizer.process(half + [Shedding("a", 3)])
    assert [(r.t, r.capture_time) for r in done.records] == [(0, 103.0)]
    after = [SampledFrame("a", 9, 9.0, 109.0, np.zeros((4, 4, 3), np.uint8), gap=5.5, dropped=5.5)]
    assert [(r.t, r.media_time, r.gap_seconds) for r in featurizer.process(after).records] == []  # 9 is still open
    # in one batch, the frame after the hole already closed second 3: the marker does not close second 9 early
    featurizer = LiveFeaturizer(FakeEncoder(), session="s2")
    done = featurizer.process(half + [Shedding("a", 3)] + after)
    assert [r.media_time for r in done.records] == [3.0]
    # the five whole seconds shed keep their numbers: seconds are numbered as their media time goes
    assert [(r.t, r.media_time, r.gap_seconds) for r in featurizer.process(frames("a", [10])).records] == [
        (6, 9.0, 5.5), (7, 10.0, 0.0)]


def test_a_new_featurizer_is_a_new_session():
    assert LiveFeaturizer(FakeEncoder()).session != LiveFeaturizer(FakeEncoder()).session


def test_the_checkpoint_decides_the_extractor(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"extractor": {**IDENTITY, "backbone": "mobilenet_v2"}}))
    args = argparse.Namespace(checkpoint=str(tmp_path), backbone="resnet18", frame_size=224, sample_rate=4.0)
    identity = use_checkpoint_extractor(args)
    assert (args.backbone, args.frame_size, args.sample_rate) == ("mobilenet_v2", 4, 2.0)
    assert differences(identity, {**identity, "pooling": "max"}) == "pooling: checkpoint None, here 'max'"
    assert use_checkpoint_extractor(argparse.Namespace(checkpoint="")) is None
    # the motion a checkpoint was trained on is taken too; one recorded before planes and expansion were means
    # luma flow and divergence
    for recorded, adopted in (({"motion_planes": "yuv", "motion_expansion": "affine"}, ("yuv", "affine")),
                              ({}, ("y", "divergence"))):
        (tmp_path / "config.json").write_text(json.dumps({"extractor": {**IDENTITY, "motion_grid": 4, **recorded}}))
        args = argparse.Namespace(checkpoint=str(tmp_path), motion_planes="yuv", motion_expansion="affine")
        use_checkpoint_extractor(args)
        assert (args.motion_grid, args.motion_planes, args.motion_expansion) == (4, *adopted)
    with pytest.raises(SystemExit, match="cannot read the frame extractor"):
        use_checkpoint_extractor(argparse.Namespace(checkpoint=str(tmp_path / "missing")))


class Waiting:
    """A source that yields nothing until stopped, like a live stream waiting to reconnect."""

    live, options = True, SourceOptions(live=True)  # what MultiSource reads of a source besides iterating it

    def __init__(self, stream_id):
        self.stream_id, self._stop = stream_id, threading.Event()

    def __iter__(self):
        self._stop.wait()
        return iter(())

    def stop(self):
        self._stop.set()


def test_batches_end_soon_after_a_stop_even_when_no_stream_yields():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with MultiSource([Waiting("a"), Waiting("b")]) as streams:
        assert list(streams.batches(8, stop)) == []
    assert time.monotonic() - started < 2
