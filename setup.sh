#!/usr/bin/env bash
# Set up this checkout on a fresh machine: Debian's chromium (the browser test drives it;
# Playwright never downloads a browser here), then the virtualenv .venv with the project
# and its dev tools. Safe to run again: it installs only what is missing.
#   ./setup.sh                 # the README's first command runs this, then the main job
#   CIFAR_SKIP_BROWSER=1 ./setup.sh   # no browser: the UI test will fail, the rest runs
set -euo pipefail
cd "$(dirname "$0")"

if [ -z "${CIFAR_SKIP_BROWSER:-}" ] && [ ! -x /usr/bin/chromium ]; then
    if ! command -v apt-get >/dev/null; then
        echo "error: the browser test needs chromium at /usr/bin/chromium and there is no" \
             "apt-get here: install chromium with your package manager, or set" \
             "CIFAR_SKIP_BROWSER=1 to go without it" >&2
        exit 1
    fi
    if [ "$(id -u)" = 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null; then
        SUDO=(sudo)
    else
        echo "error: installing chromium needs root, and sudo is not installed: run" \
             "'apt-get install chromium chromium-driver' as root, then ./setup.sh again" >&2
        exit 1
    fi
    echo "installing chromium with apt-get (the browser test drives it) ..."
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi

python3 -m venv .venv
.venv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e '.[dev]'
