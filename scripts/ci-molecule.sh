#!/usr/bin/env bash
# The appliance's CI: lint the roles, then run every molecule scenario on systemd containers.
# Works on a fresh Debian 12 machine as root (no docker running, no galaxy, no registry):
#   1. apt: docker.io, debootstrap, rsync     2. .venv-ansible with requirements/ansible.txt
#   3. the collections community.docker and ansible.posix, taken from PyPI's `ansible` wheel
#   4. dockerd (overlay2; vfs fallback)   5. the debootstrap systemd image (cached by tag)   6. the wheelhouse (cached)
#   7. ansible-lint (production) + yamllint   8. molecule test for each scenario
# Usage: scripts/ci-molecule.sh [SCENARIO...]   (default: nvidia_driver cuda default; fleet and multi_gpu run only
# when named)
# SKIP_LINT=1 skips step 7.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
cache=${FARWORKER_CI_CACHE:-$root/.cache}
venv=$root/.venv-ansible
ansible_wheel_version=12.3.0
image=farworker/debian-systemd:bookworm
scenarios=("$@")
[[ ${#scenarios[@]} -gt 0 ]] || scenarios=(nvidia_driver cuda default)

step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

step "apt packages"
# shellcheck source=scripts/containers/lib.sh
source scripts/containers/lib.sh
ensure_apt_packages docker.io debootstrap

step "ansible tools in $venv"
want=$(sha256sum requirements/ansible.txt | cut -d' ' -f1)
if [[ ! -f "$venv/.requirements-stamp" || "$(cat "$venv/.requirements-stamp")" != "$want" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    echo '*' >"$venv/.gitignore"
    "$venv/bin/pip" install --quiet -r requirements/ansible.txt
    echo "$want" >"$venv/.requirements-stamp"
fi
export PATH="$venv/bin:$PATH"

step "collections community.docker and ansible.posix (from the ansible $ansible_wheel_version wheel)"
collections=$cache/collections
if [[ ! -f "$collections/.stamp-$ansible_wheel_version" ]]; then
    rm -rf "$collections"
    mkdir -p "$cache/ansible-wheel"
    pip download --quiet --no-deps "ansible==$ansible_wheel_version" -d "$cache/ansible-wheel"
    python3 - "$cache/ansible-wheel/ansible-$ansible_wheel_version-py3-none-any.whl" "$collections" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(("ansible_collections/community/docker/", "ansible_collections/ansible/posix/")):
            z.extract(name, dest)
PY
    touch "$collections/.stamp-$ansible_wheel_version"
fi
export ANSIBLE_COLLECTIONS_PATH=$collections
export ANSIBLE_ROLES_PATH=$root/roles
export ANSIBLE_FORCE_COLOR=0 PY_COLORS=0 ANSIBLE_NOCOLOR=1

if [[ "${SKIP_LINT:-0}" != 1 ]]; then
    step "yamllint"
    yamllint --strict roles playbooks inventory molecule .config .yamllint .ansible-lint
    step "ansible-lint (production profile)"
    ansible-lint --offline --nocolor
fi

step "dockerd"
bash scripts/containers/dockerd-up.sh

step "systemd image $image"
bash scripts/containers/build-systemd-image.sh "$image"

if printf '%s\n' "${scenarios[@]}" | grep -qxE 'default|fleet|multi_gpu'; then
    step "wheelhouse"
    bash scripts/build-wheelhouse.sh "$cache/wheelhouse"
    export FARWORKER_WHEELHOUSE=$cache/wheelhouse
fi

if printf '%s\n' "${scenarios[@]}" | grep -qx fleet; then
    # The fleet's rolling upgrade installs a newer farworker: the same tree as VERSION.post1.
    step "fleet wheelhouse (+ a newer farworker wheel)"
    version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
    export FLEET_UPGRADE_VERSION=$version.post1 FARWORKER_FLEET_WHEELHOUSE=$cache/fleet-wheelhouse
    rm -rf "$FARWORKER_FLEET_WHEELHOUSE" "$cache/fleet-src"
    cp -al "$cache/wheelhouse" "$FARWORKER_FLEET_WHEELHOUSE"
    mkdir -p "$cache/fleet-src"
    cp -r pyproject.toml farworker "$cache/fleet-src/"
    cp -r --parents roles/farworker/templates roles/mesh_bootstrap/templates "$cache/fleet-src/"  # the wheel's templates
    for f in README.md LICENSE; do [[ -e $f ]] && cp "$f" "$cache/fleet-src/"; done
    sed -i "s/^version = \"$version\"$/version = \"$FLEET_UPGRADE_VERSION\"/" "$cache/fleet-src/pyproject.toml"
    sed -i "s/^__version__ = \"$version\"$/__version__ = \"$FLEET_UPGRADE_VERSION\"/" "$cache/fleet-src/farworker/__init__.py"
    python3 -m pip wheel --quiet --no-deps -w "$FARWORKER_FLEET_WHEELHOUSE" "$cache/fleet-src"
    ls "$FARWORKER_FLEET_WHEELHOUSE"/farworker-*.whl
fi

for scenario in "${scenarios[@]}"; do
    step "molecule test -s $scenario"
    start=$SECONDS
    molecule test -s "$scenario"
    echo "molecule scenario $scenario passed in $((SECONDS - start)) s"
done
step "done: ${scenarios[*]}"
