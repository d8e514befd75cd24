"""Everything that touches petals' or hivemind's private API, and nothing else does (tests/test_layering.py).

`compat` is the one way petals is imported (hivemind 1.1.12 names restored first); `server_host` runs the
in-process petals server; `step_batching` and `tensor_handoff` change how its runtime works; `serving_meter`
counts what its handlers serve. Upgrading petals or hivemind means reading this folder, no other.
"""
