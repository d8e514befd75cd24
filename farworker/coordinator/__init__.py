"""The reference Far Labs coordinator: for private meshes, ``farworker demo`` and the tests.

Nothing is imported here on purpose: `farworker run` registers the `coordinator` command, and every
petals process it forks would otherwise carry FastAPI and pydantic (about 14 MiB each). Import from the
modules: ``farworker.coordinator.settings`` (Settings), ``farworker.coordinator.app`` (create_app),
``farworker.coordinator.service`` (RunningCoordinator, serve). The layout: routers/ (HTTP routes per area), services/
(the rules, no HTTP), schemas/ (the API's records), store.py (SQL), runtime.py (the background threads).
"""
