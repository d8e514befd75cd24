"""The OpenAPI contract as the coordinator serves it; `python -m farworker.coordinator.contract` rewrites
openapi/farworker-api.yaml from the code (the test compares the two)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml

from farworker.coordinator.app import create_app
from farworker.coordinator.settings import Settings

CONTRACT_PATH = Path(__file__).resolve().parents[2] / "openapi" / "farworker-api.yaml"


def served_openapi() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(db_path=Path(tmp) / "contract.sqlite"))
        document = app.openapi()
        app.state.store.close()
    return document


def render() -> str:
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    header = (
        "# The Far Labs coordinator API (workers <-> coordinator, completions). Generated from\n"
        "# farworker/wire_records.py and farworker/coordinator/: python -m farworker.coordinator.contract\n"
    )
    return header + yaml.dump(served_openapi(), Dumper=Dumper, sort_keys=False, allow_unicode=True, width=110)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else CONTRACT_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render())
    print(f"wrote {target}")
