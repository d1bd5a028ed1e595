"""CMHN architecture: candidate mapping, causality and look-ahead of the TCN, the surrogate and the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness import narrow_cmhn
from pipeline.model import PRESETS, build_cmhn, candidate_spans, cmhn_loss, moments_ending_at, smooth_sign, target_iou
from pipeline.model.tcn import TemporalConvNet

pytestmark = pytest.mark.usefixtures("one_thread_seeded")


@pytest.mark.parametrize("preset", ["tacos", "activitynet", "lite"])
@pytest.mark.parametrize("seconds", [1, 10, 22, 23, 150, 300])
def test_candidate_spans_follow_the_formula(preset: str, seconds: int) -> None:
    config = PRESETS[preset]
    expected = [
        (x - k, x) for k, s in zip(config.kernel_sizes, config.strides) for x in range(k, seconds + 1, s)
    ]
    spans = candidate_spans(seconds, config.kernel_sizes, config.strides)
    assert spans.dtype == np.int64 and spans.shape == (len(expected), 2)
    assert [tuple(span) for span in spans.tolist()] == expected
    with torch.no_grad():
        codes = narrow_cmhn(preset).ven(torch.randn(seconds, 6, dtype=torch.float64))
    assert codes.shape == (len(expected), 16)


def test_scales_longer_than_the_video_are_skipped() -> None:
    config = PRESETS["tacos"]
    spans = candidate_spans(10, config.kernel_sizes, config.strides)
    assert spans[:, 1].max() == 10 and (spans[:, 1] - spans[:, 0]).max() == 9


@pytest.mark.parametrize("preset", ["tacos", "activitynet"])
def test_each_output_row_scores_its_span(preset: str) -> None:
    """Row j of VEN is the head of length k applied to exactly the TCN outputs inside span j."""
    model, seconds = narrow_cmhn(preset), 240
    video = torch.randn(seconds, 6, dtype=torch.float64)
    with torch.no_grad():
        codes = model.ven(video)
        feed = model.ven.tcn(video.T[None])
        spans = candidate_spans(seconds, model.config.kernel_sizes, model.config.strides)
        heads = dict(zip(model.config.kernel_sizes, model.ven.heads))
        for row in np.random.default_rng(0).choice(len(spans), 40, replace=False):
            start, end = spans[row]
            direct = model.ven.net(heads[end - start](feed[:, :, start:end])[:, :, 0])[0]
            torch.testing.assert_close(codes[row], direct)


def test_batched_videos_match_single_videos() -> None:
    model = narrow_cmhn("lite")
    videos = torch.randn(3, 40, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.ven(videos), torch.stack([model.ven(v) for v in videos]))


def tcn(preset: str, causal: bool) -> TemporalConvNet:
    """The preset's TCN shape, narrow, with weights large enough that even the farthest tap moves an output in
    float64 (at the reference init of std 0.01 it vanishes after a few convs)."""
    config = PRESETS[preset]
    net = TemporalConvNet(4, (7, 6, 5, 5, 4, 4, 3)[: len(config.channels)], config.kernel, 0.0, causal).double()
    for parameter in net.parameters():
        torch.nn.init.normal_(parameter)
    return net.eval()


def changed_outputs(net: TemporalConvNet, seconds: int, changed: int) -> np.ndarray:
    """The output seconds that move when input second `changed` alone is changed."""
    x = torch.randn(1, 4, seconds, dtype=torch.float64)
    y = x.clone()
    y[:, :, changed] += 1.0
    with torch.no_grad():
        moved = (net(x) - net(y)).abs().amax(dim=(0, 1)) > 0
    return np.flatnonzero(moved.numpy())


@pytest.mark.parametrize("preset, receptive_field", [("tacos", 61), ("lite", 13)])
def test_causal_tcn_reads_only_the_past(preset: str, receptive_field: int) -> None:
    net = tcn(preset, causal=True)
    moved = changed_outputs(net, 200, 100)
    assert moved.min() == 100, "an output before the changed second moved"
    assert moved.max() == 100 + receptive_field - 1
    assert net.receptive_field == receptive_field and net.look_ahead == 0


def test_causal_activitynet_receptive_field() -> None:
    net = tcn("activitynet", causal=True)
    assert net.receptive_field == 1 + 2 * 6 * 127
    moved = changed_outputs(net, 1600, 20)
    assert moved.min() == 20 and moved.max() == 20 + net.receptive_field - 1


def test_bidirectional_tcn_has_the_published_look_ahead() -> None:
    net = tcn("tacos", causal=False)
    assert net.look_ahead == 30
    moved = changed_outputs(net, 200, 100)
    assert moved.min() == 100 - 30 and moved.max() == 100 + 30
    assert build_cmhn("lite", video_dim=6, causal=False).ven(torch.randn(20, 6)).shape[0] == len(
        candidate_spans(20, PRESETS["lite"].kernel_sizes, PRESETS["lite"].strides)
    )


def test_smooth_sign_is_bounded_odd_and_agrees_in_sign() -> None:
    x = torch.randn(500, 64, dtype=torch.float64) * torch.logspace(-3, 3, 500, dtype=torch.float64)[:, None]
    h = smooth_sign(x)
    assert h.abs().max() <= 1.0 + 1e-5
    torch.testing.assert_close(smooth_sign(-x), -h, atol=1e-6, rtol=0)
    assert torch.equal(torch.sign(h), torch.sign(x))


def test_smooth_sign_is_the_papers_formula() -> None:
    x = [0.3, -1.2, 2.0, 0.5]
    scale = math.sqrt(4) / math.sqrt(sum(v * v for v in x))
    expected = [math.log(1 + 3.92155 * (v * scale) ** 2) / (1.59362 * v * scale + 1e-7) for v in x]
    got = smooth_sign(torch.tensor([x], dtype=torch.float64))[0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_loss_by_hand() -> None:
    h_s = [[0.5, -0.2, 0.9, -1.0, 0.1, 0.0, -0.7, 0.3], [-0.4, 0.8, 0.2, 0.6, -0.9, 0.5, 0.1, -0.3]]
    h_v = [
        [0.1, 0.2, -0.3, 0.4, -0.5, 0.6, -0.7, 0.8],
        [-0.9, 0.7, 0.5, -0.3, 0.1, -0.2, 0.4, -0.6],
        [1.0, -1.0, 0.0, 0.25, -0.25, 0.75, -0.75, 0.5],
    ]
    iou = [[0.0, 0.5, 1.0], [0.25, 0.0, 0.75]]
    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    dot = lambda s, v: sum(a * b for a, b in zip(s, v))  # noqa: E731
    l1 = sum((dot(s, v) - 8 * iou[i][j]) ** 2 for i, s in enumerate(h_s) for j, v in enumerate(h_v))
    l2 = sum((x - sign(x)) ** 2 for row in h_s + h_v for x in row)
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    assert cmhn_loss(as_tensor(h_s), as_tensor(h_v), as_tensor(iou)).item() == pytest.approx(l1 + l2, rel=1e-12)


def test_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="iou"):
        cmhn_loss(torch.zeros(2, 8), torch.zeros(3, 8), torch.zeros(3, 2))


def test_target_iou_takes_the_best_ground_truth() -> None:
    candidates = np.array([[0, 4], [4, 8], [8, 12]])
    targets = target_iou([np.array([[0, 4]]), np.array([[8, 12], [2, 6]])], candidates)
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.0, 0.0], [2 / 6, 2 / 6, 1.0]]))
    with pytest.raises(ValueError, match="non-empty"):
        target_iou([np.array([[0, 4]]), np.zeros((0, 2))], candidates)


def test_builder_and_encoders() -> None:
    model = build_cmhn("lite", video_dim=6, sentence_dim=10, bits=32)
    assert model.qen(torch.randn(5, 10)).shape == (5, 32)
    assert model.config.causal and model.config.channels == PRESETS["lite"].channels
    with pytest.raises(ValueError, match="unknown CMHN preset 'nope'"):
        build_cmhn("nope")
    with pytest.raises(ValueError, match="multiple of 8"):
        build_cmhn("lite", bits=12)
    with pytest.raises(ValueError, match=r"\[T, 6\]"):
        model.ven(torch.randn(30, 7))
    with pytest.raises(ValueError, match="shorter than the shortest"):
        model.ven(torch.randn(0, 6))


def test_presets_follow_the_reference() -> None:
    tacos, activitynet = PRESETS["tacos"], PRESETS["activitynet"]
    assert tacos.kernel_sizes[-1] == 23 and tacos.strides[-1] == 2 and set(tacos.strides[:-1]) == {1}
    big = dict(zip(activitynet.kernel_sizes, activitynet.strides))
    assert [big[k] for k in (19, 23, 50, 211)] == [1, 2, 4, 21]


@pytest.mark.parametrize("preset", ["lite", "tacos", "activitynet"])
def test_moments_ending_at_counts_the_candidate_mapping(preset: str) -> None:
    config = PRESETS[preset]
    spans = candidate_spans(300, config.kernel_sizes, config.strides)
    ends = np.bincount(spans[:, 1], minlength=301)
    assert [moments_ending_at(x, config.kernel_sizes, config.strides) for x in range(301)] == ends.tolist()
