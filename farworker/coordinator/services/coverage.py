"""Block coverage: which workers hold a model's blocks for clients now, and how many hold each block (0: a gap, no
route through the model). The coordinator's /metrics shows it (farworker_coordinator_block_holders)."""

from __future__ import annotations

from farworker.coordinator.schemas.ledger import WorkerView


def serving(worker: WorkerView) -> bool:
    """Holds its span for clients now: online as the coordinator observes it (not offline, not quarantined) and
    healthy by its own last beat."""
    return worker.state == "online" and worker.blocks is not None and (worker.last_heartbeat or {}).get(
        "healthy", True) is not False


def models_and_blocks(views: list[WorkerView], model_blocks: dict[str, int], served: list[str]) -> dict[str, int]:
    """Each model to show coverage for, with its block count: those the coordinator serves (their size from its
    settings, else from their workers) and those its workers registered for; a model of unknown size is left out."""
    sizes: dict[str, int] = {}
    for model in {*served, *(w.model_name for w in views)}:
        size = model_blocks.get(model) or max(
            (w.total_blocks or 0 for w in views if w.model_name == model), default=0)
        if size:
            sizes[model] = size
    return sizes


def holders_per_block(workers: list[WorkerView], total_blocks: int) -> list[int]:
    """Per block, how many of ``workers`` (one model's) serve it now."""
    holders = [0] * total_blocks
    for worker in workers:
        if serving(worker):
            for block in range(max(0, worker.blocks[0]), min(total_blocks, worker.blocks[1])):
                holders[block] += 1
    return holders


def block_holders(views: list[WorkerView], model: str, total_blocks: int) -> list[int]:
    """Per block of ``model``, how many serving workers hold it."""
    return holders_per_block([w for w in views if w.model_name == model], total_blocks)
