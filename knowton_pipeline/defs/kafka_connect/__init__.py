"""Kafka Connect and the CDC topics Debezium writes."""
