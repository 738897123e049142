# Sourced by scripts/*: make .venv (if missing) and install stcs into it.
# STCS_EXTRAS selects extras (e.g. "test"); re-installs only when pyproject.toml or
# constraints-dev.txt (the pinned lint and type-check tools) changed.
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
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] \
    || [ "$ROOT/constraints-dev.txt" -nt "$stamp" ]; then
    spec="$ROOT"
    [ -n "${STCS_EXTRAS:-}" ] && spec="$ROOT[$STCS_EXTRAS]"
    echo "scripts: installing stcs${STCS_EXTRAS:+[$STCS_EXTRAS]} into $VENV" >&2
    # -W: setuptools warns on every editable install that a folder named like the package
    # may shadow it; here that folder *is* the package (pip re-raises it as a Python warning).
    "$VENV/bin/python" -W "ignore:Editable installation" -m pip install --quiet -e "$spec" \
        -c "$ROOT/constraints-dev.txt"
    touch "$stamp"
fi
