#!/usr/bin/env bash
# Set up (or verify) the project's virtual environment at .venv/.
#
#   bash launch/setup.sh        # runtime: torch, megatron-core, megasmoe (editable)
#   bash launch/setup.sh dev    # plus test tools and transformers ("dev" extra)
#
# Idempotent: a stamp in .venv records what was installed (hash of pyproject.toml and
# this script, plus the extras); a second run with nothing changed returns at once.
# Without CUDA (no nvidia-smi) torch is pinned to the CPU build torch==2.13.0, because
# an unpinned torch pulls gigabytes of CUDA packages.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-}"
venv="$root/.venv"
python="${PYTHON:-python3}"
stamp="$venv/.megasmoe-setup${extras:+-$extras}"
want="$(cat pyproject.toml launch/setup.sh | sha256sum | cut -d' ' -f1) extras=${extras}"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/megasmoe" ]; then
    exit 0
fi

echo "megasmoe setup: creating/updating $venv${extras:+ (extras: $extras)}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e ".${extras:+[$extras]}"
echo "$want" > "$stamp"
echo "megasmoe setup: done"
