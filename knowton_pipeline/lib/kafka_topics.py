"""Create the pipeline's Kafka topics ahead of the first event, so consumers never subscribe to a void, with the
partitions each needs."""

from __future__ import annotations

from collections.abc import Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic


def ensure_topics(
    bootstrap: str, partitions: Mapping[str, int], *, replication: int = 1
) -> tuple[list[str], list[str]]:
    """Create missing topics with the partitions asked for, and add partitions to topics that have fewer; returns
    (created, grown). A topic keeps partitions it has beyond the number asked (Kafka cannot remove them).

    Growing a keyed topic sends a key's later changes to another partition than its earlier ones; the sinks' writes
    are versioned by commit position, so the order they apply them in cannot make a stale write win."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = admin.list_topics(timeout=10).topics
    missing = [n for n in partitions if n not in existing]
    fewer = {n: want for n, want in partitions.items() if n in existing and len(existing[n].partitions) < want}
    created: list[str] = []
    if missing:
        futures = admin.create_topics([NewTopic(n, partitions[n], replication) for n in missing], operation_timeout=10)
        for name, fut in futures.items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    grown: list[str] = []
    if fewer:
        for name, fut in admin.create_partitions([NewPartitions(n, want) for n, want in fewer.items()]).items():
            fut.result()
            grown.append(name)
    return created, grown
