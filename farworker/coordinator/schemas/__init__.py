"""The coordinator API's records per area (openapi/farworker-api.yaml is generated from these): workers,
ledger, openai, and the error body in common. The records a worker sends live in farworker/wire_records.py."""
