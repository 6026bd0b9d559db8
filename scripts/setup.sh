#!/usr/bin/env bash
# Create .venv (once) and install promptkd with its test tools; safe to re-run.
# torch is pinned per architecture to builds that pair with torchvision (see docs/installing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
case "$(uname -m)" in
    x86_64) torch_pins=("torch==2.14.1" "torchvision==0.29.1") ;;
    aarch64 | arm64) torch_pins=("torch==2.9.1" "torchvision==0.24.1") ;;
    *) torch_pins=("torch" "torchvision") ;;
esac
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
    pip install -q "${torch_pins[@]}"
fi
stamp=.venv/.promptkd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    pip install -q -e ".[test]"
    touch "$stamp"
fi
