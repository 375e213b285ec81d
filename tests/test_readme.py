"""The README cannot drift from the code: every `aihub` command in its shell blocks parses
with the real CLI (command, options and their values), every `make` target exists, every URL
it curls is a route of the app, and its Python blocks compile."""

from __future__ import annotations

import re
import shlex
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
