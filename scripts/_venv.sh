# Sourced by scripts/*: make .venv (if missing) and install stcs into it.
# STCS_EXTRAS selects extras (e.g. "test"); re-installs only when pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "scripts: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$VENV/.stcs-installed-${STCS_EXTRAS:-base}"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    spec="$ROOT"
    [ -n "${STCS_EXTRAS:-}" ] && spec="$ROOT[$STCS_EXTRAS]"
    echo "scripts: installing ${spec#$ROOT} into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet -e "$spec"
    touch "$stamp"
fi
