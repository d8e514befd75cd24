"""The coordinator's rules as plain functions and classes, testable without HTTP: the ledger, uptime, the worker
view and registration, receipts, completions. Routers call these; nothing here imports FastAPI."""
