"""The offsets the apply commits, with the applied record's timestamp as metadata (pure logic, property-based)."""

from __future__ import annotations

from datetime import UTC, datetime

from confluent_kafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from knowton_pipeline.lib.sync.apply import committed_timestamp, offsets_to_commit

record = st.tuples(
    st.sampled_from(["cdc-User", "cdc-heartbeat"]),
    st.integers(0, 2),
    st.integers(0, 10**12),
    st.one_of(st.just(-1), st.integers(0, 4_102_444_800_000)),  # no timestamp, or up to 2100
)


@given(st.lists(record, max_size=40))
def test_each_partition_commits_past_its_highest_record_with_that_records_timestamp(
    records: list[tuple[str, int, int, int]],
) -> None:
    offsets = offsets_to_commit(records)
    assert len({(tp.topic, tp.partition) for tp in offsets}) == len(offsets)
    for tp in offsets:
        mine = [r for r in records if (r[0], r[1]) == (tp.topic, tp.partition)]
        highest = max(r[2] for r in mine)
        assert tp.offset == highest + 1
        stamps = {r[3] for r in mine if r[2] == highest}
        read_back = committed_timestamp(tp)
        if read_back is None:
            assert -1 in stamps
        else:
            assert round(read_back.timestamp() * 1000) in stamps
    assert {(r[0], r[1]) for r in records} == {(tp.topic, tp.partition) for tp in offsets}


# Metadata is a UTF-8 C string: no NUL, no lone surrogates.
@given(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=40))
def test_metadata_not_written_by_the_apply_reads_as_no_timestamp_and_never_raises(metadata: str) -> None:
    stamp = committed_timestamp(TopicPartition("cdc-heartbeat", 0, 1, metadata=metadata))
    assert stamp is None or (metadata.startswith("ts=") and stamp >= datetime(1970, 1, 1, tzinfo=UTC))


def test_out_of_range_or_negative_stamps_read_as_none() -> None:
    for metadata in ("ts=" + "9" * 30, "ts=-5", "ts=", "ts=abc", ""):
        assert committed_timestamp(TopicPartition("cdc-heartbeat", 0, 1, metadata=metadata)) is None
    assert committed_timestamp(TopicPartition("cdc-heartbeat", 0, 1)) is None
