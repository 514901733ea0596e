"""The event contract and the durable, tamper-evident event log."""
