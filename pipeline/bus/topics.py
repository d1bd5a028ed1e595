"""The pipeline's topics: names from the ``topic-prefix`` setting and the configs each one is created with.

Retention follows what each topic is for: features are only needed until the encoder has turned them into moments
(plus enough history to rebuild per-stream state after a partition moves), moments serve retrospective search for
a week, match events are the product's output, and standing queries live on a log-compacted topic that a new
query worker reads from the beginning to rebuild the full set.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import resolve

_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS


def _retained(retention_ms: int, segment_ms: int) -> dict[str, str]:
    # segments roll at least every segment_ms, so retention applies even to a quiet topic
    return {"cleanup.policy": "delete", "retention.ms": str(retention_ms), "segment.ms": str(segment_ms)}


# topic kind -> topic configs
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    "features": _retained(_DAY_MS, _HOUR_MS),
    "moments": _retained(7 * _DAY_MS, 6 * _HOUR_MS),
    "keyframes": _retained(_DAY_MS, _HOUR_MS),  # for looking at: kept like the features they go with
    "queries": {
        "cleanup.policy": "compact",
        "min.compaction.lag.ms": str(60_000),  # a query stays readable as written for at least a minute
        "delete.retention.ms": str(_DAY_MS),  # a deleted query's tombstone is seen by workers down for up to a day
        "segment.ms": str(_HOUR_MS),  # the active segment is never compacted: roll it hourly
        "min.cleanable.dirty.ratio": "0.1",
    },
    "matches": _retained(30 * _DAY_MS, _DAY_MS),
    "errors": _retained(7 * _DAY_MS, _DAY_MS),
    "search-requests": _retained(_HOUR_MS, _HOUR_MS // 4),
    "search-replies": _retained(_HOUR_MS, _HOUR_MS // 4),
}


@dataclass(frozen=True)
class Topics:
    """Full topic names for one prefix, e.g. ``Topics("vmh").moments == "vmh.moments"``."""

    prefix: str

    def name(self, kind: str) -> str:
        if kind not in TOPIC_CONFIGS:
            raise KeyError(f"unknown topic kind {kind!r}; known: {', '.join(TOPIC_CONFIGS)}")
        return f"{self.prefix}.{kind}"

    @property
    def features(self) -> str:
        return self.name("features")

    @property
    def moments(self) -> str:
        return self.name("moments")

    @property
    def keyframes(self) -> str:
        return self.name("keyframes")

    @property
    def queries(self) -> str:
        return self.name("queries")

    @property
    def matches(self) -> str:
        return self.name("matches")

    @property
    def errors(self) -> str:
        return self.name("errors")

    @property
    def search_requests(self) -> str:
        return self.name("search-requests")

    @property
    def search_replies(self) -> str:
        return self.name("search-replies")

    def all(self) -> dict[str, str]:
        """Topic kind -> full name."""
        return {kind: self.name(kind) for kind in TOPIC_CONFIGS}


def topics(prefix: str | None = None) -> Topics:
    """The topic names for ``prefix`` (default: the ``topic-prefix`` setting)."""
    prefix = resolve("topic-prefix") if prefix is None else prefix
    if not prefix or any(c not in _LEGAL for c in prefix):
        raise ValueError(f"topic prefix {prefix!r} must be non-empty and use only letters, digits, '.', '_' and '-'")
    return Topics(prefix)


_LEGAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def create_topics(
    bootstrap: str | None = None,
    prefix: str | None = None,
    partitions: int = 4,
    replication_factor: int = -1,
    kinds: tuple[str, ...] | None = None,
) -> list[str]:
    """Create the pipeline's topics that do not exist yet (all kinds unless ``kinds``); return the names created.

    Existing topics are left as they are, whatever their partition count or configs. ``replication_factor=-1``
    takes the cluster's ``default.replication.factor``. Returns once every partition of these topics has a leader.
    """
    from kafka.errors import TopicAlreadyExistsError, for_code

    from pipeline.bus.kafka import admin_client

    names = topics(prefix)
    wanted = {names.name(kind): TOPIC_CONFIGS[kind] for kind in (kinds or tuple(TOPIC_CONFIGS))}
    with admin_client(bootstrap) as admin:
        response = admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": replication_factor, "configs": configs}
             for name, configs in wanted.items()},
            raise_errors=False,
        )
        created = []
        for result in response["topics"]:
            error = for_code(result["error_code"])
            if error is TopicAlreadyExistsError:
                continue
            if result["error_code"] != 0:
                raise error(f"creating topic {result['name']}: {result.get('error_message')}")
            created.append(result["name"])
        admin.wait_for_topics(list(wanted))  # also those another worker created a moment ago
    return created
