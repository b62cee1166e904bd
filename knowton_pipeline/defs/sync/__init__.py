"""CDC apply: the job that applies the cdc-* topics to ClickHouse and Elasticsearch, and its sensor."""
