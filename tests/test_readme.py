"""The README cannot drift from the code: every `aihub` command in its shell blocks parses
with the real CLI (command, options and their values), every `make` target exists, every URL
it curls is a route of the app, its Python blocks compile, and its stories (the quick start,
keys, a node on a server, the two-node join, a peer's model, the books) run as written against
real nodes (below: the substitutions that lets them run on one machine)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from node.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def shell_lines() -> list[list[str]]:
    lines = []
    for language, body in BLOCKS:
        if language != "sh":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if ">" in words:  # a redirection is the shell's, not the command's
                words = words[: words.index(">")]
            if words:
                lines.append(words)
    return lines


def parse(args: list[str]) -> click.Command:
    """Resolve and parse a command line the way click would run it, without running it:
    unknown commands, unknown options and bad option values raise click's errors."""
    ctx = main.make_context("aihub", list(args))
    command: click.Command = main
    while isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        name, command, rest = command.resolve_command(ctx, rest)  # type: ignore[assignment]
        assert command is not None, args
        ctx = command.make_context(name or "", rest, parent=ctx)
    return command


AIHUB = [words[1:] for words in shell_lines() if words[0] == "aihub"]


def test_the_readme_has_the_commands_of_the_four_stories() -> None:
    commands = {" ".join(args[:2]) for args in AIHUB}
    for expected in ("init --name", "invite create", "peers list", "ledger reconcile"):
        assert any(c.startswith(expected.split()[0]) for c in commands), expected
    assert len(AIHUB) >= 25


@pytest.mark.parametrize("args", AIHUB, ids=[" ".join(a)[:60] for a in AIHUB])
def test_every_aihub_command_in_the_readme_parses(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    if "--help" in args:  # click prints the help and exits 0, having parsed the line
        with pytest.raises(click.exceptions.Exit) as exit_:
            parse(args)
        assert exit_.value.exit_code == 0
        return
    for arg in args:  # files a command reads, as the reader would have them
        if arg.endswith(".jsonl"):
            (tmp_path / arg).write_text("")
    parse([*args, "--data-dir", str(tmp_path)] if "--data-dir" not in args else args)


def test_every_make_target_in_the_readme_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = {m.group(1) for m in re.finditer(r"^([a-z-]+):", makefile, re.M)}
    used = {words[1] for words in shell_lines() if words[0] == "make"}
    used |= set(re.findall(r"`make ([a-z-]+)`", README))
    assert used and used <= targets


def test_every_curled_url_is_a_route(tmp_path: Path) -> None:
    from node.app import create_app
    from node.provision import create_node

    create_node(tmp_path / "n", "n")
    paths = {route.path for route in create_app(tmp_path / "n").routes}
    curled = [w for words in shell_lines() if words[0] == "curl" for w in words if "://" in w]
    assert curled
    for url in curled:
        assert re.sub(r"^https?://[^/]+", "", url) in paths, url


def test_python_blocks_compile() -> None:
    blocks = [body for language, body in BLOCKS if language == "python"]
    assert blocks
    for body in blocks:
        compile(body, "README.md", "exec")


def test_a_wrong_command_would_be_caught() -> None:
    with pytest.raises(click.UsageError):
        parse(["keys", "create", "--name", "x", "--budgte", "3"])
    with pytest.raises(click.BadParameter):
        parse(["keys", "create", "--name", "x", "--budget", "-3"])


# --- the stories, run as written ---------------------------------------------------------
#
# The README's stories are run for real: its shell blocks by bash, its Python blocks by this
# interpreter, against two real `aihub serve` processes side by side, alice and bob, each in
# its own data folder (the `$AIHUB_HOME` of the shell its lines run in) on its own port, with
# `aihub` on the PATH. The only changes to the README's text are these substitutions:
#
# - `127.0.0.1:8787`, `bob.example:8787` and `--port 8787`: the node's own free loopback port,
#   and `--host 0.0.0.0`: 127.0.0.1 (nothing listens beyond this machine);
# - `sk-hub-…`: the admin key the node's `aihub init` printed; the invite token
#   `aihub1.eyJ2…`: the one `aihub invite create` printed the step before; `KEY_ID` and
#   `ci-bot-key-id-or-the-key-itself`: the id `aihub keys create` printed;
# - `.venv/bin/activate`: this virtualenv's;
# - lines that install or fetch (`git clone`, `make run`, `pip install`) are the test
#   environment's own: `make run` is what it runs, `aihub init --if-missing` and `aihub serve`;
# - "Add your providers": alice's config gets a `llama3` deployment of the echo provider (the
#   story's models would need provider keys); `carol-statements.jsonl`, which Carol would send,
#   is an empty file;
# - the join without an invite: bob's `seeds` name alice's URL (on a LAN mDNS would find her;
#   these tests announce nothing), `ed25519:QWxp…` is the node id `aihub peers discover` listed
#   and `http://192.168.1.20:8787` alice's URL; each line runs on the node its comment names.
#
# Section 1 is run for alice and, as "Bob's server" does, for bob (`--name bob`).

SECTIONS = dict(re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", README, re.S | re.M))
KEY_PATTERN = re.compile(r"sk-hub-[0-9a-f]{12}_[A-Za-z0-9_-]{43}")
TOKEN_PATTERN = re.compile(r"aihub1\.[A-Za-z0-9_.-]{40,}")
KEY_ID_PATTERN = re.compile(r"^\s*id\s+([0-9a-f]{12})\s*$", re.M)
NODE_ID_PATTERN = re.compile(r"ed25519:[A-Za-z0-9_-]{43}")
ECHO_LLAMA3 = '\n[[models]]\nname = "llama3"\nprovider = "echo"\nprice_in = 1_000_000\n'
STEP_TIMEOUT = 120


def squashed(text: str) -> str:
    return "".join(text.split())


def blocks_of(section: str, language: str) -> list[str]:
    heading = next(name for name in SECTIONS if name.startswith(section))
    return re.findall(rf"```{language}\n(.*?)```", SECTIONS[heading], re.S)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Story:
    """Alice's and Bob's shells, their nodes, and what earlier steps printed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.work = root / "work"
        self.work.mkdir()
        self.ports = {"alice": free_port(), "bob": free_port()}
        self.keys: dict[str, str] = {}
        self.found: dict[str, str] = {}
        self.servers: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.ports[node]}"

    def env(self, node: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIHUB_")}
        env["AIHUB_HOME"] = str(self.root / node)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["COLUMNS"] = "200"
        if node in self.keys:
            env["AIHUB_KEY"] = self.keys[node]
        return env

    def substituted(self, text: str, node: str) -> str:
        port = self.ports[node]
        text = text.replace("127.0.0.1:8787", f"127.0.0.1:{port}")
        text = text.replace("bob.example:8787", f"127.0.0.1:{self.ports['bob']}")
        text = text.replace("--port 8787", f"--port {port}").replace("0.0.0.0", "127.0.0.1")
        text = text.replace(".venv/bin/activate", str(Path(sys.executable).parent / "activate"))
        if node in self.keys:
            text = text.replace("sk-hub-…", self.keys[node])
        text = re.sub(r"aihub1\.eyJ2\S*…", self.found.get("token", "NO-TOKEN-YET"), text)
        for placeholder in ("ci-bot-key-id-or-the-key-itself", "KEY_ID"):
            text = text.replace(placeholder, self.found.get("key_id", "NO-KEY-YET"))
        text = text.replace("ed25519:QWxp…", self.found.get("node_id", "NO-NODE-ID-YET"))
        return text.replace("http://192.168.1.20:8787", self.url("alice"))

    def shell(self, node: str, text: str) -> str:
        """Run README lines in `node`'s shell; `aihub serve` starts in the background."""
        lines = [line for line in text.replace("\\\n", " ").splitlines() if line.strip()]
        output = ""
        for line in lines:
            words = shlex.split(line, comments=True)
            if not words or words[0] in ("git", "pip"):
                continue
            if words[:2] == ["make", "run"]:
                output += self.run(node, "aihub init --if-missing")
                if node not in self.servers:
                    self.serve(node, "aihub serve")
            elif words[:2] == ["aihub", "serve"]:
                self.serve(node, line)
            else:
                output += self.run(node, line)
        return output

    def run(self, node: str, line: str) -> str:
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", self.substituted(line, node)],
            cwd=self.work,
            env=self.env(node),
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, (node, line, result.stdout, result.stderr)
        output = result.stdout + result.stderr
        if (key := KEY_PATTERN.search(output)) and line.startswith("aihub init"):
            self.keys[node] = key.group(0)
        if token := TOKEN_PATTERN.search(output):
            self.found["token"] = token.group(0)
        if (key_id := KEY_ID_PATTERN.search(output)) and line.startswith("aihub keys create"):
            self.found.setdefault("key_id", key_id.group(1))
        if (node_id := NODE_ID_PATTERN.search(output)) and line.startswith("aihub peers discover"):
            self.found["node_id"] = node_id.group(0)
        return output

    def shell_as_commented(self, text: str) -> dict[str, str]:
        """Run each line on the node its comment names (`# on Bob's node`); what each printed."""
        printed = {}
        for line in text.replace("\\\n", " ").splitlines():
            if not line.strip():
                continue
            node = next((n for n in ("alice", "bob") if f"# on {n.title()}'s node" in line), None)
            assert node is not None, f"no node named for {line!r}"
            printed[shlex.split(line, comments=True)[2]] = self.run(node, line)
        return printed

    def serve(self, node: str, line: str) -> None:
        if node == "alice":  # "Add your providers to config.toml"
            with (self.root / node / "config.toml").open("a") as config:
                config.write(ECHO_LLAMA3)
        log = (self.root / f"{node}.log").open("wb")
        self.servers[node] = subprocess.Popen(
            ["bash", "-c", "exec " + self.substituted(line, node)],
            cwd=self.work,
            env=self.env(node),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.wait(lambda: self._ready(node), f"{node} ready", lambda: self.log(node), process=node)

    def _ready(self, node: str) -> bool:
        import httpx

        try:
            return httpx.get(self.url(node) + "/health/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def log(self, node: str) -> str:
        return (self.root / f"{node}.log").read_text(errors="replace")[-3000:]

    def wait(self, condition, what: str, detail, process: str | None = None) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + STEP_TIMEOUT
        while not condition():
            server = self.servers.get(process or "")
            assert server is None or server.poll() is None, f"{what}: exited\n{detail()}"
            assert time.monotonic() < deadline, f"not {what} after {STEP_TIMEOUT} s\n{detail()}"
            time.sleep(0.1)

    def python(self, node: str, text: str) -> str:
        result = subprocess.run(
            [sys.executable, "-"],
            input=self.substituted(text, node),
            cwd=self.work,
            env=self.env(node),
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
        )
        assert result.returncode == 0, (node, text, result.stdout, result.stderr)
        return result.stdout

    def lists(self, node: str, model: str) -> bool:
        import httpx

        headers = {"authorization": f"Bearer {self.keys[node]}"}
        answer = httpx.get(self.url(node) + "/v1/models", headers=headers, timeout=5)
        return answer.status_code == 200 and model in {m["id"] for m in answer.json()["data"]}

    def stop(self) -> None:
        for process in self.servers.values():
            process.terminate()
        for process in self.servers.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def story(tmp_path: Path):  # type: ignore[no-untyped-def]
    told = Story(tmp_path)
    try:
        yield told
    finally:
        told.stop()


def test_the_quick_start_and_the_keys_story_run_as_written(story: Story) -> None:
    # 1. Run a node on your own server: alice.
    (run_a_node,) = blocks_of("1. Run a node", "sh")
    story.shell("alice", run_a_node)
    assert "alice" in story.keys

    # Quick start, on alice's node: curl, then the Python example in the same terminal.
    make_run, curl, activate = blocks_of("Quick start", "sh")
    story.shell("alice", make_run)  # `make run` again: uses the node that is there
    assert squashed('"content": "echo: Hello, hub"') in squashed(story.shell("alice", curl))
    (hello,) = blocks_of("Quick start", "python")
    assert story.python("alice", hello).strip() == "echo: Hello, hub"
    assert "Usage: aihub" in story.shell("alice", activate)

    # Keys, tenants, budgets and rate limits, on alice's node.
    (keys,) = blocks_of("Keys, tenants", "sh")
    output = story.shell("alice", keys)
    assert "ci-bot" in output and "acme" in output
    audit = story.run("alice", "aihub audit --json")
    for action in ("key.create", "key.update", "key.rotate", "key.revoke", "tenant.create"):
        assert f'"action": "{action}"' in audit, action


def test_the_two_node_stories_run_as_written(story: Story) -> None:
    """Alice invites bob; bob's client streams alice's model through bob's node; bob's books.

    Depends on the federation half of issue 17 (peers17): an invite must carry the address
    the node serves on (`aihub serve --port`), not config.toml's port 8787; until then
    `aihub join` fails with `http://127.0.0.1:8787: ConnectError`."""
    (run_a_node,) = blocks_of("1. Run a node", "sh")
    story.shell("alice", run_a_node)
    story.shell("bob", run_a_node.replace("--name alice", "--name bob"))  # "Bob's server"

    # 2. Join peers with an invite.
    invite, join, _without_an_invite = blocks_of("2. Join peers", "sh")
    story.shell("alice", invite)
    assert "token" in story.found
    joined = story.shell("bob", join)
    assert "alice" in joined

    # 3. Use a peer's models through your own endpoint: bob's client streams alice's llama3.
    story.wait(lambda: story.lists("bob", "llama3"), "llama3 listed at bob", lambda: joined)
    (stream,) = blocks_of("3. Use a peer", "python")
    assert story.python("bob", stream) == "echo: Hi"

    # 4. Reconcile shared costs, on bob's node: what bob used of alice, settled by both.
    (books,) = blocks_of("4. Reconcile", "sh")
    (story.work / "carol-statements.jsonl").write_text("")
    output = story.shell("bob", books)
    assert "Settled:" in output
    assert (story.work / "bob-statements.jsonl").read_text().strip()


def test_the_join_without_an_invite_runs_as_written(story: Story) -> None:
    """Bob finds alice, asks her node to make his a peer; alice sees the request and approves
    it; bob's running node completes the join by itself and lists her model."""
    (run_a_node,) = blocks_of("1. Run a node", "sh")
    story.shell("alice", run_a_node)
    story.shell("bob", run_a_node.replace("--name alice", "--name bob"))
    config = story.root / "bob" / "config.toml"
    text = config.read_text()
    assert "seeds = []" in text
    config.write_text(text.replace("seeds = []", f'seeds = ["{story.url("alice")}"]', 1))

    _invite, _join, without_an_invite = blocks_of("2. Join peers", "sh")
    printed = story.shell_as_commented(without_an_invite)
    assert "alice" in printed["discover"] and "node_id" in story.found
    assert "Asked alice to make us a peer" in " ".join(printed["request"].split())
    assert "bob" in printed["pending"]
    assert "Approved bob" in printed["approve"]

    story.wait(
        lambda: story.lists("bob", "llama3"), "llama3 listed at bob", lambda: story.log("bob")
    )
    (peer,) = json.loads(story.run("alice", "aihub peers list --format json"))
    assert (peer["name"], peer["status"]) == ("bob", "active")
    assert peer["spent"] == "$0 of $5 monthly"  # the cap `peers approve --cap 5` set
