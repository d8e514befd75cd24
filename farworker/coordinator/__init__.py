"""The reference Far Labs coordinator: for private meshes, ``farworker demo`` and the tests.

Nothing is imported here on purpose: `farworker run` registers the `coordinator` command, and every
petals process it forks would otherwise carry FastAPI and pydantic (about 14 MiB each). Import from the
modules: ``farworker.coordinator.app`` (Settings, create_app), ``farworker.coordinator.service``
(RunningCoordinator, serve).
"""
