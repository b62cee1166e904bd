"""Elasticsearch: the pinned client matches the server's major version, and the mappings are explicit."""

from __future__ import annotations

import re
import uuid

import elasticsearch
import pytest
from elasticsearch import BadRequestError, Elasticsearch

from knowton_pipeline.lib.stores.elasticsearch import templates as elasticsearch_templates
from knowton_pipeline.stack.manager import Stack


def test_pinned_client_matches_server_major_version(stack: Stack, es: Elasticsearch) -> None:
    # The integ-test distribution has no root (`GET /`) handler; the nodes API carries the version.
    nodes = es.nodes.info(node_id="_local", metric="_none")["nodes"]
    server = next(iter(nodes.values()))["version"]
    assert server.split(".")[0] == elasticsearch.__versionstr__.split(".")[0] == "8"


def test_document_round_trips_through_the_users_alias(stack: Stack, es: Elasticsearch) -> None:
    address = "0x" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
    doc = {
        "address": address,
        "username": "alice",
        "bio": "search me",
        "reputation": 3,
        "is_verified": True,
        "created_at": "2024-01-15T10:30:00.000001Z",
        "pg_lsn": 42,
    }
    es.index(index="knowton-users", id=address, document=doc, version=42, version_type="external_gte", refresh=True)
    got = es.get(index="knowton-users", id=address)
    assert got["_source"] == doc
    assert got["_version"] == 42
    assert got["_index"].startswith("knowton-users-v")
    hits = es.search(index="knowton-users", query={"term": {"address": address}})["hits"]["hits"]
    assert [h["_id"] for h in hits] == [address]
    es.delete(index="knowton-users", id=address, refresh=True)


def test_strict_mapping_rejects_an_unknown_field(stack: Stack, es: Elasticsearch) -> None:
    with pytest.raises(BadRequestError, match="strict_dynamic_mapping_exception"):
        es.index(index="knowton-contents", id="x", document={"id": 1, "surprise": "field"})


def test_every_template_is_installed_with_an_alias_over_a_versioned_index(stack: Stack, es: Elasticsearch) -> None:
    for alias in elasticsearch_templates():
        assert es.indices.exists_index_template(name=alias)
        [index] = list(es.indices.get_alias(name=alias))
        assert re.fullmatch(rf"{alias}-v\d+", index)  # v1 at first, later ones after a rebuild
        mapping = es.indices.get_mapping(index=alias)[index]["mappings"]
        assert mapping["dynamic"] == "strict"
