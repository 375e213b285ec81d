"""Coding agents against a real node: Codex CLI (`codex exec`, through the Responses API) and
Claude Code (`claude -p`, through the Messages API), each run non-interactively, offline (a
temporary HOME, loopback only, telemetry and updates off), asking the echo model.

The agents are the npm packages `make agents` installs, pinned, into `.cache/agents`; the
fixture runs it when they are missing and skips only when it cannot (no npm, or npm failed:
the reason says which).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from node.provision import create_node
from tests.conftest import NodeDir, RunningNode, run_node
from tests.test_budgets import make_key

ROOT = Path(__file__).resolve().parent.parent
AGENTS_BIN = ROOT / ".cache" / "agents" / "node_modules" / ".bin"
PROMPT = "Say hello to the hub"
TIMEOUT = 120  # seconds: an agent that hangs (a prompt, a retry loop) fails, not blocks


@dataclass
class Agents:
    codex: Path
    claude: Path


@pytest.fixture(scope="module")
def agents() -> Agents:
    found = Agents(AGENTS_BIN / "codex", AGENTS_BIN / "claude")
    if not (found.codex.exists() and found.claude.exists()):
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: `make agents` cannot install Codex and Claude Code")
        done = subprocess.run(
            ["make", "agents"], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            pytest.skip(f"`make agents` failed (npm cannot install the agents): {done.stderr}")
    return found


@dataclass
class Served:
    node: RunningNode
    key: str  # a key of its own, so that the usage the test reads is its agent's alone
    key_id: str


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    folder = tmp_path / "node"
    _, admin_key = create_node(folder, "agents-node")
    key, key_id = make_key(folder, name="agent")
    with run_node(NodeDir(folder, admin_key)) as node:
        yield Served(node, key, key_id)


def offline_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: a temporary HOME, no proxy, nothing of the caller's own keys."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ["PATH"], "HOME": str(home), "NO_PROXY": "127.0.0.1", **extra}


def run_agent(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,  # `codex exec` reads more of the prompt from a stdin pipe
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, f"{command[0]} exited {done.returncode}:\n{done.stderr}"
    return done


def codex_command(codex: Path, node_url: str) -> list[str]:
    """`codex exec` with a model provider that is the node (the README's config, as flags)."""
    config = {
        "model_provider": '"aihub"',
        "model": '"echo"',
        "model_providers.aihub.name": '"aihub"',
        "model_providers.aihub.base_url": f'"{node_url}/v1"',
        "model_providers.aihub.env_key": '"AIHUB_API_KEY"',
        "model_providers.aihub.wire_api": '"responses"',
        "check_for_update_on_startup": "false",
        "analytics.enabled": "false",
    }
    flags = [arg for name, value in config.items() for arg in ("-c", f"{name}={value}")]
    return [str(codex), "exec", "--skip-git-repo-check", "--sandbox", "read-only", *flags, PROMPT]


def usage_of(served: Served) -> dict:
    headers = {"authorization": f"Bearer {served.node.key}"}
    with httpx.Client(base_url=served.node.url, headers=headers, timeout=30) as client:
        report = client.get("/admin/usage", params={"by": "key", "since": "1h"}).json()
    (row,) = [row for row in report["data"] if row["group"] == served.key_id]
    return row


def test_codex_exec_answers_through_the_node(agents, served, tmp_path):
    home = tmp_path / "home"
    env = offline_env(home, CODEX_HOME=str(home / ".codex"), AIHUB_API_KEY=served.key)
    (home / ".codex").mkdir(parents=True)
    done = run_agent(codex_command(agents.codex, served.node.url), env, home)
    # `codex exec` prints the last message alone on stdout (its progress goes to stderr).
    assert done.stdout.strip() == f"echo: {PROMPT}"
    row = usage_of(served)
    assert row["requests"] >= 1 and row["errors"] == 0
    assert row["tokens_in"] > 0 and row["tokens_out"] > 0


def test_claude_code_answers_through_the_node(agents, served, tmp_path):
    home = tmp_path / "home"
    env = offline_env(
        home,
        ANTHROPIC_BASE_URL=served.node.url,
        ANTHROPIC_API_KEY=served.key,
        DISABLE_TELEMETRY="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_ERROR_REPORTING="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
    )
    done = run_agent([str(agents.claude), "-p", PROMPT, "--model", "echo"], env, home)
    # Echo answers the last user message: Claude Code's reminders, then the prompt.
    answer = done.stdout.strip()
    assert answer.startswith("echo: ") and answer.endswith(PROMPT)
    row = usage_of(served)
    assert row["requests"] >= 1 and row["errors"] == 0
    assert row["tokens_in"] > 0 and row["tokens_out"] > 0
