"""The torch device every worker runs on, from the ``device`` setting."""

from __future__ import annotations

import torch


class DeviceUnavailable(RuntimeError):
    """The requested device does not exist on this machine."""


def pick_device(setting: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; anything else is a torch device name that must exist here."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as e:
        raise DeviceUnavailable(f"unknown device {setting!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {setting!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device {setting!r} requested but only {torch.cuda.device_count()} GPUs exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"device {setting!r} requested but MPS is not available here")
    return device


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_vpopcntdq", "amx_int8", "asimd",
              "sve")  # what the matching kernels' speeds depend on


def cpu_flags() -> dict[str, object]:
    """The CPU model, its SIMD flags that matter for matching, and the instruction sets torch and faiss dispatch to:
    what a benchmark figure or a kernel choice depends on."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    import faiss

    return {"cpu": model, "simd": [flag for flag in SIMD_FLAGS if flag in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "faiss_simd": faiss.SIMDConfig.get_level_name()}
