"""nginx run in the foreground from a folder of its own (its pid, log and temporary files
there), for the unpinned mode's floor (bench/unpinned.py) and the test of deploy/nginx.conf
(tests/test_reverse_proxy.py): the `http` block's body is the caller's."""

from __future__ import annotations

import getpass
import os
import shutil
from pathlib import Path

MAIN = """\
# Generated for one run: nginx in the foreground, its files in {root}.
daemon off;
worker_processes auto;
{user}pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
{http}
}}
"""


def nginx_path() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def nginx_main(root: Path, http: str) -> Path:
    """`root`/nginx.conf, serving `http` (the http block's body, indented)."""
    root.mkdir(parents=True, exist_ok=True)
    # Run as root (a container), nginx's workers would drop to `nobody`, who cannot write
    # into a private work folder.
    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
    path = root / "nginx.conf"
    path.write_text(MAIN.format(user=user, root=root, http=http.rstrip("\n")))
    return path
