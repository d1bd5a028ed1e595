"""Motion features: optical-flow cells say which way a rendered shape moves, keep streams apart, and travel through
pooling, the frame path and the model's whitening as the tail of every feature vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.features.backbone import BackboneError, FrameEncoder, MissingWeights, default_weights_path
from pipeline.features.motion import MotionEncoder, motion_dim
from pipeline.features.pooling import SecondPooler
from pipeline.model.cmhn import Whitening
from pipeline.video.source import SampledFrame
from pipeline.video.synth import Event, render_frames

RATE = 4


def frames_of(action: str, stream: str = "s", seconds: int = 3, size: int = 96,
              centre: tuple[float, float] = (0.5, 0.5)) -> list[SampledFrame]:
    """A red square doing ``action`` across the whole clip, sampled at RATE (growing and shrinking about
    ``centre``)."""
    geometry = {
        "left": ((0.7, 0.5), (0.3, 0.5), 0.3, 0.3), "right": ((0.3, 0.5), (0.7, 0.5), 0.3, 0.3),
        "up": ((0.5, 0.7), (0.5, 0.3), 0.3, 0.3), "down": ((0.5, 0.3), (0.5, 0.7), 0.3, 0.3),
        "grow": (centre, centre, 0.15, 0.4), "shrink": (centre, centre, 0.4, 0.15),
    }[action]
    rgb = render_frames([Event("square", "red", action, 0, seconds, *geometry)], seconds, RATE, size, seed=1)
    return [SampledFrame(stream, i // RATE, i / RATE, 0.0, image) for i, image in enumerate(rgb)]


def cells(features: np.ndarray, grid: int) -> np.ndarray:
    """[N, 3 g^2] -> the clip's mean [3, g, g]: x flow, y flow, expansion."""
    return features[1:].mean(0).reshape(3, grid, grid)


@pytest.mark.parametrize("action, sign", [("left", (-1, 0)), ("right", (1, 0)), ("up", (0, -1)), ("down", (0, 1))])
def test_flow_points_the_way_the_shape_moves(action: str, sign: tuple[int, int]) -> None:
    features = MotionEncoder(4, RATE).encode(frames_of(action))
    assert features.shape == (3 * RATE, motion_dim(4)) == (12, 48) and features.dtype == np.float32
    flow = cells(features, 4)[:2].mean((1, 2))
    along = int(np.argmax(np.abs(sign)))
    assert np.sign(flow[along]) == sign[along] and abs(flow[along]) > 3 * abs(flow[1 - along])
    # the square travels 0.4 frame sides in 3 s; averaged over all 16 cells, of which it crosses a few, the mean
    # flow is a fraction of that, in frame sides per second whatever the frame size
    assert 0.005 < abs(flow[along]) < 0.4 / 3


@pytest.mark.parametrize("expansion", ["affine", "divergence"])
def test_expansion_tells_growing_from_shrinking_where_cell_borders_cross_the_shape(expansion: str) -> None:
    grow, shrink = (cells(MotionEncoder(4, RATE, expansion=expansion).encode(frames_of(a)), 4)[2]
                    for a in ("grow", "shrink"))
    centre = np.s_[1:3, 1:3]  # the shape sits on the four middle cells
    assert grow[centre].mean() > 0 > shrink[centre].mean()
    left = cells(MotionEncoder(4, RATE, expansion=expansion).encode(frames_of("left")), 4)[2]
    assert abs(left[centre].mean()) < grow[centre].mean()


def test_affine_expansion_sees_a_shape_grow_inside_one_cell_where_divergence_is_blind() -> None:
    """The mean divergence of a cell is the flux through its border: a shape growing within one cell of a 2 x 2
    grid reads a fraction of it there; the affine fit of the moving pixels reads the growth itself."""
    def expansion(action: str, kind: str) -> float:
        frames = frames_of(action, seconds=4, centre=(0.25, 0.25))  # the middle of the top-left cell
        return float(cells(MotionEncoder(2, RATE, expansion=kind).encode(frames), 2)[2, 0, 0])

    grow, shrink = expansion("grow", "affine"), expansion("shrink", "affine")
    assert grow > 0.05 and shrink < -0.05  # the size goes 0.15 <-> 0.4 of the frame in 4 s
    assert max(abs(expansion("grow", "divergence")), abs(expansion("shrink", "divergence"))) < 0.4 * min(grow, -shrink)
    still = MotionEncoder(2, RATE).encode([frames_of("grow")[0]] * 3)
    np.testing.assert_allclose(still, 0.0, atol=1e-6)  # nothing moves, nothing expands


def test_a_streams_first_frame_and_a_gap_have_no_motion_and_streams_stay_apart() -> None:
    left, right = frames_of("left", "a"), frames_of("right", "b")
    alone = MotionEncoder(4, RATE).encode(left)
    assert not alone[0].any() and alone[1:].any()
    # interleaved with another stream, in batches cut anywhere, each stream's flow is its own
    mixed = [f for pair in zip(left, right) for f in pair]
    encoder = MotionEncoder(4, RATE)
    together = np.concatenate([encoder.encode(mixed[:5]), encoder.encode(mixed[5:])])
    np.testing.assert_array_equal(together[0::2], alone)
    np.testing.assert_array_equal(together[1::2], MotionEncoder(4, RATE).encode(right))
    # after a reconnect (gap) or the end of a stream, it starts over without motion
    gapped = [left[0], SampledFrame("a", 0, 0.25, 0.0, left[1].rgb, gap=2.0)]
    assert not MotionEncoder(4, RATE).encode(gapped).any()
    encoder.forget("a")
    assert not encoder.encode(left[3:4]).any() and encoder.encode(right[6:7]).any()
    assert encoder.encode([]).shape == (0, 48)


def test_colour_planes_see_a_shape_of_the_backgrounds_brightness_move() -> None:
    """A purple square on a grey of its own luma, moving left: luma flow hardly sees it, Y, U and V flow does."""
    purple = np.array([140, 50, 190], np.float32)
    grey = round(float(purple @ np.array([0.299, 0.587, 0.114], np.float32)))
    rgb = np.full((3 * RATE, 96, 96, 3), grey, np.uint8)
    for i in range(len(rgb)):
        left = 60 - 3 * i
        rgb[i, 34:62, left:left + 28] = purple
    frames = [SampledFrame("s", i // RATE, i / RATE, 0.0, image) for i, image in enumerate(rgb)]
    luma, colour = (cells(MotionEncoder(4, RATE, planes).encode(frames), 4)[0].mean() for planes in ("y", "yuv"))
    assert colour < 0 and abs(luma) < abs(colour) / 10
    # a shape luma does see moves the same way in both, at a comparable speed
    red_luma, red_colour = (cells(MotionEncoder(4, RATE, planes).encode(frames_of("left")), 4)[0].mean()
                            for planes in ("y", "yuv"))
    assert red_colour < 0 and red_luma < 0 and 0.5 < red_colour / red_luma < 1.5


def test_motion_grid_must_divide_the_flow_frame_and_planes_and_expansion_be_known() -> None:
    for grid in (0, 3, 2.0):
        with pytest.raises(ValueError, match="motion grid"):
            MotionEncoder(grid, RATE)
    with pytest.raises(ValueError, match="motion planes must be one of y, yuv, got 'rgb'"):
        MotionEncoder(4, RATE, "rgb")
    with pytest.raises(ValueError, match="motion expansion must be one of divergence, affine, got 'curl'"):
        MotionEncoder(4, RATE, expansion="curl")
    with pytest.raises(ValueError, match="must divide 32, got 64"):
        MotionEncoder(64, RATE)
    assert MotionEncoder(64, RATE, expansion="divergence").dim == 3 * 64 * 64


def test_an_identity_recorded_before_motion_planes_and_expansion_means_luma_flow_and_divergence() -> None:
    from pipeline.features import complete_identity

    assert complete_identity({"motion_grid": 4})["motion_planes"] == "y"
    assert complete_identity({"motion_grid": 4})["motion_expansion"] == "divergence"
    recorded = {"motion_grid": 4, "motion_planes": "yuv", "motion_expansion": "affine"}
    assert complete_identity(recorded) | recorded == complete_identity(recorded)
    assert complete_identity({"motion_grid": 4, "motion_planes": "yuv"})["motion_expansion"] == "divergence"
    assert not {"motion_planes", "motion_expansion"} & set(complete_identity({"backbone": "mobilenet_v2"}))


def test_pooling_averages_the_motion_tail_and_normalises_only_appearance() -> None:
    frames = [SampledFrame("s", 0, t, 0.0, np.zeros((1, 1, 3), np.uint8)) for t in (0.0, 0.5)]
    features = np.array([[3.0, 0.0, 0.2, -1.0], [3.0, 4.0, 0.4, 1.0]], np.float32)
    pooler = SecondPooler(motion_dim=2)
    (second,) = pooler.add(frames, features) + pooler.flush()
    np.testing.assert_allclose(second.vector, [6 / 52**0.5, 4 / 52**0.5, 0.3, 0.0], atol=1e-6)


@pytest.mark.integration
def test_the_frame_path_appends_motion_to_appearance() -> None:
    try:
        path = default_weights_path()
    except MissingWeights as e:
        pytest.skip(str(e))
    plain = FrameEncoder("mobilenet_v2", path, "cpu", frame_size=64, sample_rate=RATE)
    moving = FrameEncoder("mobilenet_v2", path, "cpu", frame_size=64, sample_rate=RATE, motion_grid=4)
    assert (moving.appearance_dim, moving.motion_dim, moving.dim) == (1280, 48, 1328)
    assert moving.identity() == plain.identity() | {"motion_grid": 4, "motion_planes": "yuv",
                                                    "motion_expansion": "affine", "dim": 1328}
    frames = frames_of("down", size=64)
    out = moving.encode_frames(frames)
    np.testing.assert_allclose(out[:, :1280], plain.encode_frames(frames), atol=1e-5)
    np.testing.assert_array_equal(out[:, 1280:], MotionEncoder(4, RATE).encode(frames))
    with pytest.raises(BackboneError, match="motion grid"):
        FrameEncoder("mobilenet_v2", path, "cpu", frame_size=64, motion_grid=-1)


def test_whitening_keeps_the_motion_tail_out_of_the_pca() -> None:
    """Motion varies a thousand times less than appearance: a PCA of both would drop it; fitted apart, it is
    standardised into the last columns and the appearance's components fill the others."""
    generator = torch.Generator().manual_seed(0)
    appearance = torch.randn(500, 8, generator=generator, dtype=torch.float64) * torch.arange(1, 9)
    motion = 1e-3 * torch.randn(500, 2, generator=generator, dtype=torch.float64) + 0.5
    x = torch.cat([appearance, motion], 1)
    whitening = Whitening(10, 6).double()
    whitening.fit_pca(x, standardised=2)
    out = whitening(x)
    np.testing.assert_allclose(out.std(0).numpy(), 1.0, atol=0.02)  # every output direction has unit scale
    assert not whitening.projection[8:, :4].any() and not whitening.projection[:8, 4:].any()  # blocks stay apart
    std = motion.std(0)
    np.testing.assert_allclose(out[:, 4:].numpy(), ((motion - motion.mean(0)) / (std + 1e-3 * std.max())).numpy())
