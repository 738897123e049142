"""Real nginx and Apache in front of stcs, for the tests: own prefix, pid file and logs under a
temporary directory, listening on 127.0.0.1 only, stopped by pid.

The site files are the ones ``stcs render`` produces; the main configuration around them is
the minimum each server needs to run unprivileged-ish from a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.harness import stcs_cli

MODULES = Path("/usr/lib/apache2/modules")
APACHE_MODULES = [
    "mpm_event",
    "authz_core",
    "proxy",
    "proxy_http",
    "headers",
    "alias",
    "ssl",
    "socache_shmcb",
    "env",
]


def have(kind: str) -> bool:
    return shutil.which("nginx" if kind == "nginx" else "apache2", path=_PATH) is not None


_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def render(kind: str, out: Path, *args: str) -> Path:
    """``stcs render KIND args -o out``; fails the test with stcs's message on error."""
    done = stcs_cli("render", kind, *args, "-o", str(out), timeout=60)
    assert done.returncode == 0, done.stderr
    return out


@dataclass
class FrontServer:
    kind: str
    proc: subprocess.Popen[bytes]
    root: Path
    port: int
    tls_port: int | None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if self.kind == "apache" else signal.SIGQUIT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def error_log(self) -> str:
        path = self.root / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def nginx_main(root: Path, site: Path) -> Path:
    temp = root / "temp"
    temp.mkdir(exist_ok=True)
    os.chmod(temp, 0o777)  # nginx workers run as nobody
    conf = root / "nginx.conf"
    conf.write_text(f"""
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {site};
}}
""")
    return conf


def apache_main(root: Path, site: Path, listens: list[str], extra: str = "") -> Path:
    """``extra``: main-configuration lines before the site (modules, server-wide limits)."""
    conf = root / "apache2.conf"
    modules = "\n".join(f"LoadModule {m}_module {MODULES}/mod_{m}.so" for m in APACHE_MODULES)
    listen = "\n".join(f"Listen {a}" for a in listens)
    conf.write_text(f"""
ServerRoot {root}
DefaultRuntimeDir {root}
PidFile {root}/apache.pid
ErrorLog {root}/error.log
LogLevel warn
Mutex file:{root} default
{modules}
User www-data
Group www-data
ServerName localhost
{listen}
{extra}
Include {site}
""")
    return conf


def config_test(kind: str, main: Path) -> subprocess.CompletedProcess[str]:
    if kind == "nginx":
        cmd = ["nginx", "-t", "-c", str(main), "-p", str(main.parent)]
    else:
        cmd = ["apache2ctl", "-f", str(main), "-t"]
    env = {**os.environ, "PATH": _PATH}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def start(
    kind: str, main: Path, port: int, tls_port: int | None, ca: Path | None = None
) -> FrontServer:
    """Run the server in the foreground (a child of the test) and wait until it answers."""
    env = {**os.environ, "PATH": _PATH}
    if kind == "nginx":
        cmd = ["nginx", "-c", str(main), "-p", str(main.parent)]
    else:
        cmd = ["apache2", "-f", str(main), "-DFOREGROUND"]
    log = (main.parent / "stdout.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    server = FrontServer(kind, proc, main.parent, port, tls_port)
    url = f"https://127.0.0.1:{tls_port}/health" if tls_port else f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise AssertionError(
                f"{kind} exited {proc.returncode}: {server.error_log()}"
                f"{(main.parent / 'stdout.log').read_text()}"
            )
        with contextlib.suppress(requests.RequestException):
            requests.get(url, timeout=1, verify=str(ca) if ca else True)
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"{kind} not answering: {server.error_log()}")
        time.sleep(0.05)
