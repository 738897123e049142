#!/usr/bin/env bash
# Install or update stcs on this machine from config.yml (re-run it to apply changes).
#
#   sudo scripts/setup.sh [--config config.yml] [--dry-run] [options]
#
# Steps: Debian packages -> service user -> virtual environment with stcs -> /etc/stcs/config.yml
# -> dbPath and log directory -> web server (webServerType: nginx, apache or empty) -> service
# (systemd where it runs; start-stop-daemon where it does not) -> health check.
# With useDocker: true it builds and runs the Docker image instead of the service.
# --dry-run prints every step's commands and changes nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="$ROOT/config.yml"
DRY_RUN=0
PREFIX=/opt/stcs
VENV=""
ETC=/etc/stcs
WORKDIR=/var/lib/stcs
SERVICE_USER=stcs
LISTEN=80
TLS_LISTEN=443

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    cat <<EOF

Options:
  --config FILE       settings (default: $ROOT/config.yml)
  --dry-run           print the steps, change nothing
  --prefix DIR        installation directory (default $PREFIX)
  --venv DIR          virtual environment (default PREFIX/venv)
  --etc DIR           where config.yml is installed (default $ETC)
  --workdir DIR       service working directory; a relative dbPath is below it (default $WORKDIR)
  --user NAME         service user, created if missing (default $SERVICE_USER)
  --listen ADDR       web server address (default $LISTEN)
  --tls-listen ADDR   web server TLS address (default $TLS_LISTEN)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --config) CONFIG="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --prefix) PREFIX="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --etc) ETC="$2"; shift 2 ;;
        --workdir) WORKDIR="$2"; shift 2 ;;
        --user) SERVICE_USER="$2"; shift 2 ;;
        --listen) LISTEN="$2"; shift 2 ;;
        --tls-listen) TLS_LISTEN="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
VENV="${VENV:-$PREFIX/venv}"
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
[ -f "$CONFIG" ] || { echo "setup.sh: no config file $CONFIG (copy config.sample.yml)" >&2; exit 2; }

STEP=0
step() { STEP=$((STEP + 1)); echo "==> [$STEP] $*"; }
# run CMD...: execute, or print it in a dry run.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '    would run:'; printf ' %q' "$@"; printf '\n'
    else
        printf '    $'; printf ' %q' "$@"; printf '\n'
        "$@"
    fi
}
# write_file DEST MODE: stdin to DEST (only when it changed; prints the diff in a dry run).
write_file() {
    local dest="$1" mode="$2" tmp
    tmp="$(mktemp)"
    cat > "$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
        echo "    unchanged: $dest"
    elif [ "$DRY_RUN" = 1 ]; then
        echo "    would write: $dest ($(wc -l < "$tmp") lines)"
    else
        install -D -m "$mode" "$tmp" "$dest"
        echo "    wrote: $dest"
    fi
    rm -f "$tmp"
}
note() { echo "    $*"; }

if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (or with --dry-run)" >&2
    exit 2
fi
[ "$DRY_RUN" = 1 ] && echo "setup.sh: dry run: nothing is changed"

# stcs reads config.yml (no sed/yq): the target venv's, else this checkout's, else the source.
stcs_cli() {
    if [ -x "$VENV/bin/stcs" ]; then "$VENV/bin/stcs" "$@"
    elif [ -x "$ROOT/.venv/bin/stcs" ]; then "$ROOT/.venv/bin/stcs" "$@"
    else PYTHONPATH="$ROOT" python3 -m stcs "$@"
    fi
}
get() { stcs_cli check-config --config "$CONFIG" --get "$1"; }
if ! stcs_cli check-config --config "$CONFIG" >/dev/null; then
    echo "setup.sh: $CONFIG is not valid (see above)" >&2
    exit 2
fi
WEB=$(get webServerType)
APP=$(get appName)
USE_DOCKER=$(get useDocker)
TLS=$(get enableSSL)
DB_PATH=$(get dbPath)
LOG_FILE=$(get logFile)
APP_PORT=$(get appPort)
case "$DB_PATH" in /*) ;; *) DB_PATH="$WORKDIR/${DB_PATH#./}" ;; esac
LOG_DIR=""
if [ -n "$LOG_FILE" ]; then
    case "$LOG_FILE" in /*) ;; *) LOG_FILE="$WORKDIR/${LOG_FILE#./}" ;; esac
    LOG_DIR="$(dirname "$LOG_FILE")"
fi
echo "setup.sh: $APP from $CONFIG: webServerType='${WEB}' enableSSL=$TLS useDocker=$USE_DOCKER"

systemd_runs() { [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; }

# -- 1. packages ---------------------------------------------------------------------------
step "Debian packages"
pkgs=()
python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
case "$WEB" in
    nginx) command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || pkgs+=(nginx) ;;
    apache) command -v apache2 >/dev/null || [ -x /usr/sbin/apache2 ] || pkgs+=(apache2) ;;
esac
if [ ${#pkgs[@]} -gt 0 ]; then
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
else
    note "all present"
fi

if [ "$USE_DOCKER" = true ]; then
    step "Docker image and container (useDocker)"
    IMAGE=$(get dockerImageName)
    CONTAINER=$(get dockerContainerName)
    if [ "$DRY_RUN" = 0 ] && ! docker info >/dev/null 2>&1; then
        echo "setup.sh: useDocker is true but no Docker engine answers here" >&2
        exit 1
    fi
    run docker build -t "$IMAGE" "$ROOT"
    # The container's stcs (uid 10001, Dockerfile) reads only a config file it or root could
    # have written, and serves only a dbPath that is its own and 0700 (docs/security.md): a
    # private copy of config.yml for it, and dbPath made its own.
    write_file "$ETC/config.yml" 0600 < "$CONFIG"
    run chown 10001 "$ETC/config.yml"
    [ -d "$DB_PATH" ] || run install -d -m 0700 "$DB_PATH"
    run chown 10001 "$DB_PATH"
    run chmod 0700 "$DB_PATH"
    run docker rm -f "$CONTAINER"
    run docker run -d --name "$CONTAINER" --restart unless-stopped \
        -p "127.0.0.1:$APP_PORT:$APP_PORT" -v "$DB_PATH:/data" \
        -v "$ETC/config.yml:/etc/stcs/config.yml:ro" "$IMAGE" --config /etc/stcs/config.yml \
        --db /data
    echo "setup.sh: done (Docker)"
    exit 0
fi

# -- 2. user ----------------------------------------------------------------------------------
step "service user $SERVICE_USER"
if id "$SERVICE_USER" >/dev/null 2>&1; then
    note "exists"
else
    run useradd --system --home-dir "$WORKDIR" --shell /usr/sbin/nologin "$SERVICE_USER"
fi

# -- 3. virtual environment ---------------------------------------------------------------------
step "virtual environment $VENV with stcs from $ROOT"
[ -x "$VENV/bin/python" ] || run python3 -m venv "$VENV"
installed_from="$("$VENV/bin/python" -c 'import pathlib, stcs
print(pathlib.Path(stcs.__file__).resolve().parent.parent)' 2>/dev/null || true)"
if [ "$installed_from" = "$ROOT" ]; then
    note "stcs is installed from this checkout (editable): nothing to update"
else
    run "$VENV/bin/python" -m pip install --quiet --upgrade "$ROOT"
fi

# -- 4. configuration ---------------------------------------------------------------------------
step "configuration $ETC/config.yml"
write_file "$ETC/config.yml" 0640 < "$CONFIG"
run chown "root:$SERVICE_USER" "$ETC/config.yml"

# -- 5. directories -----------------------------------------------------------------------------
step "data and log directories"
for dir in "$WORKDIR" "$DB_PATH" ${LOG_DIR:+"$LOG_DIR"}; do
    [ -d "$dir" ] && note "exists: $dir" || run install -d -m 0750 "$dir"
    run chown "$SERVICE_USER:$SERVICE_USER" "$dir"
done
# dbPath is the service user's alone: in UUID mode its entries are tokens, and `stcs serve`
# refuses a dbPath that group or others can enter (allowSharedDbPath).
run chmod 0700 "$DB_PATH"

# -- 6. web server ------------------------------------------------------------------------------
render() { stcs_cli render --config "$CONFIG" "$@" --listen "$LISTEN" --tls-listen "$TLS_LISTEN"; }
KIND="$WEB"
[ "$TLS" = true ] && KIND="$WEB-tls"
case "$WEB" in
    nginx)
        step "nginx site ($KIND)"
        render "$KIND" | write_file "/etc/nginx/sites-available/$APP.conf" 0644
        run ln -sfn "/etc/nginx/sites-available/$APP.conf" "/etc/nginx/sites-enabled/$APP.conf"
        if [ -e /etc/nginx/sites-enabled/default ]; then
            note "disabling nginx's default site (it would take port 80)"
            run rm -f /etc/nginx/sites-enabled/default
        fi
        run nginx -t -q
        if systemd_runs; then
            run systemctl enable --now nginx
            run systemctl reload nginx
        elif [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
            run nginx -s reload
        else
            run nginx
        fi
        ;;
    apache)
        step "Apache site ($KIND)"
        {
            [ "$LISTEN" != 80 ] && echo "Listen $LISTEN"
            [ "$TLS" = true ] && [ "$TLS_LISTEN" != 443 ] && echo "Listen $TLS_LISTEN https"
            render "$KIND"
        } | write_file "/etc/apache2/sites-available/$APP.conf" 0644
        mods=(proxy proxy_http headers env alias)
        [ "$TLS" = true ] && mods+=(ssl)
        run a2enmod -q "${mods[@]}"
        run a2ensite -q "$APP"
        if [ -e /etc/apache2/sites-enabled/000-default.conf ]; then
            note "disabling Apache's default site"
            run a2dissite -q 000-default
        fi
        run apache2ctl configtest
        if systemd_runs; then
            run systemctl enable --now apache2
            run systemctl reload apache2
        else
            run apache2ctl graceful
        fi
        ;;
    *)
        step "web server"
        note "webServerType is empty: no web server configured; stcs listens on port $APP_PORT"
        ;;
esac

# -- 7. service ---------------------------------------------------------------------------------
step "service $APP"
stcs_cli render --config "$CONFIG" systemd --user "$SERVICE_USER" --stcs-bin "$VENV/bin/stcs" \
    --config-path "$ETC/config.yml" --working-dir "$WORKDIR" --source-dir "$ROOT" \
    | write_file "/etc/systemd/system/$APP.service" 0644
# The socket unit: systemd holds the listening socket, so a restart refuses no connection.
stcs_cli render --config "$CONFIG" systemd-socket | write_file "/etc/systemd/system/$APP.socket" 0644
if systemd_runs; then
    run systemctl daemon-reload
    run systemctl enable "$APP.socket" "$APP"
    run systemctl stop "$APP"  # a running stcs holds appPort itself: the socket takes it over
    run systemctl start "$APP.socket"
    run systemctl start "$APP"
else
    note "systemd is not running here (PID 1 is $(ps -p 1 -o comm= 2>/dev/null || echo unknown)):"
    note "the unit is installed for later; starting stcs with start-stop-daemon now"
    PIDFILE="/run/$APP.pid"
    run start-stop-daemon --stop --quiet --oknodo --retry TERM/30/KILL/5 --pidfile "$PIDFILE"
    run start-stop-daemon --start --background --make-pidfile --pidfile "$PIDFILE" \
        --chuid "$SERVICE_USER" --chdir "$WORKDIR" --output "$WORKDIR/$APP.out" \
        --exec "$VENV/bin/stcs" -- serve --config "$ETC/config.yml"
fi

# -- 8. check -----------------------------------------------------------------------------------
step "health check"
if [ "$DRY_RUN" = 1 ]; then
    note "would wait for /health"
else
    url="http://127.0.0.1:$APP_PORT/health"
    case "$WEB" in nginx|apache)
        addr="$LISTEN"; [ "$TLS" = true ] && addr="$TLS_LISTEN"
        [[ "$addr" == *:* ]] || addr="127.0.0.1:$addr"
        scheme=http; [ "$TLS" = true ] && scheme=https
        url="$scheme://$addr/health" ;;
    esac
    for _ in $(seq 100); do
        if "$VENV/bin/python" - "$url" <<'PY' 2>/dev/null; then
import ssl, sys, urllib.request
ctx = ssl._create_unverified_context()  # the check is about reachability, not the certificate
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2, context=ctx).status == 200 else 1)
PY
            note "$url answers 200"
            echo "setup.sh: done"
            exit 0
        fi
        sleep 0.2
    done
    echo "setup.sh: $url does not answer; see $WORKDIR/$APP.out or journalctl -u $APP" >&2
    exit 1
fi
echo "setup.sh: dry run done"
