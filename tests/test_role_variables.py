"""One source per role variable: the committed defaults, argument_specs and README tables are what
scripts/role_variables.py makes of roles/<role>/meta/variables.yml (and farworker.config.SETTINGS)."""

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from farworker.config import SETTINGS, SETTINGS_BY_NAME
from farworker.preflight import MIN_DRIVER_BRANCH

REPO = Path(__file__).resolve().parent.parent
ROLES = ("nvidia_driver", "cuda", "farworker", "mesh_bootstrap", "farworker_package", "farworker_coordinator")


def generator():
    spec = importlib.util.spec_from_file_location("role_variables", REPO / "scripts" / "role_variables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("role", ROLES)
def test_generated_files_match_the_source(role):
    gen = generator()
    assert set(gen.ROLES) == set(ROLES)
    for path, text in gen.generated(role, SETTINGS_BY_NAME).items():
        assert path.read_text() == text, (
            f"{path.relative_to(REPO)} differs from roles/{role}/meta/variables.yml: run scripts/role_variables.py")


def test_every_worker_setting_is_a_role_variable_or_set_elsewhere():
    assert generator().unexposed_settings(SETTINGS_BY_NAME) == []


def role_file(role, name):
    return yaml.safe_load((REPO / "roles" / role / name).read_text())


@pytest.mark.parametrize("role", ROLES)
def test_defaults_specs_and_readme_agree(role):
    """Independent of the generator: what Ansible reads (defaults, argument_specs) and what operators read agree."""
    defaults = role_file(role, "defaults/main.yml")
    options = role_file(role, "meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    readme = (REPO / "roles" / role / "README.md").read_text()
    assert sorted(defaults) == sorted(k for k, o in options.items() if not o.get("required"))
    for name, option in options.items():
        assert name.startswith(f"{role}_"), name
        if "default" in option:
            assert option["default"] == defaults[name], name
        row = re.search(rf"^\| `{name}` \| (\w+) \| (.*?) \|", readme, re.M)
        assert row, f"{name} is not in roles/{role}/README.md's table"
        assert row.group(1) == option["type"], name


def test_env_file_variables_carry_the_worker_settings():
    """A FARLABS_* variable's default is the worker's own unless the source says otherwise, and its description
    names the env variable and the accepted values farworker check enforces."""
    options = role_file("farworker", "meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    source = role_file("farworker", "meta/variables.yml")
    overridden = {v["name"] for s in source["sections"] for v in s["variables"] if "setting" in v and "default" in v}
    by_variable = {v["name"]: SETTINGS_BY_NAME[v["setting"]] for s in source["sections"] for v in s["variables"]
                   if "setting" in v}
    assert {"farworker_wallet_address", "farworker_heartbeat_interval", "farworker_drain_timeout_sec"} <= set(
        by_variable)
    for name, setting in by_variable.items():
        option = options[name]
        assert option["description"].startswith(f"{setting.env}: "), name
        if option.get("choices"):
            assert option["choices"] == setting.accepted.split(", "), name
        else:
            assert setting.accepted in option["description"], name
        if name not in overridden and not option.get("required") and option["type"] in ("str", "int"):
            assert str(option["default"]) == (setting.default or ""), name
    # The env file itself is written from vars/main.yml: every mapped setting is in it.
    env = role_file("farworker", "vars/main.yml")["_farworker_env"]
    assert {s.env for s in by_variable.values()} <= set(env)
    assert {s.env for s in SETTINGS} >= set(env) - {"HF_HUB_OFFLINE"}


def test_driver_branch_defaults_are_the_one_farworker_check_uses():
    """CUDA 13 (torch 2.13.0's CUDA build): the driver role's default and its minimum are farworker check's number."""
    assert MIN_DRIVER_BRANCH["13"] == "580"
    defaults = role_file("nvidia_driver", "defaults/main.yml")
    assert defaults["nvidia_driver_branch"] == "580" and defaults["nvidia_driver_min_branch"] == 580
    assert role_file("cuda", "defaults/main.yml")["cuda_version"] == "13.0"
