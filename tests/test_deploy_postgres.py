"""deploy/compose.postgres.yml and its replicas' entrypoint, checked without Docker: the
compose file's services and volumes agree, the image carries the script, and the script itself
run for real makes a node in PostgreSQL (setup) and serves it from a replica's own folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from tests.conftest import wait_ready
from tests.mocks.server import free_port
from tests.postgres import PASSWORD_ENV

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "replica-entrypoint.sh"


def test_compose_runs_postgres_two_replicas_and_a_proxy() -> None:
    config = yaml.safe_load((DEPLOY / "compose.postgres.yml").read_text())
    services = config["services"]
    assert set(services) == {"postgres", "setup", "replica-a", "replica-b", "proxy"}
    for name in ("setup", "replica-a", "replica-b"):
        service = services[name]
        assert service["entrypoint"] == ["sh", "/opt/aihub/share/replica-entrypoint.sh"]
        assert service["environment"]["AIHUB_DB_URL"].startswith("postgresql://aihub@postgres")
        assert ":" not in service["environment"]["AIHUB_DB_URL"].split("@")[0].split("//")[1]
    for name in ("replica-a", "replica-b"):
        mounts = services[name]["volumes"]
        assert "node:/node:ro" in mounts  # the identity, shared, read-only
        assert services[name]["depends_on"]["setup"]["condition"] == (
            "service_completed_successfully"
        )
    assert {m.split(":")[0] for m in services["replica-a"]["volumes"]} != {
        m.split(":")[0] for m in services["replica-b"]["volumes"]
    }  # each its own data folder (journal)
    caddy = (DEPLOY / "Caddyfile.replicas").read_text()
    assert "replica-a:8787 replica-b:8787" in caddy and "health_uri /health/ready" in caddy
    assert any(
        line.startswith("COPY ") and "deploy/replica-entrypoint.sh" in line
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
    )
    assert "!deploy/replica-entrypoint.sh" in (DEPLOY / "Dockerfile.dockerignore").read_text()


def test_the_entrypoint_sets_up_the_node_in_postgres_and_a_replica_serves_it(
    postgres_url: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "AIHUB_NODE": str(tmp_path / "node"),
        "AIHUB_HOME": str(tmp_path / "replica"),
        "AIHUB_NAME": "shared",
        "AIHUB_DB_URL": postgres_url,
        "AIHUB_DB_PASSWORD": os.environ[PASSWORD_ENV],
    }
    (tmp_path / "node").mkdir(mode=0o700)
    (tmp_path / "replica").mkdir(mode=0o700)
    for _ in range(2):  # the second run finds the node there and changes nothing
        done = subprocess.run(["sh", str(SCRIPT), "setup"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert "in PostgreSQL already" in done.stderr
    config = (tmp_path / "node" / "config.toml").read_text()
    assert f'url = "{postgres_url}"' in config and 'password_env = "AIHUB_DB_PASSWORD"' in config
    key = (tmp_path / "node" / "admin.key").read_text().strip()
    port = free_port()
    (tmp_path / "node" / "config.toml").write_text(
        config.replace("port = 8787", f"port = {port}", 1)
    )
    log = (tmp_path / "replica.log").open("wb")
    process = subprocess.Popen(["sh", str(SCRIPT), "serve"], env=env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process)  # type: ignore[arg-type]
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(
            url + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
    finally:
        process.terminate()
        process.wait(timeout=15)
    assert (tmp_path / "replica" / "identity.key").exists()
