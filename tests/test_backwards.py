"""Training videos played backwards: annotations reversed by the synthetic vocabulary, and features that match what
the frame path makes of a video really rendered backwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import Annotation, Video
from pipeline.features import video_features
from pipeline.features.backbone import FrameEncoder
from pipeline.training.backwards import SUFFIX, backwards_features, with_backwards
from pipeline.training.extract import FeatureError, FeatureSet
from pipeline.video.synth import REVERSE, VERBS, Event, SynthError, describe, label, played_backwards, render_video

DURATION = 8.0
EVENTS = [Event("square", "red", "grow", 1.0, 4.5, (0.35, 0.5), (0.35, 0.5), 0.12, 0.4),
          Event("circle", "blue", "left", 3.0, 7.0, (0.8, 0.3), (0.2, 0.3), 0.25, 0.25)]


def backwards_event(event: Event, duration: float) -> Event:
    """The event as it happens in the video played backwards."""
    return Event(event.shape, event.colour, REVERSE[event.action], duration - event.end, duration - event.start,
                 event.centre1, event.centre0, event.size1, event.size0)


def test_played_backwards_reverses_each_action_in_its_own_phrasing_and_mirrors_spans() -> None:
    grow, left = EVENTS
    video = Video("v", 7.5, tuple(Annotation(caption, ((e.start, e.end),), label=label(e))
                                  for e in (grow, left) for caption in describe(e)))
    back = played_backwards(video, 8, "v" + SUFFIX)
    assert back.video_id == "v" + SUFFIX and back.duration == 7.5
    expected = [caption for e in (grow, left) for caption in describe(backwards_event(e, 8.0))]
    assert [a.sentence for a in back.annotations] == expected
    assert {a.label for a in back.annotations} == {"red square shrink", "blue circle right"}
    assert back.annotations[0].spans == ((3.5, 7.0),)
    assert back.annotations[-1].spans == ((1.0, 5.0),)
    assert played_backwards(back, 8, "v") == video
    shrinking = Annotation("a red disc shrinks", ((0.25, 3.0),), label="red circle shrink")
    clipped = played_backwards(Video("w", 7.5, (shrinking,)), 8, "w2")
    assert clipped.annotations[0].spans == ((5.0, 7.5),)  # mirrored about 8 s, kept within the 7.5 s video
    assert set(REVERSE) == set(VERBS) and all(REVERSE[REVERSE[a]] == a for a in REVERSE)


def test_a_caption_without_a_synthetic_label_cannot_be_played_backwards() -> None:
    with pytest.raises(SynthError, match="has no synthetic label"):
        played_backwards(Video("v", 5.0, (Annotation("a person opens a door", ((1.0, 2.0),)),)), 5, "b")
    with pytest.raises(SynthError, match="does not end in a phrasing of 'grow'"):
        spinning = Annotation("a red disc spins", ((1.0, 2.0),), label="red circle grow")
        played_backwards(Video("v", 5.0, (spinning,)), 5, "b")


def test_backwards_features_reverse_rows_and_negate_only_the_motion_tail() -> None:
    features = np.arange(24, dtype=np.float32).reshape(4, 6)
    back = backwards_features(features, motion=2)
    np.testing.assert_array_equal(back[:, :4], features[::-1, :4])
    np.testing.assert_array_equal(back[:, 4:], -features[::-1, 4:])
    np.testing.assert_array_equal(backwards_features(back, 2), features)
    np.testing.assert_array_equal(backwards_features(features, 0), features[::-1])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, int]:
    """Features of the video and of the same video really rendered backwards, by the published frame path's
    definition (Y, U and V flow, affine expansion) at a small size."""
    root = tmp_path_factory.mktemp("backwards")
    render_video(root / "forward.mp4", EVENTS, DURATION, fps=8, size=128, seed=5)
    render_video(root / "backward.mp4", [backwards_event(e, DURATION) for e in EVENTS], DURATION, fps=8, size=128,
                 seed=5)
    encoder = FrameEncoder(device="cpu", frame_size=64, sample_rate=2, motion_grid=4)
    forward, backward = (video_features(root / f"{name}.mp4", encoder).astype(np.float32)
                         for name in ("forward", "backward"))
    return forward, backward, encoder.motion_dim


def test_features_played_backwards_are_those_of_the_video_rendered_backwards(rendered) -> None:
    forward, backward, motion = rendered
    assert forward.shape == backward.shape
    played = backwards_features(forward, motion)

    def agreement(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    appearance = slice(0, -motion)
    assert agreement(played[:, appearance], backward[:, appearance]) > 0.95
    # flow turns around: reversed rows alone point the wrong way, negated they agree (not exactly: the backwards
    # video samples other frames of the same motion, half a second apart)
    flow, expansion = slice(-motion, -motion // 3), slice(-motion // 3, None)
    assert agreement(played[:, flow], backward[:, flow]) > 0.4
    assert agreement(forward[::-1, flow], backward[:, flow]) < -0.4
    assert agreement(played[:, expansion], backward[:, expansion]) > 0.1  # the expansion is the noisiest cell


def test_with_backwards_serves_each_video_then_itself_played_backwards(tmp_path: Path, rendered) -> None:
    forward, _, motion = rendered
    features = FeatureSet(tmp_path, {"motion_grid": 4, "dim": forward.shape[1]}, {"v": len(forward)})
    np.save(tmp_path / "v.npy", forward.astype(np.float16))
    video = Video("v", DURATION, (Annotation("a red box grows", ((1.0, 4.5),), label="red square grow"),))
    videos, served = with_backwards([video], features)
    assert [v.video_id for v in videos] == ["v", "v" + SUFFIX]
    assert videos[1].annotations[0].sentence == "a red box shrinks"
    assert served.videos == {"v": len(forward), "v" + SUFFIX: len(forward)}
    np.testing.assert_array_equal(served.load("v" + SUFFIX), backwards_features(features.load("v"), motion))
    with pytest.raises(FeatureError, match="no features for video 'w'"):
        with_backwards([Video("w", 3.0, ())], features)
