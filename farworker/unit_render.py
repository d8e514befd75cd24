"""`farworker render-unit`: the systemd unit and env file for a host without Ansible.

The templates are the ones the Ansible roles install (roles/farworker/templates and
roles/mesh_bootstrap/templates, shipped inside the wheel as farworker/templates): one source, so a
hand-installed host runs the same unit as the fleet.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from farworker.config import SETTINGS

UNIT_TEMPLATES = {"farworker.service": "farworker.service.j2", "farworker.env.example": "farworker.env.j2",
                  "farworker-bootstrap.service": "farworker-bootstrap.service.j2"}


# Where each template lives in a checkout (an editable install); a wheel carries them all in farworker/templates.
ROLE_TEMPLATE_DIRS = ("roles/farworker/templates", "roles/mesh_bootstrap/templates")


def templates_dirs() -> list[Path]:
    packaged = Path(__file__).with_name("templates")  # inside an installed wheel
    if packaged.is_dir():
        return [packaged]
    checkout = Path(__file__).resolve().parent.parent
    return [checkout / d for d in ROLE_TEMPLATE_DIRS]


def example_env() -> dict[str, str]:
    """Every setting with its default; the required ones with a placeholder to replace."""
    placeholders = {"FARLABS_WALLET_ADDRESS": "0xYOUR_WALLET_ADDRESS_40_HEX_DIGITS_HERE0",
                    "FARLABS_API_BASE_URL": "https://coordinator.example.invalid",
                    "FARLABS_DHT_BOOTSTRAP": "/ip4/198.51.100.7/tcp/31337/p2p/QmYourBootstrapPeer"}
    return {s.env: placeholders.get(s.env, s.default or "") for s in SETTINGS
            if s.env not in ("FARLABS_CACHE_DIR", "FARLABS_STATE_DIR")}  # the unit sets these


def render_files(output_dir: str, *, venv_dir: str, user: str) -> list[Path]:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dirs()), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, keep_trailing_newline=True)  # as Ansible renders templates
    values = {"farworker_venv_dir": venv_dir, "farworker_user": user, "farworker_group": user,
              "farworker_env": example_env(), "mesh_bootstrap_announce_maddrs": []}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, template in UNIT_TEMPLATES.items():
        path = out / name
        path.write_text(env.get_template(template).render(**values))
        written.append(path)
    return written
