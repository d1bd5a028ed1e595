"""Extract, train and eval end to end on a tiny rendered dataset with the real MobileNetV2 and MiniLM encoders;
resuming an interrupted extraction or training run; seeded training being reproducible."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.datasets import load_activitynet
from pipeline.features.backbone import FrameEncoder
from pipeline.features.sentence import SentenceEncoder
from pipeline.model import build_cmhn, load_checkpoint, smooth_sign
from pipeline.training.evaluate import PER_IOU_LABEL, Sample, build_samples, evaluate, score_video
from pipeline.training.extract import ExtractorMismatch, FeatureError, FeatureSet, extract_features, open_for
from pipeline.training.train import TrainError, TrainOptions, state_path, step_groups, train
from pipeline.video.synth import SynthConfig, build_dataset
from workers.cli import main as vmh
from workers.eval_cmd import format_report
from workers.train_cmd import default_val_spec

TINY = SynthConfig(seed=3, train=4, val=2, test=2, fps=4, size=64, min_duration=12, max_duration=16)
FRAME = ["--frame-size", "64", "--sample-rate", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rendered dataset with its features in DIR/features, extracted by `vmh extract`."""
    out = tmp_path_factory.mktemp("tiny")
    build_dataset(out, TINY, progress=False)
    assert vmh(["extract", str(out / "videos"), "--out", str(out / "features"), "--no-progress", *FRAME]) == 0
    return out


@pytest.fixture(scope="module")
def sentences(data: Path) -> SentenceEncoder:
    return SentenceEncoder("cpu", cache_dir=data / "cache")


@pytest.fixture(scope="module")
def samples(data: Path, sentences: SentenceEncoder) -> dict[str, list[Sample]]:
    features = FeatureSet.open(data / "features")
    return {
        split: build_samples(load_activitynet(data / f"{split}.json"), features, sentences.encode, torch.device("cpu"))
        for split in ("train", "val")
    }


def test_extract_writes_one_float16_array_per_video(data: Path) -> None:
    features = FeatureSet.open(data / "features")
    assert sorted(features.videos) == sorted(p.stem for p in (data / "videos").glob("*.mp4"))
    assert features.extractor["frame_size"] == 64 and features.extractor["sample_rate"] == 2
    assert features.extractor["backbone"] == "mobilenet_v2" and features.extractor["dim"] == 1280
    for video_id, seconds in features.videos.items():
        array = np.load(data / "features" / f"{video_id}.npy")
        assert array.dtype == np.float16 and array.shape == (seconds, 1280)
        assert 12 <= seconds <= 16
        np.testing.assert_allclose(np.linalg.norm(array.astype(np.float32), axis=1), 1.0, atol=1e-2)


def test_extract_resumes_after_an_interruption(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "features"
    shutil.copytree(data / "features", out)
    (lost, cut, *_) = sorted(FeatureSet.open(out).videos)
    original = {vid: np.load(out / f"{vid}.npy") for vid in (lost, cut)}
    (out / f"{lost}.npy").unlink()  # killed before the rename: only a partial file is left
    (out / f"{cut}.npy").rename(out / f"{cut}.npy.part")
    (out / f"{cut}.npy.part").write_bytes((out / f"{cut}.npy.part").read_bytes()[:1000])
    encoder = FrameEncoder(device="cpu", frame_size=64, sample_rate=2)
    result = extract_features(data / "videos", out, encoder, progress=False)
    assert sorted(result.extracted) == [lost, cut]
    assert len(result.skipped) == len(FeatureSet.open(out).videos) - 2
    assert not list(out.glob("*.part"))
    for vid, array in original.items():
        np.testing.assert_allclose(np.load(out / f"{vid}.npy"), array, atol=2e-3)


def test_extract_leaves_out_an_undecodable_video_and_extracts_the_rest(data: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    good = sorted((data / "videos").glob("*.mp4"))[0]
    shutil.copy(good, videos / good.name)
    (videos / "aaa_garbage.mp4").write_bytes(b"not a video at all" * 100)  # sorted first: tried before the good one
    args = ["extract", str(videos), "--out", str(tmp_path / "features"), "--frame-size", "64", "--sample-rate", "2",
            "--no-progress", "--device", "cpu"]
    assert vmh(args) == 1
    assert "1 video could not be decoded and was left out: aaa_garbage" in capsys.readouterr().err
    features = FeatureSet.open(tmp_path / "features")
    assert list(features.videos) == [good.stem]
    np.testing.assert_allclose(np.load(tmp_path / "features" / f"{good.stem}.npy"),
                               np.load(data / "features" / f"{good.stem}.npy"), atol=2e-3)


def test_extract_refuses_features_of_another_extractor(data: Path, tmp_path: Path) -> None:
    shutil.copytree(data / "features", tmp_path / "features")
    other = FeatureSet.open(data / "features").extractor | {"frame_size": 224}
    with pytest.raises(ExtractorMismatch, match="frame_size: 64 there, 224 now"):
        open_for(tmp_path / "features", other)
    with pytest.raises(FeatureError, match="no manifest.json"):
        FeatureSet.open(tmp_path)


@pytest.fixture(scope="module")
def checkpoint(data: Path) -> Path:
    """A lite checkpoint trained for 2 epochs by `vmh train`."""
    out = data / "ckpt"
    args = ["train", "--dataset", f"activitynet:{data / 'train.json'}", "--features", str(data / "features"),
            "--out", str(out), "--epochs", "2", "--no-progress", "--device", "cpu", "--cache-dir", str(data / "cache")]
    assert vmh(args) == 0
    return out


def test_train_saves_a_loadable_checkpoint(data: Path, checkpoint: Path) -> None:
    model, config = load_checkpoint(checkpoint, preset="lite", extractor=FeatureSet.open(data / "features").extractor)
    assert config["bits"] == 128 and config["causal"] and config["sentence_encoder"] == "all-MiniLM-L6-v2"
    assert config["extra"]["best_epoch"] in (1, 2) and model.config.video_dim == 1280
    assert torch.load(state_path(checkpoint), weights_only=True)["epoch"] == 2


def test_train_backwards_adds_every_training_video_played_backwards(data: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    args = ["train", "--dataset", f"activitynet:{data / 'train.json'}", "--features", str(data / "features"),
            "--epochs", "1", "--no-progress", "--device", "cpu", "--cache-dir", str(data / "cache")]
    assert vmh([*args, "--out", str(tmp_path / "ckpt"), "--backwards"]) == 0
    assert load_checkpoint(tmp_path / "ckpt")[1]["extra"]["backwards"] is True
    capsys.readouterr()
    charades = tmp_path / "train.json"  # captions without synthetic labels: no reverse to play
    charades.write_text(json.dumps({vid: {k: v for k, v in entry.items() if k != "labels"}
                                    for vid, entry in json.loads((data / "train.json").read_text()).items()}))
    args[2] = f"activitynet:{charades}"
    assert vmh([*args, "--val", f"activitynet:{data / 'val.json'}", "--out", str(tmp_path / "other"),
                "--backwards"]) == 2
    assert "has no synthetic label (None) to play backwards" in capsys.readouterr().err


def test_eval_reports_every_labelled_recall(data: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["eval", "--checkpoint", str(checkpoint), "--dataset", f"activitynet:{data / 'test.json'}",
            "--features", str(data / "features"), "--device", "cpu", "--cache-dir", str(data / "cache"), "--json"]
    capsys.readouterr()
    assert vmh(args) == 0
    report = json.loads(capsys.readouterr().out)
    metrics = [f"R@{n},IoU={m}" for n in (1, 5) for m in (0.3, 0.5, 0.7)]
    for scoring in ("hashed", "continuous", "random"):
        assert set(report[scoring]) == {"nms=0.5", PER_IOU_LABEL} == set(report["protocols"])
        for protocol in report[scoring].values():
            assert set(protocol) == set(metrics) and all(0 <= v <= 1 for v in protocol.values())
    assert report["queries"] == sum(len(v.annotations) for v in load_activitynet(data / "test.json"))
    assert 0 < report["query_ms"]["mean"] and report["query_ms"]["queries"] == report["queries"]
    table = format_report(report)
    assert "nms=m-0.05" in table and "continuous" in table and "R@5,IoU=0.7" in table and "ms mean" in table


def test_training_calibrates_and_eval_alerts_reports_at_that_threshold(data: Path, checkpoint: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """`vmh train` stores the validation split's best alert threshold; `vmh eval --alerts` reports the live logic's
    events at it and over the sweep, as JSON and as a table."""
    from workers.eval_cmd import format_alerts

    config = json.loads((checkpoint / "config.json").read_text())
    assert config["threshold"] == config["calibration"]["threshold"] and 0 < config["threshold"] <= 64
    args = ["eval", "--checkpoint", str(checkpoint), "--dataset", f"activitynet:{data / 'test.json'}",
            "--features", str(data / "features"), "--device", "cpu", "--cache-dir", str(data / "cache"), "--alerts",
            "--thresholds", "8:64:8", "--json"]
    capsys.readouterr()
    assert vmh(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["threshold"] == config["threshold"] and report["at_threshold"]["threshold"] == config["threshold"]
    assert {8, 16, 64, config["threshold"]} <= {entry["threshold"] for entry in report["sweep"]}
    videos = load_activitynet(data / "test.json")
    assert report["at_threshold"]["queries"] == len({a.sentence for v in videos for a in v.annotations})
    for entry in report["sweep"]:
        for iou in ("IoU=0.5", "IoU=0.3"):
            assert entry[iou]["right"] + entry[iou]["false"] == entry["events"]
    assert "<- checkpoint" in format_alerts(report)


def test_eval_calibrate_stores_a_splits_best_threshold_in_the_checkpoint(data: Path, checkpoint: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    model = shutil.copytree(checkpoint, tmp_path / "model")
    args = ["eval", "--checkpoint", str(model), "--dataset", f"activitynet:{data / 'val.json'}", "--features",
            str(data / "features"), "--device", "cpu", "--cache-dir", str(data / "cache"), "--alerts", "--json"]
    assert vmh([*args[:-2], "--calibrate"]) == 2
    assert "--calibrate calibrates the alert threshold: give --alerts too" in capsys.readouterr().err
    assert vmh([*args, "--calibrate"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = json.loads((model / "config.json").read_text())
    calibration = config["calibration"]
    assert calibration["split"] == f"activitynet:{data / 'val.json'}" and calibration["videos"] == 2
    assert report["threshold"] == config["threshold"] == calibration["threshold"]
    assert report["at_threshold"]["IoU=0.5"]["f1"] == calibration["f1"]
    # the split's best up to it (the sweep of calibration stops a few thresholds past its best)
    assert calibration["f1"] >= max(e["IoU=0.5"]["f1"] for e in report["sweep"] if e["threshold"] <= report["threshold"])


def test_eval_refuses_features_of_another_extractor(data: Path, checkpoint: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    features = FeatureSet.open(data / "features")
    other = tmp_path / "features"
    shutil.copytree(data / "features", other)
    FeatureSet(other, features.extractor | {"sample_rate": 4.0}, features.videos).save()
    args = ["eval", "--checkpoint", str(checkpoint), "--dataset", f"activitynet:{data / 'test.json'}",
            "--features", str(other), "--cache-dir", str(data / "cache")]
    assert vmh(args) == 2
    assert "extractor.sample_rate: expected 4.0, found 2.0" in capsys.readouterr().err


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(state_path(path), weights_only=True)["model"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(samples: dict[str, list[Sample]], out: Path, resume: bool = False, **options) -> None:
    train(TrainOptions(**options), samples["train"], samples["val"], out, extractor={"dim": 1280},
          sentence_encoder="all-MiniLM-L6-v2", resume=resume, progress=False)


def test_training_with_a_seed_is_reproducible(samples: dict[str, list[Sample]], tmp_path: Path) -> None:
    run(samples, tmp_path / "a", epochs=1, seed=5)
    run(samples, tmp_path / "b", epochs=1, seed=5)
    torch.manual_seed(5)
    initial = build_cmhn("lite").state_dict()
    assert same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert not same(weights(tmp_path / "a"), initial)


def test_resumed_training_continues_from_the_saved_epoch(samples: dict[str, list[Sample]], tmp_path: Path) -> None:
    run(samples, tmp_path / "straight", epochs=2, causal=False)
    run(samples, tmp_path / "resumed", epochs=1, causal=False)
    assert torch.load(state_path(tmp_path / "resumed"), weights_only=True)["epoch"] == 1
    run(samples, tmp_path / "resumed", resume=True, epochs=2, causal=False)
    state = torch.load(state_path(tmp_path / "resumed"), weights_only=True)
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    assert same(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    with pytest.raises(TrainError, match="causal: False then, True now"):
        run(samples, tmp_path / "resumed", resume=True, epochs=3, causal=True)
    with pytest.raises(TrainError, match="no training state"):
        run(samples, tmp_path / "never", resume=True, epochs=1)


def test_hashed_scores_are_sign_code_inner_products(samples: dict[str, list[Sample]]) -> None:
    torch.manual_seed(0)
    model = build_cmhn("lite", bits=64).eval()
    sample = samples["val"][0]
    spans, hashed, continuous = score_video(model, sample)
    with torch.no_grad():
        query, video = model.qen(sample.sentence_vectors), model.ven(sample.video)
    np.testing.assert_array_equal(hashed, (query.sign() @ video.sign().T).numpy())
    np.testing.assert_allclose(continuous, (smooth_sign(query) @ smooth_sign(video).T).numpy(), rtol=1e-5)
    assert spans.shape == (hashed.shape[1], 2) and spans.max() == len(sample.video)
    table = evaluate(model, samples["val"], random_draws=3)
    assert set(table) == {"hashed", "continuous", "random"}


def test_default_validation_split() -> None:
    assert default_val_spec("activitynet:/d/train.json") == "activitynet:/d/val.json"
    with pytest.raises(ValueError, match="--val is required"):
        default_val_spec("activitynet:/d/train_1.json")


def test_samples_need_features_that_fit_the_annotations(data: Path) -> None:
    features = FeatureSet.open(data / "features")
    video = load_activitynet(data / "test.json")[0]
    cpu = torch.device("cpu")

    def encode(texts: list[str]) -> np.ndarray:
        return np.zeros((len(texts), 384), np.float32)

    (sample,) = build_samples([video], features, encode, cpu)
    assert sample.video.shape == (features.videos[video.video_id], 1280) and sample.video.dtype == torch.float32
    with pytest.raises(FeatureError, match="cover .* s but the annotation says 60 s"):
        build_samples([replace(video, duration=60.0)], features, encode, cpu)
    with pytest.raises(FeatureError, match="no features for 1 annotated videos"):
        build_samples([replace(video, video_id="elsewhere")], features, encode, cpu)


def test_cross_video_targets_follow_events_wherever_they_happen() -> None:
    """Sentence i against video b's candidates: the IoU with b's moments of i's event (another phrasing counts),
    0 where b lacks the event; pairs of other videos weigh negative_weight."""
    from pipeline.model.cmhn import candidate_spans
    from pipeline.spans import ground_truth_iou
    from pipeline.training.train import Targets

    def sample(video_id: str, seconds: int, annotations: list[tuple[str, str, float, float]]) -> Sample:
        return Sample(video_id, torch.zeros(seconds, 4), tuple(a[0] for a in annotations),
                      torch.zeros(len(annotations), 3), tuple(np.array([[a[2], a[3]]]) for a in annotations),
                      tuple(a[1] for a in annotations))

    samples = [sample("a", 20, [("a red disc rises", "red circle up", 2, 8),
                                ("a blue box sinks", "blue square down", 10, 16)]),
               sample("b", 24, [("the red circle moves up", "red circle up", 12, 20)])]
    model = build_cmhn("lite", video_dim=4, sentence_dim=3)
    targets = Targets(model, samples)
    spans_b = candidate_spans(24, model.config.kernel_sizes, model.config.strides)
    cross = targets.block(0, 1)
    np.testing.assert_allclose(cross[0].numpy(), ground_truth_iou(spans_b, [np.array([[12, 20]])])[0], rtol=1e-6)
    assert cross[0].max() == 1.0 and not cross[1].any()  # the blue square never happens in b
    target, weight = targets.of([0, 1], negative_weight=0.25)
    assert target.shape == weight.shape == (3, len(targets.spans[0]) + len(spans_b))
    assert set(weight[:2, : len(targets.spans[0])].unique().tolist()) == {1.0}
    assert set(weight[:2, len(targets.spans[0]) :].unique().tolist()) == {0.25}
    assert targets.of([0], negative_weight=0.25)[1] is None  # one video: the published loss


def test_contrastive_loss_prefers_the_positive_pairs() -> None:
    from pipeline.training.train import contrastive_loss

    positive = torch.eye(3, dtype=torch.bool)
    aligned, crossed = torch.eye(3) * 100.0, (1 - torch.eye(3)) * 100.0
    assert contrastive_loss(aligned, positive, 128) < contrastive_loss(crossed, positive, 128)
    assert contrastive_loss(aligned, torch.zeros(3, 3, dtype=torch.bool), 128) == 0  # nothing to prefer


def test_similar_steps_group_each_video_with_the_nearest_captions_and_place_every_video_once() -> None:
    # four kinds of caption, three videos of each, in a shuffled order
    kinds = np.eye(4)[np.repeat(np.arange(4), 3)] + 0.01 * np.random.default_rng(0).normal(size=(12, 4))
    captions = kinds / np.linalg.norm(kinds, axis=1, keepdims=True)
    order = np.random.default_rng(1).permutation(12)
    groups = step_groups(order, 3, captions)
    assert sorted(i for group in groups for i in group) == list(range(12))
    assert all(len({i // 3 for i in group}) == 1 for group in groups)  # look-alikes together
    assert [group[0] for group in groups] == [i for i in order.tolist() if i in {g[0] for g in groups}]
    # random steps are the order cut into runs, the last one short
    assert step_groups(order, 5) == [order[:5].tolist(), order[5:10].tolist(), order[10:].tolist()]
    with pytest.raises(TrainError, match="step_videos must be one of random, similar, got 'nearest'"):
        TrainOptions(step_videos="nearest")
