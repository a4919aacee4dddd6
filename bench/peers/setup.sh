#!/usr/bin/env bash
# The peer benchmarks' own venv, bench/peers/.venv (git-ignored): RecTools 0.19 with its SASRec (the `torch` extra:
# torch, pytorch-lightning), on the main venv's CPU torch 2.13.0, plus what laser_core's data and metrics import.
# RecTools is never a dependency of the package (see README.md). `make peers-venv` runs this.
#   bench/peers/setup.sh            install the pinned set, requirements-rectools.lock
#   bench/peers/setup.sh --relock   resolve the top-level pins below again and rewrite the lock
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="$HERE/.venv"
LOCK="$HERE/requirements-rectools.lock"
# RecTools and what laser_core's data and metrics import, every package the main lock (requirements.lock) also pins
# at its version there, except the three RecTools 0.19 caps on Python 3.11 (numpy<2, pandas<3, attrs<24).
TOP=("rectools[torch]==0.19.0" "torch" "pydantic" "pyarrow")
CAPPED='^(numpy|pandas|attrs)=='

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "pip==26.3"
if [ "${1:-}" = "--relock" ]; then
  grep -v -E "$CAPPED" "$HERE/../../requirements.lock" > "$LOCK.constraints"
  "$VENV/bin/python" -m pip install --quiet -c "$LOCK.constraints" "${TOP[@]}"
  rm "$LOCK.constraints"
  {
    echo "# bench/peers/.venv, resolved by \`bench/peers/setup.sh --relock\` from: ${TOP[*]}"
    echo "# (constrained by requirements.lock except numpy, pandas, attrs: RecTools 0.19 needs numpy<2, pandas<3, attrs<24)"
    # torch's local version label (+cpu) dropped, as in requirements.lock: the CPU wheel comes from the local index
    "$VENV/bin/python" -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$/torch==\1/'
  } > "$LOCK.tmp"
  mv "$LOCK.tmp" "$LOCK"
  echo "wrote $LOCK"
else
  "$VENV/bin/python" -m pip install --quiet -r "$LOCK"
fi
"$VENV/bin/python" -c "import rectools, torch; print('rectools', rectools.__version__, 'torch', torch.__version__)"
