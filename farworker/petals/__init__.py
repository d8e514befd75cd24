"""Everything that touches petals' or hivemind's private API, and nothing else does (tests/test_layering.py).

`compat` is the one way petals is imported (hivemind 1.1.12 names restored first); `model_config` reads a model's
block configuration and sizes a block; `multiaddr` parses addresses as hivemind's DHT does; `server_host` runs the
in-process petals server, announcing `throughput`'s figure; `step_batching` and `tensor_handoff` change how its
runtime works (each with its own `install()`); `serving_meter` counts what its handlers serve. Upgrading petals or
hivemind means reading this folder, no other.
"""
