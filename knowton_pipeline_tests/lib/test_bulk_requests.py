"""How a batch's bulk operations are cut into Elasticsearch requests (`elasticsearch.bulk_requests`): in order,
each operation once, no request over the limit unless it is one operation alone."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from knowton_pipeline.lib.stores.elasticsearch import bulk_requests


@given(st.lists(st.integers(min_value=1, max_value=500), max_size=60), st.integers(min_value=1, max_value=1500))
def test_requests_cover_every_operation_in_order_and_keep_under_the_limit(sizes: list[int], most: int) -> None:
    operations = [b"x" * n for n in sizes]
    runs = list(bulk_requests(operations, most))
    assert [i for start, end in runs for i in range(start, end)] == list(range(len(operations)))
    for start, end in runs:
        assert end > start
        size = sum(sizes[start:end])
        assert size <= most or end - start == 1
    # Each request takes as many operations as fit: the next one would have gone over.
    for (start, end), (nxt, _) in pairwise(runs):
        assert sum(sizes[start:end]) + sizes[nxt] > most
