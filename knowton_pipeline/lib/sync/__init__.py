"""The sync engine: CDC apply, backfill and DLQ replay, all through the one transform per target."""
