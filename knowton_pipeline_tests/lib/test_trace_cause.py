"""The cause line of a Kafka Connect failure trace (pure logic, property-based, plus the traces Connect gives)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from knowton_pipeline.lib.health.connect import CAUSE_CHARS, trace_cause

CONNECT_TRACE = """org.apache.kafka.connect.errors.ConnectException: Unrecoverable exception from producer send callback
\tat org.apache.kafka.connect.runtime.WorkerSourceTask.maybeThrowProducerSendException(WorkerSourceTask.java:348)
\tat org.apache.kafka.connect.runtime.WorkerSourceTask.prepareToPollTask(WorkerSourceTask.java:127)
Caused by: org.apache.kafka.common.errors.RecordTooLargeException: The request included a message larger than the max
"""

NESTED = """org.apache.kafka.connect.errors.ConnectException: An exception occurred in the change event producer.
\tat io.debezium.pipeline.ErrorHandler.setProducerThrowable(ErrorHandler.java:67)
Caused by: io.debezium.DebeziumException: Could not process event
\tat io.debezium.connector.postgresql.PostgresStreamingChangeEventSource.execute(PostgresStreamingChangeEventSource.java:220)
Caused by: org.postgresql.util.PSQLException: ERROR: replication slot "knowton_cdc_slot" is active for PID 4242
\tat org.postgresql.core.v3.QueryExecutorImpl.receiveErrorResponse(QueryExecutorImpl.java:2725)
\t... 9 more
"""


def test_the_innermost_caused_by_is_the_cause() -> None:
    assert trace_cause(CONNECT_TRACE) == (
        "org.apache.kafka.common.errors.RecordTooLargeException: The request included a message larger than the max"
    )
    assert trace_cause(NESTED) == (
        'org.postgresql.util.PSQLException: ERROR: replication slot "knowton_cdc_slot" is active for PID 4242'
    )


def test_a_trace_without_a_cause_gives_its_first_line_and_none_gives_none() -> None:
    assert trace_cause("\n  java.lang.IllegalStateException: boom\n\tat X.y(X.java:1)\n") == (
        "java.lang.IllegalStateException: boom"
    )
    assert trace_cause(None) is None and trace_cause(" \n\t\n") is None


line = st.text(st.characters(blacklist_categories=["Cc", "Cs", "Zl", "Zp"]), max_size=80)


@given(st.lists(st.tuples(st.booleans(), line), max_size=12))
def test_the_cause_is_the_last_caused_by_else_the_first_non_blank_line(parts: list[tuple[bool, str]]) -> None:
    lines = [f"Caused by: {text}" if is_cause else text for is_cause, text in parts]
    cause = trace_cause("\n".join(lines))
    stripped = [x.strip() for x in lines if x.strip()]
    causes = [x.removeprefix("Caused by:").strip() for x in stripped if x.startswith("Caused by:")]
    expected = causes[-1] if causes else (stripped[0] if stripped else None)
    assert cause == (expected[:CAUSE_CHARS] if expected is not None else None)
    assert cause is None or "\n" not in cause
