"""Where farworker's modules may reach: petals only from farworker/petals/, no import cycles, no import upward.

Layers, bottom to top (docs/architecture.md draws the same). A module imports modules of its own layer or of a
lower one, never of a higher one. Imports inside functions count: they are imports all the same.

  1. petals access   farworker.petals.* (but the server host, layer 3): the only modules that import petals or
                     hivemind, through compat.import_petals. They import nothing else of farworker.
  2. base            small modules any process may import without torch or petals: the model catalogue, the
                     configuration, identity and receipts, GPU facts, status file, outbox, notify, ...
  3. worker parts    what `farworker run` is built from: block plan, model source, instances, the coordinator
                     API client and reporter, the mesh client, and the petals server host (petals.server_host,
                     serving_meter, throughput: they run petals with the worker's configuration, plan and outbox).
  4. worker          the worker's commands: runner, preflight, bootstrap peer, status view, direct generation,
                     and local_mesh (a mesh of those processes).
  5. coordinator     farworker.coordinator.*: uses layers 1-3 (the shared modules); no worker module imports it.
  6. commands        cli, __main__ and demo (which runs a coordinator and workers).

A new module gets a line in LAYERS; the test names any module that has none.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "farworker"

# (layer, name patterns), top first; the first pattern a module matches places it (so the server host modules
# named in "worker parts" are not caught by "petals access"'s farworker.petals.*).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("commands", ("farworker", "farworker.__main__", "farworker.cli", "farworker.demo")),
    ("coordinator", ("farworker.coordinator", "farworker.coordinator.*")),
    ("worker", ("farworker.runner", "farworker.preflight", "farworker.bootstrap_peer", "farworker.status_view",
                "farworker.direct_generation", "farworker.local_mesh")),
    ("worker parts", ("farworker.block_plan", "farworker.model_source", "farworker.instances", "farworker.api_client",
                      "farworker.reporting", "farworker.mesh_client", "farworker.session_capture",
                      "farworker.vouching_client",
                      "farworker.petals.server_host", "farworker.petals.serving_meter",
                      "farworker.petals.throughput")),
    ("petals access", ("farworker.petals", "farworker.petals.*")),
    ("base", ("farworker.catalog", "farworker.config", "farworker.disk_space", "farworker.identity",
              "farworker.receipts", "farworker.gpu", "farworker.gpu_xid", "farworker.status_file",
              "farworker.outbox", "farworker.wire_records", "farworker.notify", "farworker.metrics",
              "farworker.shm_guard", "farworker.process_tree", "farworker.threading_policy", "farworker.tiny_model",
              "farworker.local_reference", "farworker.unit_render", "farworker.shm_cleanup",
              "farworker.clock_offset", "farworker.library_noise", "farworker.entry_lines")),
)
ORDER = ("petals access", "base", "worker parts", "worker", "coordinator", "commands")  # bottom to top
FORBIDDEN_OUTSIDE_PETALS = ("petals", "hivemind")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, name: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in module ``name`` (at ``path``), inside functions too; relative
    imports made absolute."""
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                module = ".".join(anchor + ([module] if module else []))
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def edges() -> dict[str, dict[str, int]]:
    """module -> {farworker module it imports: the line of the first such import}."""
    graph: dict[str, dict[str, int]] = {name: {} for name in MODULES}
    for name, path in MODULES.items():
        for line, module, names in imports(path, name):
            for target in [module] + [f"{module}.{n}" for n in names]:
                while target and target not in MODULES:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "farworker"):
                    graph[name].setdefault(target, line)
    return graph


def layer_of(module: str) -> str | None:
    for layer, patterns in LAYERS:
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return layer
    return None


# Until the coordinator's petals reads move under farworker/petals/ (issue 19), the coordinator scope fails; run
# `-k "not coordinator"` to check the rest alone.
@pytest.mark.parametrize("scope", ["worker", "coordinator"])
def test_only_farworker_petals_imports_petals_or_hivemind(scope):
    checked = {name: p for name, p in MODULES.items()
               if not (name == "farworker.petals" or name.startswith("farworker.petals."))
               and (name.startswith("farworker.coordinator")) == (scope == "coordinator")}
    assert checked
    offending = [f"{path.relative_to(PACKAGE.parent)}:{line}: imports {module}"
                 for name, path in checked.items() for line, module, _names in imports(path, name)
                 if module.split(".")[0] in FORBIDDEN_OUTSIDE_PETALS]
    assert not offending, "petals and hivemind are imported only under farworker/petals/:\n" + "\n".join(offending)


def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from petals.server import task_pool\n\nfrom .config import ConfigError\n")
    found = imports(probe, "farworker.probe")
    assert (2, "petals.server", ["task_pool"]) in found and (4, "farworker.config", ["ConfigError"]) in found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The import cycles of ``graph`` (Tarjan's strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles():
    found = cycles(edges())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_a_cycle_is_found():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    missing = [name for name in MODULES if layer_of(name) is None]
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {', '.join(missing)}"


def upward(graph: dict[str, dict[str, int]]) -> list[str]:
    """'module (layer) imports target (higher layer)' for each import that goes up."""
    found = []
    for module, targets in graph.items():
        here = layer_of(module)
        for target, line in targets.items():
            there = layer_of(target)
            if here and there and ORDER.index(there) > ORDER.index(here):
                found.append(f"{module}:{line} ({here}) imports {target} ({there})")
    return found


def test_no_import_goes_up_a_layer():
    found = upward(edges())
    assert not found, "imports that go up a layer:\n" + "\n".join(found)


def test_an_upward_import_is_found():
    graph = {"farworker.config": {"farworker.runner": 7}, "farworker.runner": {"farworker.config": 3}}
    assert upward(graph) == ["farworker.config:7 (base) imports farworker.runner (worker)"]
