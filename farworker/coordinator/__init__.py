"""The reference Far Labs coordinator: for private meshes, ``farworker demo`` and the tests."""

from farworker.coordinator.app import Settings, create_app
from farworker.coordinator.service import RunningCoordinator, serve

__all__ = ["RunningCoordinator", "Settings", "create_app", "serve"]
