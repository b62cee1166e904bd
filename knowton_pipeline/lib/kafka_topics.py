"""Create the pipeline's Kafka topics ahead of the first event, so consumers never subscribe to a void."""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic


def ensure_topics(bootstrap: str, names: Iterable[str], *, partitions: int = 1, replication: int = 1) -> list[str]:
    """Create missing topics; returns the ones created."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=10).topics)
    missing = [n for n in names if n not in existing]
    if not missing:
        return []
    futures = admin.create_topics([NewTopic(n, partitions, replication) for n in missing], operation_timeout=10)
    created = []
    for name, fut in futures.items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created
