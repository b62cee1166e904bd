"""Dead-letter records: the original key and value, with headers saying where it came from and why.

Header names follow Kafka Connect's (`__connect.errors.*`) where they mean the same, so records
written by a Connect sink's DLQ and by this project are replayed alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import Message, Producer

from knowton_pipeline.lib.settings import KAFKA_MAX_LETTER_BYTES
from knowton_pipeline.lib.stores import TARGETS

# Each target store's own DLQ, as the store declares it.
TARGET_DLQ = {store.name: store.dlq_topic for store in TARGETS.values()}
PARKED_TOPIC = "dlq-parked"

H_TOPIC = "__connect.errors.topic"
H_PARTITION = "__connect.errors.partition"
H_OFFSET = "__connect.errors.offset"
H_CLASS = "__connect.errors.exception.class.name"
H_MESSAGE = "__connect.errors.exception.message"
H_TARGET = "knowton.errors.target"
H_ATTEMPTS = "knowton.errors.attempts"
H_FIRST_FAILURE = "knowton.errors.first.failure.ms"
H_LAST_FAILURE = "knowton.errors.last.failure.ms"

MAX_MESSAGE_CHARS = 2000


@dataclass(frozen=True)
class DeadLetter:
    """A record that could not be applied to one target."""

    target: str
    topic: str  # the original topic
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error_class: str
    error_message: str
    attempts: int = 1
    first_failure_ms: int = 0
    last_failure_ms: int = 0

    @classmethod
    def from_failure(cls, target: str, msg: Message, exc: BaseException) -> DeadLetter:
        return cls(
            target=target,
            topic=msg.topic() or "",
            partition=msg.partition() or 0,
            offset=msg.offset() or 0,
            key=msg.key(),
            value=msg.value(),
            error_class=f"{type(exc).__module__}.{type(exc).__qualname__}",
            error_message=str(exc)[:MAX_MESSAGE_CHARS],
            attempts=1,
            first_failure_ms=int(time.time() * 1000),
            last_failure_ms=int(time.time() * 1000),
        )

    @classmethod
    def from_dlq_message(cls, msg: Message, *, default_target: str) -> DeadLetter:
        """Read a DLQ record written by this project or by a Kafka Connect sink."""
        h = {k: (v.decode(errors="replace") if v is not None else "") for k, v in (msg.headers() or [])}
        first = int(h.get(H_FIRST_FAILURE) or (msg.timestamp()[1] or 0))
        return cls(
            target=h.get(H_TARGET) or default_target,
            topic=h.get(H_TOPIC, ""),
            partition=int(h.get(H_PARTITION) or -1),
            offset=int(h.get(H_OFFSET) or -1),
            key=msg.key(),
            value=msg.value(),
            error_class=h.get(H_CLASS, ""),
            error_message=h.get(H_MESSAGE, ""),
            attempts=int(h.get(H_ATTEMPTS) or 1),
            first_failure_ms=first,
            last_failure_ms=int(h.get(H_LAST_FAILURE) or first),
        )

    def retried(self, exc: BaseException) -> DeadLetter:
        return DeadLetter(
            target=self.target,
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            key=self.key,
            value=self.value,
            error_class=f"{type(exc).__module__}.{type(exc).__qualname__}",
            error_message=str(exc)[:MAX_MESSAGE_CHARS],
            attempts=self.attempts + 1,
            first_failure_ms=self.first_failure_ms,
        )

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (H_TOPIC, self.topic.encode()),
            (H_PARTITION, str(self.partition).encode()),
            (H_OFFSET, str(self.offset).encode()),
            (H_CLASS, self.error_class.encode()),
            (H_MESSAGE, self.error_message.encode()),
            (H_TARGET, self.target.encode()),
            (H_ATTEMPTS, str(self.attempts).encode()),
            (H_FIRST_FAILURE, str(self.first_failure_ms).encode()),
            (H_LAST_FAILURE, str(self.last_failure_ms or self.first_failure_ms).encode()),
        ]


class DlqPublishError(RuntimeError):
    """Kafka did not acknowledge a dead letter; the source offsets must not be committed."""


def make_producer(bootstrap: str) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": KAFKA_MAX_LETTER_BYTES,  # a dead letter: its record, up to the limit, and headers
        }
    )


def publish(
    producer: Producer, letters: Sequence[DeadLetter], *, topic: str | None = None, timeout: float = 30.0
) -> None:
    """Publish and wait for every acknowledgement: a dead letter is durable before we move on."""
    if not letters:
        return
    failures: list[str] = []

    def on_delivery(err, _msg) -> None:  # type: ignore[no-untyped-def]
        if err is not None:
            failures.append(str(err))

    for letter in letters:
        producer.produce(
            topic or TARGET_DLQ[letter.target],
            key=letter.key,
            value=letter.value,
            headers=letter.headers(),
            on_delivery=on_delivery,
        )
    remaining = producer.flush(timeout)
    if remaining or failures:
        raise DlqPublishError(
            f"{remaining} dead letter(s) unacknowledged and {len(failures)} refused by Kafka: {failures[:3]}"
        )
