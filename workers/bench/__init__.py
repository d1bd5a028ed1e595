"""Benchmarks of the pipeline's stages against reference implementations (`vmh bench NAME`).

Each module names what it compares (``NAME``, ``TITLE``, ``REFERENCE``, ``UNIT``, ``TARGET``, default ``REPEATS``
and ``WARMUP``), declares its parameters as a ``Params`` dataclass, and builds its timed ``Case`` list with
``cases(params, stack)``; ``workers.bench.runner`` times, checks and reports them. A benchmark that is not an
interleaved comparison (e2e) provides ``measure(params)`` and ``table(result)`` instead. Modules import torch, av and
faiss inside functions, so listing the benchmarks stays cheap.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BENCHMARKS = {name: f"workers.bench.{name}" for name in ("decode", "features", "encoder", "matching", "bus", "e2e")}


def load(name: str) -> ModuleType:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name])
