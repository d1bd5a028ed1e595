"""Every setting has one name, spelled three ways.

A setting called ``bootstrap-servers`` is the CLI flag ``--bootstrap-servers``, the environment variable
``VMH_BOOTSTRAP_SERVERS`` and the key ``bootstrap_servers`` in the TOML config file (``$VMH_CONFIG`` or
``./vmh.toml``). Precedence: flag > environment > config file > default. All settings are declared here, once,
so a name cannot drift between the CLI, the workers and the docs.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def env(self) -> str:
        return "VMH_" + self.name.upper().replace("-", "_")

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


def _cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vmh")


_DECLARED = [
    # where things live
    Setting("cache-dir", _cache_dir(), "cache for Kafka jars, models, rendered datasets and features"),
    Setting("log-level", "WARNING", "log level (DEBUG, INFO, WARNING, ERROR)"),
    # the bus
    Setting("bootstrap-servers", "", "Kafka bootstrap servers; empty means the local broker started by `vmh broker start`"),
    Setting("broker-port", 19092, "port of the local broker started by `vmh broker`", int),
    Setting("topic-prefix", "vmh", "prefix of every topic name (<prefix>.features, <prefix>.moments, ...)"),
    # workers
    Setting("metrics-port", 0, "port for the Prometheus metrics endpoint; 0 disables it", int),
    Setting("device", "auto", "torch device: auto (CUDA when present), cpu or cuda"),
    Setting("torch-threads", 0, "torch intra-op CPU threads; 0 lets each command choose (1 in the workers, train and "
            "eval, 2 for extract)", int),
    # video in and features
    Setting("sample-rate", 4.0, "frames sampled per second of video", float),
    Setting("backbone", "mobilenet_v2", "torchvision classification model used as frame CNN"),
    Setting("backbone-weights", "", "path of the backbone's weights; empty means the offline MobileNetV2 weights"),
    Setting("frame-size", 224, "side in pixels frames are resized to before the CNN", int),
    Setting("open-timeout", 10.0, "seconds to wait for a video source to connect and send its headers", float),
    Setting("stall-timeout", 10.0, "seconds without video data or frames before a live source reconnects", float),
    # model
    Setting("preset", "lite", "CMHN preset: lite, tacos or activitynet"),
    Setting("checkpoint", "", "path of a CMHN checkpoint directory"),
]

SETTINGS: dict[str, Setting] = {s.name: s for s in _DECLARED}


@lru_cache(maxsize=1)
def _config_file() -> dict[str, Any]:
    path = Path(os.environ.get("VMH_CONFIG", "vmh.toml"))
    if not path.is_file():
        return {}
    with path.open("rb") as f:
        return tomllib.load(f)


def resolve(name: str) -> Any:
    """The value of a setting outside of argparse: environment > config file > default."""
    setting = SETTINGS[name]
    if setting.env in os.environ:
        return setting.type(os.environ[setting.env])
    config = _config_file()
    if setting.key in config:
        return setting.type(config[setting.key])
    return setting.default


def add_settings(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add the named settings as flags whose defaults come from the environment and config file."""
    for name in names:
        setting = SETTINGS[name]
        parser.add_argument(
            setting.flag,
            dest=setting.key,
            type=setting.type,
            default=resolve(name),
            help=f"{setting.help} [env {setting.env}]",
        )
