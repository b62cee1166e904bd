"""How the search side reads Elasticsearch's answers: a sum over part of an index is refused, and a range
aggregation's double bounds are used only where they compare every key as the exact key would."""

from __future__ import annotations

import re

import pytest
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import ApiError
from hypothesis import given, settings
from hypothesis import strategies as st

from knowton_pipeline.lib.stores.elasticsearch import _exact_double, _whole

META = ApiResponseMeta(
    status=200, http_version="1.1", headers=HttpHeaders(), duration=0.0, node=NodeConfig("http", "localhost", 9200)
)
ANSWER = {"timed_out": False, "_shards": {"total": 1, "successful": 1, "failed": 0}, "hits": {"total": {"value": 3}}}


def test_a_complete_answer_is_read() -> None:
    assert _whole(ANSWER, META, "summing i") is ANSWER


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({**ANSWER, "_shards": {"total": 2, "successful": 1, "failed": 1}}, "1 shard(s) failed"),
        ({**ANSWER, "timed_out": True}, "timed out"),
        ({"error": {"type": "search_phase_execution_exception"}, "status": 500}, "search_phase_execution_exception"),
    ],
)
def test_an_answer_from_part_of_the_index_is_refused(answer: dict, reason: str) -> None:
    with pytest.raises(ApiError, match=re.escape(reason)) as refused:
        _whole(answer, META, "summing knowton-users for keys in [None, 'x')")
    assert "summing knowton-users for keys in [None, 'x')" in str(refused.value.message)


LONGS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**53) - 4, -(2**53) + 4),
    st.integers(2**53 - 4, 2**53 + 4),
)


@given(bound=LONGS, key=LONGS)
@settings(max_examples=2000)
def test_a_bound_taken_as_exact_compares_every_long_key_as_the_key_itself_does(bound: int, key: int) -> None:
    # Elasticsearch's range aggregation compares the key's value as a double with the bound as a double.
    if _exact_double(bound):
        assert (float(key) >= float(bound)) == (key >= bound)
        assert (float(key) < float(bound)) == (key < bound)


def test_bounds_beyond_a_doubles_exact_integers_are_not_taken() -> None:
    assert _exact_double(None) and _exact_double(2**53 - 1) and _exact_double(-(2**53) + 1)
    assert not _exact_double(2**53) and not _exact_double(-(2**53)) and not _exact_double("0x10")
