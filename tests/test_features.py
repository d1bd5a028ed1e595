"""Per-second pooling (pure), the frame CNN with the real offline MobileNetV2 weights, and the offline frame path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.device import DeviceUnavailable, pick_device
from pipeline.features import video_features
from pipeline.features.backbone import (
    BackboneError,
    FrameEncoder,
    MissingWeights,
    UnknownBackbone,
    build_backbone,
    default_weights_path,
    fuse_batch_norms,
)
from pipeline.features.pooling import SecondPooler
from pipeline.video.source import SampledFrame, SourceOptions, VideoSource
from test_video import COLOURS, cfr, render  # pytest puts tests/ on sys.path (no __init__.py)

torch.set_num_threads(2)


def frame(stream: str, second: int, capture: float = 0.0, gap: float = 0.0) -> SampledFrame:
    return SampledFrame(stream, second, float(second), capture, np.empty((0, 0, 3), np.uint8), gap)


def expected_vector(features: np.ndarray) -> np.ndarray:
    mean = features.mean(0)
    return mean / np.linalg.norm(mean)


def imagenet(frames: np.ndarray) -> torch.Tensor:
    """The reference preprocessing, written out: [0, 1] then ImageNet mean and std."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


# ---- pooling -----------------------------------------------------------------------------------------------------


def test_pooler_emits_a_second_when_the_next_one_starts() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 8)).astype(np.float32)
    pooler = SecondPooler()
    assert pooler.add([frame("a", 0), frame("a", 0)], feats[:2]) == []
    out = pooler.add([frame("a", 0, capture=5.0), frame("a", 1, capture=6.0)], feats[2:4])
    assert [(p.stream_id, p.second, p.frames) for p in out] == [("a", 0, 3)]
    np.testing.assert_allclose(out[0].vector, expected_vector(feats[:3]), rtol=1e-5)
    assert out[0].vector.dtype == np.float32 and out[0].capture_time == 5.0
    out = pooler.add([frame("a", 1)], feats[4:])
    assert out == []
    (last,) = pooler.flush()
    assert (last.second, last.frames, last.capture_time) == (1, 2, 6.0)
    np.testing.assert_allclose(last.vector, expected_vector(feats[3:]), rtol=1e-5)
    assert pooler.flush() == []


def test_pooler_keeps_streams_apart_and_carries_gaps() -> None:
    feats = np.eye(4, dtype=np.float32)
    pooler = SecondPooler()
    frames = [frame("a", 0), frame("b", 7), frame("a", 3, gap=2.5), frame("b", 7)]
    out = pooler.add(frames, feats)
    assert [(p.stream_id, p.second) for p in out] == [("a", 0)]
    rest = {(p.stream_id, p.second): p for p in pooler.flush()}
    assert set(rest) == {("a", 3), ("b", 7)}
    assert rest[("a", 3)].gap == 2.5 and rest[("b", 7)].gap == 0
    np.testing.assert_allclose(rest[("b", 7)].vector, expected_vector(feats[[1, 3]]), rtol=1e-6)


def test_pooler_flushes_one_stream() -> None:
    pooler = SecondPooler()
    pooler.add([frame("a", 0), frame("b", 0)], np.ones((2, 3)))
    assert [p.stream_id for p in pooler.flush("b")] == ["b"]
    assert pooler.flush("b") == []
    assert [p.stream_id for p in pooler.flush()] == ["a"]


def test_pooler_closes_a_second_that_gets_no_more_frames() -> None:
    pooler = SecondPooler(frames_per_second=2)
    pooler.add([frame("a", 4, capture=7.0)], np.ones((1, 3)))
    assert pooler.close("a", 3) == [] and pooler.close("b", 4) == []  # not the open second, not an open stream
    (closed,) = pooler.close("a", 4)
    assert (closed.second, closed.frames, closed.capture_time) == (4, 1, 7.0) and pooler.close("a", 4) == []
    # a frame of it that still comes is a straggler: dropped, but the media time missing before it is not
    assert pooler.add([frame("a", 4, gap=0.5)], np.ones((1, 3))) == []
    pooler.add([frame("a", 5, gap=0.25)], np.ones((1, 3)))
    assert [(p.second, p.gap) for p in pooler.flush("a")] == [(5, 0.75)]


def test_pooler_accepts_torch_features() -> None:
    pooler = SecondPooler()
    pooler.add([frame("a", 0)], torch.tensor([[3.0, 4.0]]))
    np.testing.assert_allclose(pooler.flush()[0].vector, [0.6, 0.8])


def test_pooler_rejects_bad_input() -> None:
    pooler = SecondPooler()
    with pytest.raises(ValueError, match="features must be"):
        pooler.add([frame("a", 0)], np.ones((2, 3)))
    pooler.add([frame("a", 5)], np.ones((1, 3)))
    with pytest.raises(ValueError, match="second 4 arrived after second 5"):
        pooler.add([frame("a", 4)], np.ones((1, 3)))


@settings(max_examples=40, deadline=None)
@given(
    seconds=st.lists(st.integers(0, 3), min_size=1, max_size=30).map(sorted),
    cuts=st.lists(st.integers(1, 29), max_size=5),
    seed=st.integers(0, 1000),
)
def test_pooling_does_not_depend_on_batching(seconds: list[int], cuts: list[int], seed: int) -> None:
    feats = np.random.default_rng(seed).normal(size=(len(seconds), 6)).astype(np.float32)
    frames = [frame("s", s) for s in seconds]
    pooler = SecondPooler()
    bounds = [0, *sorted(c for c in set(cuts) if c < len(seconds)), len(seconds)]
    out = [p for lo, hi in zip(bounds, bounds[1:]) for p in pooler.add(frames[lo:hi], feats[lo:hi])] + pooler.flush()
    assert [p.second for p in out] == sorted(set(seconds))
    for p in out:
        np.testing.assert_allclose(p.vector, expected_vector(feats[np.array(seconds) == p.second]), atol=1e-5)
        assert np.linalg.norm(p.vector) == pytest.approx(1.0, abs=1e-6)


# ---- devices -----------------------------------------------------------------------------------------------------


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceUnavailable, match="unknown device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="CUDA is not available"):
            pick_device("cuda")


# ---- backbone with the real weights --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder() -> FrameEncoder:
    try:
        path = default_weights_path()
    except MissingWeights as e:
        pytest.skip(str(e))
    return FrameEncoder("mobilenet_v2", path, "cpu", frame_size=64, sample_rate=2, batch_size=4)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("features") / "clip.mp4", cfr(3.5))


@pytest.mark.integration
def test_encoder_matches_torchvision_and_is_deterministic(encoder: FrameEncoder) -> None:
    frames = np.random.default_rng(1).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    out = encoder.encode(frames)
    assert out.shape == (6, 1280) and out.dtype == np.float32 and encoder.dim == 1280
    np.testing.assert_array_equal(out, encoder.encode(frames))  # same input, same bits
    np.testing.assert_allclose(out[4:], encoder.encode(frames[4:]), atol=1e-5)  # batch position does not matter
    # independent reference: torchvision's MobileNetV2 features, global average pooled
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(encoder.weights_path, weights_only=True))
    with torch.no_grad():
        reference = model.eval().features(imagenet(frames)).mean((2, 3)).numpy()
    np.testing.assert_allclose(out, reference, atol=1e-4)  # with its batch norms folded into the convolutions
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.model.modules())
    assert encoder.encode(np.empty((0, 64, 64, 3), np.uint8)).shape == (0, 1280)
    with pytest.raises(ValueError, match="eval mode"):
        fuse_batch_norms(torchvision.models.mobilenet_v2().train())


@pytest.mark.integration
def test_encoder_identity(encoder: FrameEncoder) -> None:
    identity = encoder.identity()
    assert identity == {
        "backbone": "mobilenet_v2",
        "weights": "mobilenet_v2-b0353104.pth",
        "weights_sha256": identity["weights_sha256"],
        "frame_size": 64,
        "sample_rate": 2,
        "spatial_grid": 1,
        "motion_grid": 0,
        "dim": 1280,
    }
    assert identity["weights_sha256"].startswith("b0353104")  # torchvision names its files by the hash prefix


def test_a_spatial_grid_keeps_the_global_vector_and_adds_its_cells(encoder: FrameEncoder) -> None:
    gridded = FrameEncoder("mobilenet_v2", encoder.weights_path, "cpu", frame_size=64, sample_rate=2, spatial_grid=2)
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    plain, cells = encoder.encode(frames), gridded.encode(frames)
    assert gridded.dim == 5 * 1280 and gridded.identity()["spatial_grid"] == 2 and cells.shape == (3, 5 * 1280)
    np.testing.assert_allclose(cells[:, :1280], plain, rtol=1e-5, atol=1e-6)  # the global average comes first
    # the global average of a 2 x 2 feature map is the mean of its cells
    np.testing.assert_allclose(cells[:, 1280:].reshape(3, 4, 1280).mean(1), plain, rtol=1e-4, atol=1e-5)
    with pytest.raises(BackboneError, match="spatial grid"):
        FrameEncoder("mobilenet_v2", encoder.weights_path, "cpu", frame_size=64, spatial_grid=0)


def test_encoder_rejects_bad_frames(encoder: FrameEncoder) -> None:
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        encoder.encode(np.zeros((2, 3, 64, 64), np.uint8))


def test_backbone_errors(tmp_path: Path) -> None:
    with pytest.raises(UnknownBackbone, match="resnet_9000"):
        build_backbone("resnet_9000", str(tmp_path / "w.pth"))
    with pytest.raises(MissingWeights, match="not found"):
        build_backbone("resnet18", str(tmp_path / "w.pth"))
    with pytest.raises(MissingWeights, match="needs a weights file"):
        FrameEncoder("resnet18")
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "v3.pth")
    with pytest.raises(BackboneError, match="does not hold weights for mobilenet_v2"):
        build_backbone("mobilenet_v2", str(tmp_path / "v3.pth"))
    torch.save(torchvision.models.squeezenet1_1().state_dict(), tmp_path / "sq.pth")
    with pytest.raises(UnknownBackbone, match="no Linear"):
        build_backbone("squeezenet1_1", str(tmp_path / "sq.pth"))


def test_other_backbones_lose_only_their_class_scores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small().eval()
    torch.save(reference.state_dict(), tmp_path / "v3.pth")
    encoder = FrameEncoder("mobilenet_v3_small", str(tmp_path / "v3.pth"), "cpu", frame_size=64)
    assert encoder.dim == 1024  # classifier = Linear(576, 1024), Hardswish, Dropout, Linear(1024, 1000)
    frames = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    reference.classifier[3] = torch.nn.Identity()
    with torch.no_grad():
        np.testing.assert_allclose(encoder.encode(frames), reference(imagenet(frames)).numpy(), atol=1e-4)


# ---- the offline frame path -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_video_features_are_the_live_path_pooled(encoder: FrameEncoder, clip: Path) -> None:
    features = video_features(clip, encoder, batch_size=3)
    assert features.shape == (4, 1280) and features.dtype == np.float16  # 3.5 s: seconds 0..3
    np.testing.assert_allclose(np.linalg.norm(features.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # the same pieces by hand: sample at the encoder's rate and size, encode, average, normalise
    frames = list(VideoSource(str(clip), options=SourceOptions(sample_rate=2, frame_size=64)))
    assert len(frames) == 7
    feats = encoder.encode(np.stack([f.rgb for f in frames]))
    seconds = np.array([f.second for f in frames])
    for s in range(4):
        np.testing.assert_allclose(features[s], expected_vector(feats[seconds == s]), atol=2e-3)
    # seconds 0 and 3 show the same colour, second 1 another one
    cosine = features.astype(np.float32) @ features.astype(np.float32).T
    assert COLOURS[0].tolist() == COLOURS[3 % 3].tolist() and cosine[0, 3] > cosine[0, 1]


def test_pooler_emits_a_full_second_without_waiting_for_the_next():
    from pipeline.features.pooling import SecondPooler
    from pipeline.video.source import SampledFrame

    def frame(t):
        return SampledFrame("s", int(t), t, 100.0 + t, np.zeros((2, 2, 3), np.uint8))

    eager, lazy = SecondPooler(frames_per_second=2), SecondPooler()
    frames = [frame(0.0), frame(0.5)]
    features = np.eye(2, dtype=np.float32)
    assert [s.second for s in eager.add(frames, features)] == [0]
    assert lazy.add(frames, features) == []
    late = eager.add([frame(0.75), frame(1.0)], np.eye(2, dtype=np.float32))  # a straggler of second 0 is dropped
    assert late == [] and [s.second for s in eager.flush("s")] == [1]
    np.testing.assert_allclose(eager.add([frame(2.0), frame(2.5)], features)[0].vector, lazy.flush("s")[0].vector)
