#!/usr/bin/env bash
# Set up this checkout on a fresh machine: Debian's chromium (the browser test drives it;
# Playwright never downloads a browser here) and postgresql (the local stack keeps Prefect
# and MLflow in it), then the virtualenv .venv with the project and its dev tools (the
# stack's S3 server and supervisor come from PyPI with it). Safe to run again: it installs
# only what is missing.
#   ./setup.sh                 # the README's first command runs this, then the main job
#   CIFAR_SKIP_BROWSER=1 ./setup.sh   # no browser: the UI test will fail, the rest runs
set -euo pipefail
cd "$(dirname "$0")"

packages=()
if [ -z "${CIFAR_SKIP_BROWSER:-}" ] && [ ! -x /usr/bin/chromium ]; then
    packages+=(chromium chromium-driver)
fi
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && ! command -v postgres >/dev/null
then
    packages+=(postgresql)
fi
if [ ${#packages[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null; then
        echo "error: ${packages[*]} missing and there is no apt-get here: install them with" \
             "your package manager (CIFAR_SKIP_BROWSER=1 goes without chromium)" >&2
        exit 1
    fi
    if [ "$(id -u)" = 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null; then
        SUDO=(sudo)
    else
        echo "error: installing ${packages[*]} needs root, and sudo is not installed: run" \
             "'apt-get install ${packages[*]}' as root, then ./setup.sh again" >&2
        exit 1
    fi
    echo "installing ${packages[*]} with apt-get ..."
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
fi

python3 -m venv .venv
# Exactly the locked versions, each file checked against its hash (`bash .ci/lock` refreshes
# the lock after a change to pyproject.toml), then the project itself.
.venv/bin/pip install --require-hashes -r requirements.lock
.venv/bin/pip install --no-deps -e .
