"""What can be checked of the deploy files without Docker or systemd (the unit under a real
systemd: tests/test_systemd_unit.py; the Dockerfile built, its image run as a container and
compose.peers.yml run: tests/test_docker_image.py): compose.peers.yml parses
and is consistent (ports, URLs, seeds and invites, volumes, health checks); every `aihub …`
command that it, the peer entrypoint, the Dockerfile, the systemd unit and docs/deploy.md run
exists with the options they give; the example configs pass `aihub config check`; the mock
upstream speaks OpenAI's format; and the entrypoint's start-up steps, run as plain processes on
loopback, make two peers of which the second has joined the first."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
import msgspec
import openai
import pytest
import yaml
from click.testing import CliRunner

from node.cli.main import main
from node.config import CONFIG_FILE, ServerSection, UpstreamSection, load_config
from node.provision import create_node
from tests.mocks.server import free_port, serve_app

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "compose.peers.yml"
ENTRYPOINT = DEPLOY / "peer-entrypoint.sh"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "aihub.service"
DOCS = ROOT / "docs" / "deploy.md"
PEERS = ("alice", "bob", "carol")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def peer_env(service: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in service["environment"].items()}


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in _joined_lines(DOCKERFILE.read_text()):
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


# --- compose.peers.yml ----------------------------------------------------------------------


def test_compose_services_build_the_image_and_run_the_entrypoint():
    config = compose()
    found = config["services"]
    assert set(found) == {"mock-upstream", *PEERS}
    copied = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")]
    for name, service in found.items():
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]) == DOCKERFILE
        assert service["networks"] == ["aihub"] and "aihub" in config["networks"]
        assert service["healthcheck"]["test"][0] == "CMD", name
    for name in PEERS:
        script = found[name]["entrypoint"][-1]
        assert found[name]["entrypoint"] == ["sh", script]
        # The image carries the script where compose looks for it.
        folder, file = script.rsplit("/", 1)
        assert any(f"deploy/{file}" in line and line.endswith(folder + "/") for line in copied)
        assert found[name]["init"] is True  # reaps the entrypoint's background peering step
    mock_script = found["mock-upstream"]["command"][1]
    assert any(f"deploy/{Path(mock_script).name}" in line for line in copied)


def test_compose_ports_urls_and_health_checks_agree():
    found = services()
    host_ports = []
    for name in PEERS:
        service, env = found[name], peer_env(found[name])
        port = int(env["AIHUB_PORT"])
        (mapping,) = service["ports"]
        bind, host_port, container_port = mapping.split(":")
        assert bind == "127.0.0.1" and int(container_port) == port
        host_ports.append(int(host_port))
        assert env["AIHUB_NAME"] == name == service["hostname"]
        public = urlsplit(env["AIHUB_PUBLIC_URL"])
        assert (public.scheme, public.hostname, public.port) == ("http", name, port)
        health = urlsplit(re.search(r"http://[^']+", service["healthcheck"]["test"][-1])[0])
        assert (health.hostname, health.port, health.path) == ("127.0.0.1", port, "/health/ready")
    assert len(set(host_ports)) == len(PEERS)

    # The upstream URL names the mock's service and the port it listens and is checked on.
    mock = found["mock-upstream"]
    command = mock["command"]
    mock_port = int(command[command.index("--port") + 1])
    assert command[command.index("--host") + 1] == "0.0.0.0"
    mock_health = urlsplit(re.search(r"http://[^']+", mock["healthcheck"]["test"][-1])[0])
    assert mock_health.port == mock_port
    upstreams = [
        peer_env(found[n]) for n in PEERS if "AIHUB_UPSTREAM_URL" in found[n]["environment"]
    ]
    assert upstreams, "no peer serves a model from the mock upstream"
    for env in upstreams:
        url = urlsplit(env["AIHUB_UPSTREAM_URL"])
        assert (url.hostname, url.port, url.path) == ("mock-upstream", mock_port, "/v1")
        assert env["AIHUB_UPSTREAM_KEY"] == mock["environment"]["MOCK_API_KEY"]

    # Start-up order waits only for services that have a health check.
    for service in found.values():
        for needed, how in service.get("depends_on", {}).items():
            assert needed in found and how["condition"] == "service_healthy"
            assert "healthcheck" in found[needed]


def test_compose_seeds_and_invites_pair_up():
    found = services()
    joins = set()
    for name in PEERS:
        env = peer_env(found[name])
        for seed in env.get("AIHUB_SEEDS", "").split():
            url = urlsplit(seed.rpartition("@")[2])
            assert url.hostname in PEERS and url.hostname != name, seed
            issuer = peer_env(found[url.hostname])
            assert url.port == int(issuer["AIHUB_PORT"])
            # The seed leaves an invite for this peer, or the join would wait forever.
            assert name in issuer.get("AIHUB_INVITE", "").split(), (name, url.hostname)
            joins.add((name, url.hostname))
        for invited in env.get("AIHUB_INVITE", "").split():
            assert invited in PEERS
            seeds = peer_env(found[invited]).get("AIHUB_SEEDS", "").split()
            assert any(urlsplit(s.rpartition("@")[2]).hostname == name for s in seeds), invited
    assert joins == {("bob", "alice"), ("carol", "alice"), ("alice", "carol")}


def test_compose_volumes_are_declared_and_each_peer_has_its_own_data():
    config = compose()
    declared = set(config["volumes"])
    image_env = dockerfile_env()
    data_dir = image_env["AIHUB_HOME"]
    dockerfile = DOCKERFILE.read_text()
    assert f'VOLUME ["{data_dir}"]' in dockerfile
    used, data_volumes, shared = set(), [], set()
    for name in PEERS:
        service = config["services"][name]
        env = peer_env(service)
        mounts = dict(reversed(volume.split(":")[:2]) for volume in service["volumes"])
        used.update(mounts.values())
        assert env.get("AIHUB_HOME", data_dir) in mounts
        data_volumes.append(mounts[env.get("AIHUB_HOME", data_dir)])
        shared.add(mounts[env["AIHUB_SHARED"]])
        # The image makes the mount points, owned by its user, so new volumes inherit that.
        assert re.search(
            rf"install -d -o aihub -g aihub -m 0700 .*{env['AIHUB_SHARED']}", dockerfile
        )
    assert used <= declared and declared <= used
    assert len(set(data_volumes)) == len(PEERS)
    assert len(shared) == 1 and not shared & set(data_volumes)


# --- every aihub command the deploy files run exists ------------------------------------------

# Words before `aihub` that make it a user, group or container name, not the program.
_NOT_THE_PROGRAM = {"-u", "-g", "-o", "--user", "--group", "--gid", "--name", "logs"}


def _joined_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def _command_lines(text: str, comment: str = "#") -> list[str]:
    """Lines that run commands: not comments, except indented examples in comments."""
    lines = []
    for line in _joined_lines(text):
        stripped = line.strip()
        if stripped.startswith(comment):
            body = stripped[len(comment) :]
            if not body.startswith("  "):
                continue
            stripped = body.strip()
        lines.append(stripped)
    return lines


def _fenced_shell(text: str) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [line for block in blocks for line in _joined_lines(block)]


def aihub_commands(lines: list[str]) -> list[tuple[list[str], list[str], str]]:
    """(command path, options, line) of each `aihub …` invocation in `lines`."""
    found = []
    for line in lines:
        for match in re.finditer(r"(?:^|(?<=[\s/\"'`(]))aihub(?=[ \t]+(.*))", line):
            before = line[: match.start()].split()
            previous = before[-1] if before else ""
            if previous in _NOT_THE_PROGRAM or before[-2:] == ["docker", "exec"]:
                continue
            segment = re.split(r"&&|\|\||[;|`]|\s#|\s>", match.group(1))[0]
            words = re.sub(r"[\"'\[\],]", " ", segment).split()
            if not words or not re.fullmatch(r"[a-z][a-z0-9-]*", words[0]) or words[0] == "aihub":
                continue
            options = re.findall(r"(?<![\w-])--[a-z][a-z-]*", segment)
            found.append((words, options, line))
    return found


def _resolve(words: list[str]) -> tuple[list[str], click.Command]:
    command: click.Command = main
    path: list[str] = []
    for word in words:
        # get_command, not .commands: the top-level group imports a command when asked for it.
        found = (
            command.get_command(click.Context(command), word)
            if isinstance(command, click.Group)
            else None
        )
        if found is None:
            break
        command = found
        path.append(word)
    return path, command


def _check_commands(commands: list[tuple[list[str], list[str], str]]) -> set[str]:
    checked = set()
    for words, options, line in commands:
        path, command = _resolve(words)
        assert path and not isinstance(command, click.Group), f"no such command: {line}"
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, f"{line}: {result.output}"
        known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for option in options:
            assert option in known, f"`aihub {' '.join(path)}` has no {option}: {line}"
        checked.add(" ".join(path))
    return checked


def test_every_command_of_compose_and_the_entrypoint_exists():
    lines = _command_lines(COMPOSE.read_text())
    for service in services().values():
        for field in ("entrypoint", "command"):
            if field in service:
                lines.append(" ".join(map(str, service[field])))
    lines += _command_lines(ENTRYPOINT.read_text())
    checked = _check_commands(aihub_commands(lines))
    assert {"init", "config check", "invite create", "join", "serve"} <= checked
    assert {"ledger balance", "peers list"} <= checked  # from the compose file's examples


def test_every_command_of_the_dockerfile_unit_and_docs_exists():
    docker = _check_commands(aihub_commands(_command_lines(DOCKERFILE.read_text())))
    assert {"init", "serve"} <= docker
    unit = _check_commands(aihub_commands(_command_lines(UNIT.read_text())))
    assert {"init", "config check", "serve"} <= unit
    docs = _check_commands(aihub_commands(_fenced_shell(DOCS.read_text())))
    assert {"init", "keys create", "invite create", "join", "ledger reconcile"} <= docs


def test_dockerfile_runs_slim_as_a_user_with_a_health_check():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.M)
    assert len(stages) == 2 and stages[0][1] == "build"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert "COPY --from=build /opt/aihub /opt/aihub" in text
    env = dockerfile_env()
    assert env["AIHUB_HOME"] == "/data"
    assert re.search(r"^USER aihub", text, re.M)
    port = int(env["AIHUB_PORT"])
    assert re.search(rf"^EXPOSE {port}$", text, re.M)
    health = re.search(r"^HEALTHCHECK .*$", "\n".join(_joined_lines(text)), re.M)[0]
    assert "/health/ready" in health and f"'AIHUB_PORT', '{port}'" in health
    assert ServerSection().port == port  # the config's default port, which init writes
    # Exec-form instructions must be JSON arrays: anything else silently becomes a shell form.
    exec_forms = 0
    for line in _joined_lines(text):
        if re.match(r"^(?:CMD|ENTRYPOINT|HEALTHCHECK .*?CMD) +\[", line):
            form = re.match(r"^(?:CMD|ENTRYPOINT|HEALTHCHECK .*?CMD) +(\[.*\])$", line)
            assert form, line
            assert all(isinstance(word, str) for word in json.loads(form[1])), line
            exec_forms += 1
    assert exec_forms == 2  # the health check and the command


def test_systemd_unit_is_hardened_and_writes_only_its_data_folder():
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    service = {k.split(".", 1)[1]: v[-1] for k, v in settings.items() if k.startswith("Service.")}
    data_dir = service["Environment"].split("=", 1)[1]
    assert service["ReadWritePaths"] == data_dir == f"/var/lib/{service['StateDirectory']}"
    assert service["ExecStart"].endswith(f"aihub serve --data-dir {data_dir}")
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
        "User": "aihub",
        "UMask": "0077",
    }.items():
        assert service[key] == value, key
    assert settings["Install.WantedBy"] == ["multi-user.target"]


def test_reverse_proxies_stream_keep_the_host_and_wait_long_enough():
    port = ServerSection().port
    read_timeout = UpstreamSection().read_timeout
    max_body = ServerSection().max_body_bytes
    nginx = DEPLOY.joinpath("nginx.conf").read_text()
    assert f"server 127.0.0.1:{port};" in nginx
    assert "proxy_set_header Host $http_host;" in nginx
    for setting in ("proxy_buffering off;", "proxy_request_buffering off;", "gzip off;"):
        assert setting in nginx
    assert int(re.search(r"proxy_read_timeout (\d+)s;", nginx)[1]) > read_timeout
    assert int(re.search(r"client_max_body_size (\d+)m;", nginx)[1]) * 2**20 > max_body
    assert "listen 443 ssl http2;" in nginx and "ssl_certificate " in nginx
    # Slow clients cut at the proxy no later than at the node (docs/deploy.md's rule).
    server = ServerSection()
    assert int(re.search(r"client_header_timeout (\d+)s;", nginx)[1]) <= server.header_timeout
    assert int(re.search(r"client_body_timeout (\d+)s;", nginx)[1]) <= server.body_timeout
    caddy = DEPLOY.joinpath("Caddyfile").read_text()
    assert f"reverse_proxy 127.0.0.1:{port}" in caddy and "flush_interval -1" in caddy
    assert int(re.search(r"response_header_timeout (\d+)s", caddy)[1]) > read_timeout
    assert int(re.search(r"max_size (\d+)MB", caddy)[1]) * 10**6 > max_body
    assert not re.search(r"^\s*encode\b", caddy, re.M)  # compression would buffer streams
    assert int(re.search(r"read_header (\d+)s", caddy)[1]) <= server.header_timeout
    assert int(re.search(r"read_body (\d+)s", caddy)[1]) <= server.body_timeout


# --- example configs --------------------------------------------------------------------------

EXAMPLES = sorted(DEPLOY.joinpath("examples").glob("*.toml"))


def test_there_are_example_configs():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_config_passes_config_check_in_a_fresh_node(example: Path, tmp_path: Path):
    folder = tmp_path / "node"
    create_node(folder, "fresh")
    shutil.copyfile(example, folder / CONFIG_FILE)
    secrets = sorted(set(re.findall(r'^api_key_env = "(\w+)"', example.read_text(), re.M)))
    env = {name: "sk-test" for name in secrets}
    checked = CliRunner().invoke(main, ["config", "check", "--data-dir", str(folder)], env=env)
    assert checked.exit_code == 0, checked.output
    assert "ok (" in checked.output
    config = load_config(folder)
    assert config.models and all(d.api_key_env in env for d in config.models if d.api_key_env)
    if secrets:  # without its provider keys, the check names the missing variable
        unset = {name: None for name in secrets}
        missing = CliRunner().invoke(
            main, ["config", "check", "--data-dir", str(folder)], env=unset
        )
        assert missing.exit_code == 1 and secrets[0] in missing.output


# --- the mock upstream ------------------------------------------------------------------------


def mock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mock_upstream", DEPLOY / "mock_upstream.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mock_upstream_speaks_openai(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MOCK_API_KEY", "sk-mock")
    with serve_app(mock_module().app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-mock", max_retries=0)
        reply = client.chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "hello there"}]
        )
        assert reply.choices[0].message.content == "mock: hello there"
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        stream = client.chat.completions.create(
            model="mock-gpt",
            messages=[{"role": "user", "content": "hello there"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "mock: hello there" and chunks[-1].usage is not None
        vectors = client.embeddings.create(model="mock-embed", input=["a", "b"])
        assert len(vectors.data) == 2 and vectors.data[0].embedding != vectors.data[1].embedding
        assert [m.id for m in client.models.list()] == ["mock-gpt", "mock-embed"]
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.get(url + "/health").status_code == 200
        bad = httpx.post(url + "/v1/chat/completions", content=b"[1", headers=_bearer("sk-mock"))
        assert bad.status_code == 400 and "error" in bad.json()


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# --- the entrypoint's start-up steps as plain processes ---------------------------------------


class Started:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = (self.tmp_path / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the background peering step goes with it
        )
        log.close()

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        # Whatever is left in its group (the entrypoint's background step) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Started]:
    processes = Started(tmp_path)
    yield processes
    for name in list(processes.processes):
        processes.stop(name)


def wait_until(
    predicate: Callable[[], bool],
    seconds: float,
    what: str,
    logs: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {seconds} s\n{logs()}")


def models_at(url: str, key: str) -> dict[str, str]:
    try:
        response = httpx.get(url + "/v1/models", headers=_bearer(key), timeout=2)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    return {m["id"]: m["owned_by"] for m in response.json()["data"]}


def test_entrypoint_steps_make_two_peers_on_loopback(tmp_path: Path, started: Started):
    """compose.peers.yml's alice and bob, as plain processes: the same script, the same
    environment but for loopback addresses and ports."""
    found = services()
    mock_port, alice_port, bob_port = free_port(), free_port(), free_port()
    shared = tmp_path / "shared"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    started.start(
        "mock",
        [sys.executable, str(DEPLOY / "mock_upstream.py"), "--port", str(mock_port)],
        {"MOCK_API_KEY": str(found["mock-upstream"]["environment"]["MOCK_API_KEY"])},
    )

    def env_of(name: str, port: int, **overrides: str) -> dict[str, str]:
        env = peer_env(found[name])
        env.update(
            PATH=path,
            AIHUB_HOME=str(tmp_path / name),
            AIHUB_HOST="127.0.0.1",
            AIHUB_PORT=str(port),
            AIHUB_PUBLIC_URL=f"http://127.0.0.1:{port}",
            AIHUB_SHARED=str(shared),
            AIHUB_JOIN_TIMEOUT="60",
            **overrides,
        )
        return env

    alice_env = env_of(
        "alice",
        alice_port,
        AIHUB_INVITE="bob",
        AIHUB_SEEDS="",
        AIHUB_UPSTREAM_URL=f"http://127.0.0.1:{mock_port}/v1",
    )
    bob_env = env_of("bob", bob_port, AIHUB_SEEDS=f"http://127.0.0.1:{alice_port}")
    alice_url, bob_url = f"http://127.0.0.1:{alice_port}", f"http://127.0.0.1:{bob_port}"
    model = alice_env["AIHUB_UPSTREAM_MODEL"]
    started.start("alice", ["sh", str(ENTRYPOINT)], alice_env)
    started.start("bob", ["sh", str(ENTRYPOINT)], bob_env)

    # Each node was made with its admin key kept, and configured as the environment says.
    def made(name: str) -> bool:
        key = tmp_path / name / "admin.key"
        return key.exists() and key.read_text().endswith("\n")

    wait_until(
        lambda: made("alice") and made("bob"),
        30,
        "the nodes were not created",
        lambda: started.log("alice") + started.log("bob"),
    )
    alice_key = (tmp_path / "alice" / "admin.key").read_text().strip()
    bob_key = (tmp_path / "bob" / "admin.key").read_text().strip()
    assert alice_key.startswith("sk-hub-") and bob_key.startswith("sk-hub-")

    # Bob joins alice (his seed) with the invite she left for him; alice's model shows up.
    wait_until(
        lambda: models_at(bob_url, bob_key).get(model) == "alice",
        60,
        f"bob does not list alice's {model}",
        lambda: started.log("alice") + started.log("bob"),
    )
    assert (shared / "invites" / "alice-for-bob.token").read_text().startswith("aihub1.")
    config = load_config(tmp_path / "alice")
    assert config.public_urls() == [alice_url] and config.server.port == alice_port
    assert load_config(tmp_path / "bob").federation.seeds == [alice_url]
    reply = httpx.post(
        bob_url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi from bob"}]},
        headers=_bearer(bob_key),
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "mock: hi from bob"
    peers = msgspec.json.decode(
        CliRunner()
        .invoke(main, ["peers", "list", "--json", "--data-dir", str(tmp_path / "bob")])
        .output
    )
    assert [(p["name"], p["status"]) for p in peers] == [("alice", "active")]

    # Restarted, both reuse their nodes: no second model entry, no second join. Bob's
    # entrypoint marks the join once `aihub join` has returned, which can be after alice's
    # model shows up: stopping him before that would leave no mark to find.
    wait_until(
        lambda: "peering done" in started.log("bob"),
        60,
        "bob's entrypoint did not finish peering",
        lambda: started.log("bob"),
    )
    started.stop("alice")
    started.stop("bob")
    started.start("alice", ["sh", str(ENTRYPOINT)], alice_env)
    started.start("bob", ["sh", str(ENTRYPOINT)], bob_env)
    wait_until(
        lambda: "already joined alice" in started.log("bob"),
        60,
        "bob did not find his earlier join",
        lambda: started.log("bob"),
    )
    assert (tmp_path / "alice" / "admin.key").read_text().strip() == alice_key
    text = (tmp_path / "alice" / CONFIG_FILE).read_text()
    assert text.count(f'name = "{model}"') == 1
    wait_until(
        lambda: models_at(bob_url, bob_key).get(model) == "alice", 30, "bob lost alice's model"
    )
