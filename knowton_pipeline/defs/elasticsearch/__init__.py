"""Elasticsearch: the search indices, one asset each."""
