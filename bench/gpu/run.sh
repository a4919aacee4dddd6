#!/usr/bin/env bash
# The GPU run (bench/gpu/run.py) from a pack of bench/gpu/pack.py, on the GPU machine or here on the CPU:
#   bench/gpu/run.sh PACK [run.py options: --runs laser,laser-fusion --time-limit 480 --set section.key=value ...]
# Results go to $OUT (else runs/gpu-out), checkpoints to --workdir (default runs/gpu-work): call again to resume.
# When the Python here lacks pydantic (the GPU image), the pack's site.tar.xz (its wheels, unpacked) is put on
# PYTHONPATH first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PACK="${1:?usage: bench/gpu/run.sh PACK [run.py options]}"
shift
PY="${PYTHON:-python3}"
if ! "$PY" -c "import pydantic" >/dev/null 2>&1; then
    if [ ! -f "$PACK/site.tar.xz" ]; then
        echo "pydantic is missing and $PACK has no site.tar.xz (build the pack with --wheels auto)" >&2
        exit 2
    fi
    SITE="${TMPDIR:-/tmp}/laser-gpu-site"
    mkdir -p "$SITE"
    tar -xJf "$PACK/site.tar.xz" -C "$SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" "$ROOT/bench/gpu/run.py" --pack "$PACK" "$@"
