#!/usr/bin/env bash
# Thin wrapper: register_stack.py with the repository's venv (override with PYTHON=...). Flags pass through.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export ZENML_ANALYTICS_OPT_IN="${ZENML_ANALYTICS_OPT_IN:-false}"
exec "$python" "$here/register_stack.py" "$@"
