# Shared by scripts/test and scripts/demo: Debian packages and the venv.
# Source it from the repository root.

# ensure_debian_packages PACKAGE...: install the missing ones (as root; a
# single apt-get update first, and only when something is missing).
ensure_debian_packages() {
    local missing=() package
    for package in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null \
            | grep -q 'install ok installed'; then
            missing+=("$package")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    if ((EUID != 0)); then
        echo "missing Debian packages: ${missing[*]}" \
            "(run as root to install them; tests needing them will skip)" >&2
        return 0
    fi
    echo "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}" </dev/null
}

# prepare_venv [EXTRAS]: .venv with the project installed (editable).
prepare_venv() {
    local extras=${1:-} python=${PYTHON:-python3} stamp spec=.
    [[ -n $extras ]] && spec=".[$extras]"
    # scripts/demo and scripts/test share the venv: one builds it at a time.
    exec {venv_lock}>.venv.lock
    flock "$venv_lock"
    if ! .venv/bin/python -c 'import sys' 2>/dev/null; then
        rm -rf .venv
        "$python" -m venv .venv
    fi
    # Reinstall only when the dependency list changed since the last install.
    stamp=".venv/.installed-$extras-$(sha256sum pyproject.toml | cut -c1-16)"
    if [[ ! -e $stamp ]]; then
        .venv/bin/python -m pip install -q -e "$spec"
        rm -f .venv/.installed-*
        touch "$stamp"
    fi
}
