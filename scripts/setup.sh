#!/usr/bin/env bash
# Create .venv (once) and install the project with the given extras: bash scripts/setup.sh dev|demo
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-dev}
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.installed-$extras-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
