"""Moving a SQLite ledger into Postgres (`farworker coordinator copy-ledger`): copy every row, then check that both
databases hold the same totals, table by table and worker by worker, through the same queries that pay."""

from __future__ import annotations

import math
from pathlib import Path

from farworker.coordinator.store import Store

# Sums of doubles may differ in their last bits when two databases add the same rows in another order.
REL_TOL = 1e-9


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)
    return a == b


def _flatten(prefix: str, value) -> dict[str, object]:
    """{"name": number} for a figure, a dict of figures or a list of tuples of figures (payable_by_price)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(f"{prefix}{key}", item).items()}
    if isinstance(value, list | tuple):
        flat = {f"{prefix} count": len(value)} if isinstance(value, list) else {}
        for i, item in enumerate(value):
            flat.update(_flatten(f"{prefix}[{i}]", item))
        return flat
    return {prefix: value}


def ledger_figures(store: Store) -> dict[str, object]:
    """Rows per table and tokens and $FAR summed, then each worker's ledger figures (all time, all payable)."""
    figures = dict(store.totals())
    for worker_id in store.worker_ids():
        totals = store.ledger_totals(worker_id, since=float("-inf"), paid_until=float("inf"),
                                     settled_until=float("inf"))
        figures.update(_flatten(f"{worker_id} ", totals))
    return figures


def copy_ledger(source: Path, target: str, verify_only: bool = False) -> tuple[bool, list[str]]:
    """Copy the SQLite ledger at ``source`` into the empty database at ``target`` (unless ``verify_only``) and
    compare: (all figures match, one line per figure). ValueError if ``target`` already holds a ledger."""
    source_store = Store(source)
    try:
        target_store = Store(target)
        try:
            if not verify_only:
                target_store.copy_from(source_store)
            before, after = ledger_figures(source_store), ledger_figures(target_store)
        finally:
            target_store.close()
    finally:
        source_store.close()
    lines, matched = [], True
    for name in sorted(set(before) | set(after), key=lambda n: (" " in n and n.startswith("w-"), n)):
        a, b = before.get(name), after.get(name)
        same = a is not None and b is not None and _same(a, b)
        matched &= same
        lines.append(f"{'ok      ' if same else 'MISMATCH'} {name}: {a} -> {b}")
    lines.append("totals match" if matched else "totals DIFFER: the copy is not the ledger")
    return matched, lines
