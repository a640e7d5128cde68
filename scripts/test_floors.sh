#!/usr/bin/env bash
# The test suite on the oldest versions pyproject.toml allows: every direct dependency of the package and
# of the dev extra installed at its floor (">=X" as "==X") in .venv-floors, so a floor the code has
# outgrown fails here. torch and torchvision stay the machine's (their floor, torch 2.11, is checked by
# hand: README); ruff is not imported. tests/test_quickstart.py is left out: it runs scripts/quickstart.sh,
# which sets up and uses .venv, so here it would repeat the README test command's run, not test the floors.
#   bash scripts/test_floors.sh [PYTEST ARGS]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-floors
pins=$(python3 - <<'PY'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for dep in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep).groups()
    if name not in ("torch", "torchvision", "ruff"):
        print(f"{name}=={floor}")
PY
)
stamp="$venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".[dev]" $pins
  touch "$stamp"
fi
"$venv/bin/python" -m pip list 2>/dev/null | grep -i -E "^($(echo "$pins" | sed 's/==.*//' | paste -sd'|')) " || true
exec "$venv/bin/python" -m pytest -p no:cacheprovider --ignore tests/test_quickstart.py "$@"
