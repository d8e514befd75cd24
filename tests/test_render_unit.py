"""The unit rendered for hosts without Ansible: valid for systemd and sandboxed to exposure <= 3.0."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from farworker.config import SETTINGS
from farworker.unit_render import ROLE_TEMPLATE_DIRS, UNIT_TEMPLATES

REPO = Path(__file__).resolve().parent.parent
SETTINGS_BY_ENV = {s.env: s for s in SETTINGS}


def render(tmp_path):
    subprocess.run([sys.executable, "-m", "farworker", "render-unit", "--output-dir", str(tmp_path),
                    "--venv-dir", "/opt/farworker/venv"], check=True, capture_output=True, timeout=60)
    return tmp_path / "farworker.service"


def test_unit_has_the_service_contract(tmp_path):
    unit = render(tmp_path).read_text()
    for line in ("Type=notify", "NotifyAccess=main", "Restart=on-failure", "RestartPreventExitStatus=78",
                 "ExecStart=/opt/farworker/venv/bin/farworker run", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert line in unit
    assert re.search(r"^WatchdogSec=\d+", unit, re.M)
    assert re.search(r"^TemporaryFileSystem=/dev/shm:size=", unit, re.M)
    assert "{{" not in unit and "{%" not in unit


def test_env_example_names_every_setting(tmp_path):
    render(tmp_path)
    example = (tmp_path / "farworker.env.example").read_text()
    documented = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    expected = {s.env for s in SETTINGS} - {"FARLABS_CACHE_DIR", "FARLABS_STATE_DIR"}
    # Settings with an empty default are left out (the worker's own default applies); every other one is written.
    left_out = expected - documented
    assert {"HF_TOKEN", "FARLABS_BLOCK_INDICES", "FARLABS_HOST_MADDRS", "FARLABS_ANNOUNCE_MADDRS",
            "FARLABS_PUBLIC_NAME", "FARLABS_INSTANCE", "FARLABS_GPU"} <= left_out
    assert all(not SETTINGS_BY_ENV[env].default for env in left_out), left_out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_security_exposure_is_at_most_3(tmp_path):
    unit = render(tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                            text=True, timeout=60)
    match = re.search(r"Overall exposure level for farworker.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0


def test_the_wheel_ships_the_roles_own_templates():
    """render-unit without a checkout reads farworker/templates from the wheel: the same files as the roles."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    for template in UNIT_TEMPLATES.values():
        sources = [f"{d}/{template}" for d in ROLE_TEMPLATE_DIRS if (REPO / d / template).is_file()]
        assert len(sources) == 1, f"{template}: expected in exactly one role, found in {sources}"
        assert shipped.get(sources[0]) == f"farworker/templates/{template}", f"{sources[0]} is not in the wheel"
    assert not (REPO / "templates").exists(), "templates/ moved into the roles; a second copy would drift"
