"""Streaming inference must equal a full causal VEN pass for every candidate, across batching, rebuilds and state
transfer. Models keep each preset's kernels, dilations and heads but are narrow and float64, so the comparison is
exact to rounding and long sequences stay cheap."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from harness import narrow_cmhn
from pipeline.codes.packing import pack_signs
from pipeline.model import CMHN, StreamingEncoder, StreamStateError, build_cmhn, candidate_spans, ensemble

V = 6
pytestmark = pytest.mark.usefixtures("one_thread_seeded")


def narrow(preset: str, motion_dim: int = 0) -> CMHN:
    """Narrow float64 CMHN of a preset, TCN weights scaled up so that even the farthest taps move the outputs; a
    preset that whitens its inputs (lite) has the whitening fitted on skewed data, so streaming must apply it too."""
    model = narrow_cmhn(preset, V, motion_dim)
    for parameter in model.ven.tcn.parameters():
        torch.nn.init.normal_(parameter)
    if model.config.whiten:
        skewed = torch.randn(300, V, dtype=torch.float64) * torch.arange(1, V + 1) + 3
        model.ven.whiten.fit_pca(skewed, standardised=motion_dim)
        assert not torch.allclose(model.ven.whiten.projection, torch.eye(V, dtype=torch.float64))
    return model.eval()


def full_pass(model: CMHN, features: torch.Tensor) -> dict[tuple[int, int], np.ndarray]:
    """Pre-sign values of every candidate of the whole sequence, by span."""
    with torch.no_grad():
        values = model.ven(features).numpy()
    spans = candidate_spans(len(features), model.config.kernel_sizes, model.config.strides)
    return {(start, end): value for (start, end), value in zip(spans.tolist(), values)}


def assert_same_moments(streamed: list, expected: dict[tuple[int, int], np.ndarray]) -> None:
    spans = [(m.start, m.end) for m in streamed]
    assert len(spans) == len(set(spans)) and set(spans) == set(expected)
    values = np.stack([m.values for m in streamed])
    reference = np.stack([expected[span] for span in spans])
    # float64 leaves only rounding (~1e-15 relative), so even a wrong far tap shows; the product needs 1e-4
    assert np.abs(values - reference).max() <= 1e-10 * np.abs(reference).max()
    assert np.array_equal(np.stack([m.code for m in streamed]), pack_signs(reference))


# (stream id, global step it joins at, seconds): different lengths and start times, one shorter than the
# receptive field, and a late stream that reuses the row of a dropped one.
SCHEDULES = {
    "lite": [("a", 0, 140), ("b", 7, 90), ("c", 20, 15), ("d", 50, 60)],
    "tacos": [("a", 0, 420), ("b", 30, 300), ("c", 50, 60), ("d", 150, 250)],
    # 1.5 times its receptive field of 1734 s (a step costs ~1 ms): every cache has rolled over, the widest (384
    # columns) several times, and every head has fired many times past the steady state
    "activitynet": [("a", 0, 2600), ("b", 300, 2000), ("c", 500, 700), ("d", 1300, 1300)],
}


@pytest.mark.parametrize("preset, motion_dim", [(preset, 0) for preset in SCHEDULES] + [("lite", 2)])
def test_streams_batched_together_equal_full_passes(preset: str, motion_dim: int) -> None:
    model = narrow(preset, motion_dim)
    encoder = StreamingEncoder(model)
    schedule = SCHEDULES[preset]
    features = {sid: torch.randn(length, V, dtype=torch.float64) for sid, _, length in schedule}
    streamed: dict[str, list] = {sid: [] for sid, _, _ in schedule}
    for step in range(max(join + length for _, join, length in schedule)):
        live = [(sid, step - join) for sid, join, length in schedule if join <= step < join + length]
        ids = [sid for sid, _ in live]
        moments = encoder.step(ids, torch.stack([features[sid][second] for sid, second in live]))
        order = [ids.index(m.stream_id) for m in moments]
        assert order == sorted(order), "moments are not grouped by stream in input order"
        for m in moments:
            assert m.end == encoder.next_second(m.stream_id)
            streamed[m.stream_id].append(m)
        for sid, second in live:
            if second == len(features[sid]) - 1:
                encoder.drop(sid)
    assert len(encoder) == 0
    for sid, _, _ in schedule:
        assert_same_moments(streamed[sid], full_pass(model, features[sid]))


def test_an_ensemble_streams_as_its_members_side_by_side() -> None:
    """Each member keeps its own whitening and caches: the joined codes equal the members' full passes, joined, through
    steps, a rebuild from the receptive field and a move to another encoder."""
    torch.manual_seed(1)
    members = [narrow("lite", motion_dim=2) for _ in range(2)]
    joined = ensemble(members)
    assert joined.config.bits == 32 and joined.config.members == 2
    features = torch.randn(80, V, dtype=torch.float64)
    expected = {span: np.concatenate([full_pass(m, features)[span] for m in members])
                for span in full_pass(members[0], features)}
    assert_same_moments(run(StreamingEncoder(joined), "s", features), expected)
    encoder, moved = StreamingEncoder(joined), StreamingEncoder(joined)
    cut = 50
    encoder.rebuild("s", features[cut - encoder.receptive_field : cut], cut)
    moved.load_state("s", encoder.state_dict_for("s"))
    later = {span: value for span, value in expected.items() if span[1] > cut}
    assert_same_moments(run(moved, "s", features[cut:]), later)


def test_an_ensemble_joins_members_of_one_architecture() -> None:
    with pytest.raises(ValueError, match="differ in \\['bits'\\]"):
        ensemble([narrow("lite"), CMHN(replace(narrow("lite").config, bits=24)).double()])
    with pytest.raises(ValueError, match="two or more"):
        ensemble([narrow("lite")])
    with pytest.raises(ValueError, match="not trained as one"):
        ensemble([narrow("lite"), narrow("lite")]).fit_inputs(torch.zeros(3, V), torch.zeros(3, 384))


def run(encoder: StreamingEncoder, stream_id: str, features: torch.Tensor) -> list:
    return [m for second in features for m in encoder.step([stream_id], second[None])]


@pytest.mark.parametrize("preset, extra", [("tacos", 0), ("activitynet", 0), ("activitynet", 40)])
def test_rebuild_from_the_receptive_field_is_exact(preset: str, extra: int) -> None:
    model = narrow(preset)
    encoder = StreamingEncoder(model)
    window = encoder.receptive_field
    kernel, stride = model.config.kernel_sizes[-1], model.config.strides[-1]
    resume = window + extra + 30 + (kernel - 1 - window - extra - 30) % stride  # the longest head fires at once
    features = torch.randn(resume + 260, V, dtype=torch.float64)
    encoder.step(["s"], features[:1])  # stale state that the rebuild must replace
    encoder.rebuild("s", features[resume - window - extra : resume], next_second=resume)
    assert encoder.next_second("s") == resume
    streamed = run(encoder, "s", features[resume:])
    assert (resume + 1 - kernel, resume + 1) in {(m.start, m.end) for m in streamed}
    expected = {span: value for span, value in full_pass(model, features).items() if span[1] > resume}
    assert_same_moments(streamed, expected)


@pytest.mark.parametrize("preset", ["tacos", "activitynet"])
def test_the_receptive_field_is_needed(preset: str) -> None:
    """Changing the one input second just inside the window moves a later moment, so no shorter window is exact."""
    model = narrow(preset)
    encoder = StreamingEncoder(model)
    window, kernel, stride = encoder.receptive_field, model.config.kernel_sizes[-1], model.config.strides[-1]
    resume = window + (kernel - 1 - window) % stride
    features = torch.randn(resume + 5, V, dtype=torch.float64)
    changed = features.clone()
    changed[resume - window] += 1.0
    before, after = full_pass(model, features), full_pass(model, changed)
    assert not np.array_equal(before[(resume + 1 - kernel, resume + 1)], after[(resume + 1 - kernel, resume + 1)])
    changed = features.clone()
    changed[: resume - window] = torch.randn(resume - window, V, dtype=torch.float64)
    after = full_pass(model, changed)
    assert all(np.array_equal(before[span], after[span]) for span in before if span[1] > resume)
    with pytest.raises(StreamStateError, match=f"needs the last {window} seconds"):
        encoder.rebuild("s", features[resume - window + 1 : resume], next_second=resume)


def test_rebuild_of_a_stream_shorter_than_the_window() -> None:
    model = narrow("tacos")
    encoder = StreamingEncoder(model)
    features = torch.randn(200, V, dtype=torch.float64)
    encoder.rebuild("s", features[:50], next_second=50)
    expected = {span: value for span, value in full_pass(model, features).items() if span[1] > 50}
    assert_same_moments(run(encoder, "s", features[50:]), expected)
    with pytest.raises(StreamStateError, match="at most 40"):
        encoder.rebuild("s", features[:50], next_second=40)


def test_state_bytes_carry_a_stream_to_another_encoder() -> None:
    model = narrow("tacos")
    features = torch.randn(300, V, dtype=torch.float64)
    source, target = StreamingEncoder(model), StreamingEncoder(model)
    head = run(source, "s", features[:137])
    target.step(["other"], features[:1])  # the moved stream lands on a row other than 0
    target.load_state("moved", source.state_dict_for("s"))
    assert target.next_second("moved") == 137
    tail = run(target, "moved", features[137:])
    assert all(m.stream_id == "moved" for m in tail)
    assert_same_moments(head + tail, full_pass(model, features))
    with pytest.raises(KeyError):
        source.state_dict_for("unknown")


def test_foreign_state_is_rejected() -> None:
    lite, tacos = StreamingEncoder(narrow("lite")), StreamingEncoder(narrow("tacos"))
    lite.step(["s"], torch.randn(1, V))
    with pytest.raises(StreamStateError, match="another architecture"):
        tacos.load_state("s", lite.state_dict_for("s"))
    with pytest.raises(StreamStateError, match="unreadable"):
        tacos.load_state("s", b"not a state")
    assert "s" not in tacos


def test_dropped_streams_start_over() -> None:
    model = narrow("lite")
    encoder = StreamingEncoder(model)
    run(encoder, "s", torch.randn(30, V, dtype=torch.float64))
    encoder.drop("s")
    encoder.drop("never seen")
    assert "s" not in encoder and encoder.next_second("s") == 0
    features = torch.randn(40, V, dtype=torch.float64)
    assert_same_moments(run(encoder, "s", features), full_pass(model, features))


def test_bad_input() -> None:
    encoder = StreamingEncoder(narrow("lite"))
    with pytest.raises(ValueError, match="repeat"):
        encoder.step(["a", "a"], torch.randn(2, V))
    with pytest.raises(ValueError, match=rf"\[2, {V}\]"):
        encoder.step(["a", "b"], torch.randn(2, V + 1))
    with pytest.raises(ValueError, match=rf"\[1, {V}\]"):
        encoder.step(["a"], torch.randn(2, V))
    assert encoder.step([], torch.zeros(0, V)) == []
    with pytest.raises(ValueError, match="causal"):
        StreamingEncoder(build_cmhn("lite", video_dim=V, causal=False))


def test_building_an_encoder_leaves_the_global_rng_alone() -> None:
    """Training validates every epoch through the live encoder; a seeded run must not depend on that."""
    model = narrow("lite")
    state = torch.random.get_rng_state()
    StreamingEncoder(model)
    assert torch.equal(torch.random.get_rng_state(), state)
