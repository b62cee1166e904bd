"""The local real-component stack: PostgreSQL, Kafka, Kafka Connect with Debezium, Elasticsearch."""
