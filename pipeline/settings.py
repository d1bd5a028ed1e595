"""Every setting has one name, spelled three ways.

A setting called ``bootstrap-servers`` is the CLI flag ``--bootstrap-servers``, the environment variable
``VMH_BOOTSTRAP_SERVERS`` and the key ``bootstrap_servers`` in the TOML config file (``$VMH_CONFIG`` or
``./vmh.toml``). Precedence: flag > environment > config file > default. All settings are declared here, once,
so a name cannot drift between the CLI, the workers and the docs.

Settings of a group live in a TOML table named after the group, without the prefix: ``kafka-sasl-password`` is
``VMH_KAFKA_SASL_PASSWORD`` and ``sasl_password`` in the ``[kafka]`` table. The Kafka client settings are not flags
of the workers (a password in argv is visible to every user of the machine); every Kafka client reads them.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from pipeline.features import MOTION_EXPANSIONS, MOTION_PLANES
from pipeline.weights import checkpoint_location


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    table: str | None = None  # the vmh.toml table holding it, e.g. "kafka"

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def env(self) -> str:
        return "VMH_" + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        """The attribute of parsed arguments."""
        return self.name.replace("-", "_")

    @property
    def key(self) -> str:
        """The key in vmh.toml, inside ``[table]`` when the setting has one."""
        return self.name.removeprefix(f"{self.table}-").replace("-", "_") if self.table else self.dest


def boolean(text: str | bool) -> bool:
    """A yes/no setting from the environment or vmh.toml: 1/0, true/false, yes/no, on/off."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value not in _BOOLEANS:
        raise ValueError(f"{text!r} is not a yes/no value (1/0, true/false, yes/no, on/off)")
    return _BOOLEANS[value]


def one_of(*values: str) -> Callable[[str], str]:
    """A setting that takes one of a few words."""
    def word(text: str) -> str:
        if text not in values:
            raise ValueError(f"{text!r} is not one of {', '.join(values)}")
        return text

    word.__name__ = "one of " + "/".join(values)  # what argparse names in its error
    return word


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


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
    # how every Kafka client connects (pipeline/bus/security.py); `vmh broker start` opens a SCRAM listener with them
    Setting("kafka-security-protocol", "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL", table="kafka"),
    Setting("kafka-sasl-mechanism", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", table="kafka"),
    Setting("kafka-sasl-username", "", "SASL user name", table="kafka"),
    Setting("kafka-sasl-password", "", "SASL password (never logged)", table="kafka"),
    Setting("kafka-ssl-cafile", "", "PEM file of the CAs that sign the brokers' certificates", table="kafka"),
    Setting("kafka-ssl-certfile", "", "PEM file of the client certificate, for mutual TLS", table="kafka"),
    Setting("kafka-ssl-keyfile", "", "PEM file of the client certificate's private key", table="kafka"),
    Setting("kafka-ssl-password", "", "password of the client private key (never logged)", table="kafka"),
    Setting("kafka-client-id", "", "client id the brokers see in their logs and quotas; empty: kafka-python's",
            table="kafka"),
    # workers
    Setting("metrics-port", 0, "port for the Prometheus metrics endpoint and /healthz; 0 disables it", int),
    Setting("metrics-address", "127.0.0.1", "address the metrics server binds (0.0.0.0 or :: to be scraped from "
            "other hosts, as in a container)"),
    Setting("health-deadline", 60.0, "seconds the worker's loop may go without completing a poll before /healthz "
            "answers 503", float),
    Setting("bus-timeout", 30.0, "seconds a blocking Kafka call (commit, flush, delivery) may take before the worker "
            "gives up and exits non-zero", float),
    Setting("matching-kernel", "auto", "Hamming search kernel of the query worker: auto (timed at start-up, faiss "
            "unless another is clearly faster here), faiss, popcount or matmul"),
    Setting("archive-size", 20_000_000, "most moments a query worker keeps for search per partition of the moments "
            "topic (34 bytes each for 128-bit codes, allocated as they arrive)", int),
    Setting("archive-hours", 24.0, "hours of capture time a query worker keeps for search", float),
    Setting("stream-idle-timeout", 600.0, "seconds without records after which a stream's state is freed (open "
            "clusters published)", float),
    Setting("device", "auto", "torch device: auto (CUDA when present), cpu or cuda"),
    Setting("torch-threads", 0, "torch intra-op CPU threads; 0 lets each command choose (1 in the workers, train and "
            "eval, 2 for extract)", int),
    # video in and features
    Setting("sample-rate", 4.0, "frames sampled per second of video", float),
    Setting("backbone", "mobilenet_v2", "torchvision classification model used as frame CNN"),
    Setting("backbone-weights", "", "path of the backbone's weights; empty means the offline MobileNetV2 weights"),
    Setting("frame-size", 224, "side in pixels frames are resized to before the CNN", int),
    Setting("spatial-grid", 1, "cells a side of the feature map also pooled cell by cell, so features keep where "
            "things are (1: global pooling only)", int),
    Setting("motion-grid", 0, "cells a side of the optical-flow motion features appended to every frame's, so "
            "features say which way things move (0: none)", int),
    Setting("motion-planes", "yuv", "planes of the frame the motion flow is taken on and averaged over: yuv (Y, U "
            "and V: sees things of the background's brightness but another colour move) or y (luma only, the first "
            "form)", one_of(*MOTION_PLANES)),
    Setting("motion-expansion", "affine", "how a motion cell measures growing and shrinking: affine (the expansion "
            "rate of an affine fit of its moving pixels) or divergence (its mean flow divergence, the first form, "
            "blind to a shape growing inside the cell)", one_of(*MOTION_EXPANSIONS)),
    Setting("open-timeout", 10.0, "seconds to wait for a video source to connect and send its headers", float),
    Setting("stall-timeout", 10.0, "seconds without video data or frames before a live source reconnects", float),
    Setting("max-lag", 2.0, "seconds a live stream's frames may fall behind their capture before the producer drops "
            "them (whole seconds, marked as gaps) to keep up; files pushed without --realtime are never dropped",
            float),
    Setting("keyframes", True, "publish one JPEG per stream second to <prefix>.keyframes, for the web view", boolean),
    Setting("keyframe-size", 320, "side in pixels of the keyframe JPEGs", int),
    # the web view (vmh ui)
    Setting("ui-address", "127.0.0.1", "address the web view binds (0.0.0.0 or :: to serve other hosts: it has no "
            "login)"),
    Setting("ui-port", 8765, "port of the web view", int),
    Setting("ui-history", 900.0, "seconds of recent key frames, matches and errors the web view reads at start",
            float),
    Setting("ui-keyframe-memory", 256.0, "megabytes of key frames the web view keeps in memory, newest first", float),
    # model
    Setting("preset", "lite", "CMHN preset: lite, tacos or activitynet"),
    Setting("checkpoint", "", "CMHN checkpoint directory, or the name of a published one (lite-synth-v6; vmh up "
            "serves it when none is given)", checkpoint_location),
]

SETTINGS: dict[str, Setting] = {s.name: s for s in _DECLARED}


def _config_name() -> str:
    return os.environ.get("VMH_CONFIG", "vmh.toml")


def _config_file() -> dict[str, Any]:
    path = Path(_config_name()).resolve()
    if not path.is_file():
        return {}
    return _read_toml(path, path.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _read_toml(path: Path, mtime_ns: int) -> dict[str, Any]:
    """Parsed once per path and version of the file (``mtime_ns`` is only part of the cache key)."""
    with path.open("rb") as f:
        return tomllib.load(f)


def resolve(name: str) -> Any:
    """The value of a setting outside of argparse: environment > config file > default."""
    setting = SETTINGS[name]
    if setting.env in os.environ:
        return _parse(setting, os.environ[setting.env], f"environment variable {setting.env}")
    config = _config_file()
    if setting.table is not None:
        config = config.get(setting.table, {})
    if setting.key in config:
        key = f"{setting.table}.{setting.key}" if setting.table else setting.key
        return _parse(setting, config[setting.key], f"{_config_name()} key {key}")
    return setting.default


class SettingError(ValueError):
    """A setting's value from the environment or the config file that does not parse."""


def _parse(setting: Setting, value: Any, where: str) -> Any:
    """Only typed settings can fail here, and none of them is a secret: the value may be shown."""
    try:
        return setting.type(value)
    except (TypeError, ValueError) as e:
        raise SettingError(f"{where} = {value!r} is not a valid {setting.name}: {e}") from None


def add_settings(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add the named settings as flags whose defaults come from the environment and config file."""
    for name in names:
        setting = SETTINGS[name]
        how = {"action": argparse.BooleanOptionalAction} if setting.type is boolean else {"type": setting.type}
        parser.add_argument(
            setting.flag,
            dest=setting.dest,
            default=resolve(name),
            help=f"{setting.help} [env {setting.env}]",
            **how,
        )
