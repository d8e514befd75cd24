# Shared by the CI and image scripts: source it, don't run it.

# Install the Debian packages that are missing (one apt-get run, only when needed).
ensure_apt_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# A hash of the calling image script and this file: an image labelled with it was built by this recipe.
image_recipe() {
    cat "$1" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16
}

# True when TAG exists and was built by RECIPE (FORCE=1: never).
image_is_cached() {
    [[ "${FORCE:-0}" != 1 ]] \
        && [[ "$(docker image inspect -f '{{ index .Config.Labels "farworker.recipe" }}' "$1" 2>/dev/null)" == "$2" ]]
}

# The Debian mirror this host's apt already uses, so no address is written down in the repo.
debian_mirror() {
    local mirror=${DEBIAN_MIRROR:-}
    if [[ -z "$mirror" ]]; then
        mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' 2>/dev/null \
            | grep -v -- '-security' | grep -E '/debian/?$' | head -n1 || true)
    fi
    [[ -n "$mirror" ]] || { echo "no Debian mirror found in apt's configuration; set DEBIAN_MIRROR" >&2; return 1; }
    echo "$mirror"
}
