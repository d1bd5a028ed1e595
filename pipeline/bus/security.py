"""How every Kafka client of the project connects: one set of settings for managed clusters (SASL, TLS).

The ``kafka-*`` settings (``[kafka]`` table of vmh.toml, ``VMH_KAFKA_*`` variables; see pipeline/settings.py)
become kafka-python keyword arguments in :func:`client_config`, which every producer, consumer and admin client of
the workers, the client API, topic creation, the benchmarks and the tests passes on. A cluster is therefore
reachable from everywhere or from nowhere, never from some workers only. The settings are checked together, since
kafka-python silently ignores SASL or TLS options that the security protocol does not use. Passwords are
registered with :func:`pipeline.redact.keep_secret`, so no log line shows them (kafka-python logs its whole
configuration at DEBUG).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.redact import keep_secret
from pipeline.settings import SETTINGS, resolve

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

# kafka-python argument -> setting
_SASL = {"sasl_mechanism": "kafka-sasl-mechanism", "sasl_plain_username": "kafka-sasl-username",
         "sasl_plain_password": "kafka-sasl-password"}
_SSL = {"ssl_cafile": "kafka-ssl-cafile", "ssl_certfile": "kafka-ssl-certfile", "ssl_keyfile": "kafka-ssl-keyfile",
        "ssl_password": "kafka-ssl-password"}
_SECRETS = ("sasl_plain_password", "ssl_password")


class KafkaSettingsError(ValueError):
    """The ``kafka-*`` settings contradict each other or name files that do not exist."""


def client_config() -> dict[str, str]:
    """kafka-python keyword arguments for the configured cluster: the security protocol, and the SASL, TLS and
    client-id options that are set. Raises ``KafkaSettingsError`` naming the settings to fix."""
    protocol = resolve("kafka-security-protocol").upper()
    if protocol not in PROTOCOLS:
        raise KafkaSettingsError(f"{_name('kafka-security-protocol')} is {protocol!r}, not one of "
                                 f"{', '.join(PROTOCOLS)}")
    sasl = {arg: value for arg, name in _SASL.items() if (value := resolve(name))}
    ssl = {arg: value for arg, name in _SSL.items() if (value := resolve(name))}
    if protocol.startswith("SASL_"):
        sasl["sasl_mechanism"] = sasl.get("sasl_mechanism", "").upper()
        if sasl["sasl_mechanism"] not in MECHANISMS:
            raise KafkaSettingsError(f"{protocol} needs {_name('kafka-sasl-mechanism')}: one of "
                                     f"{', '.join(MECHANISMS)}")
        missing = [_name(_SASL[arg]) for arg in ("sasl_plain_username", "sasl_plain_password") if arg not in sasl]
        if missing:
            raise KafkaSettingsError(f"{protocol} with {sasl['sasl_mechanism']} needs {' and '.join(missing)}")
    elif sasl:
        raise KafkaSettingsError(f"{', '.join(_name(_SASL[arg]) for arg in sasl)} set, but "
                                 f"{_name('kafka-security-protocol')} is {protocol}: use SASL_PLAINTEXT or SASL_SSL")
    if ssl and not protocol.endswith("SSL"):
        raise KafkaSettingsError(f"{', '.join(_name(_SSL[arg]) for arg in ssl)} set, but "
                                 f"{_name('kafka-security-protocol')} is {protocol}: use SSL or SASL_SSL")
    for arg in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if arg in ssl and not Path(ssl[arg]).is_file():
            raise KafkaSettingsError(f"{_name(_SSL[arg])}: no such file {ssl[arg]}")
    config = {"security_protocol": protocol, **sasl, **ssl}
    if client_id := resolve("kafka-client-id"):
        config["client_id"] = client_id
    for arg in _SECRETS:
        keep_secret(config.get(arg))
    return config


def describe(config: dict[str, str]) -> str:
    """How a client with ``config`` logs in, for messages: e.g. ``SASL_SSL, SCRAM-SHA-512 as alice``; no secrets."""
    parts = [config.get("security_protocol", "PLAINTEXT")]
    if "sasl_mechanism" in config:
        parts.append(f"{config['sasl_mechanism']} as {config.get('sasl_plain_username')}")
    if "ssl_certfile" in config:
        parts.append(f"client certificate {config['ssl_certfile']}")
    return ", ".join(parts)


def _name(setting: str) -> str:
    """How a user sets it: ``[kafka] sasl_password`` in vmh.toml or ``VMH_KAFKA_SASL_PASSWORD``."""
    s = SETTINGS[setting]
    return f"[{s.table}] {s.key} ({s.env})"
