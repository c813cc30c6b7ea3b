#!/usr/bin/env bash
# The packages as users get them (make smoke; CI runs it after make dist):
# twine check --strict on dist/*, then the wheel (not editable) installed in a
# fresh venv in a temporary directory, and .ci/smoke_wheel.py run from there,
# outside the checkout. PYTHON: the interpreter for that venv (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$(pwd)
PYTHON=${PYTHON:-python3}
TOOLS=${TOOLS:-.venv/bin/python}   # has twine (the dev extra)

shopt -s nullglob
wheels=(dist/*.whl)
sdists=(dist/*.tar.gz)
if [ ${#wheels[@]} -ne 1 ] || [ ${#sdists[@]} -ne 1 ]; then
  echo "smoke: expected one wheel and one sdist in dist/ (run make dist), found: ${wheels[*]} ${sdists[*]}" >&2
  exit 1
fi
"$TOOLS" -m twine check --strict "${wheels[0]}" "${sdists[0]}"

work=$(mktemp -d /tmp/dmb-smoke.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "$checkout/${wheels[0]}[django]"
cp .ci/smoke_wheel.py "$work/"
cd "$work"
env -u PYTHONPATH "$work/venv/bin/python" smoke_wheel.py
