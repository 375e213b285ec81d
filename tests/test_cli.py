"""The `aihub` command line, run for real: in-process through click's CliRunner, and as a
subprocess of the installed `aihub` script where the exit code itself matters."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import stat
import subprocess
import sys
import typing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import node.config
from federation.identity import NodeIdentity
from node import __version__
from node.cli.main import main
from node.config import (
    CONFIG_FILE,
    CONFIG_TEMPLATE,
    DATABASE_FILE,
    IDENTITY_FILE,
    ConfigError,
    load_config,
    parse_config,
)
from node.config_errors import find_line
from node.gateway.keys import HASH_PURPOSE, hashes_match, key_id_of
from node.provision import create_node, node_exists
from node.storage import open_store

AIHUB = Path(sys.executable).parent / "aihub"
NODE_FILES = (CONFIG_FILE, DATABASE_FILE, IDENTITY_FILE)
KEY_RE = re.compile(r"sk-hub-[0-9a-f]{12}_[A-Za-z0-9_-]{43}")
UNSET_VAR = "AIHUB_TEST_SURELY_UNSET_KEY"


def squash(text: str) -> str:
    """Rich wraps long lines at the console's width: compare text without any whitespace."""
    return "".join(text.split())


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    # AIHUB_HOME from the developer's shell must never leak into a test.
    environment: dict[str, str | None] = {"AIHUB_HOME": None, UNSET_VAR: None}
    environment.update(env or {})
    return CliRunner().invoke(main, list(args), env=environment, catch_exceptions=True)


def run_aihub(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AIHUB_HOME", UNSET_VAR)}
    env["COLUMNS"] = "400"
    return subprocess.run(
        [str(AIHUB), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_clean_failure(result: Result, *fragments: str) -> None:
    """Failed with exit status 1 through `fail()`, not a traceback, naming each fragment."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert "error:" in result.output
    for fragment in fragments:
        assert squash(fragment) in squash(result.output), (fragment, result.output)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def admin_key_is_stored(folder: Path, key: str) -> bool:
    identity = NodeIdentity.load(folder / IDENTITY_FILE)
    secret = identity.derive_secret(HASH_PURPOSE)

    async def read():
        store = await open_store(folder / DATABASE_FILE)
        try:
            return await store.keys.active_keys()
        finally:
            await store.close()

    records = {record.id: record for record in asyncio.run(read())}
    record = records.get(key_id_of(key) or "")
    return bool(record and record.is_admin and hashes_match(record.hash, secret, key))


@pytest.fixture
def node_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "node"
    create_node(folder, "carol")
    return folder


def edit_config(folder: Path, old: str, new: str) -> None:
    path = folder / CONFIG_FILE
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def append_config(folder: Path, toml: str) -> None:
    with (folder / CONFIG_FILE).open("a") as file:
        file.write("\n" + toml + "\n")


# --- version and help ---------------------------------------------------------------------


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"aihub, version {__version__}"


def test_version_and_help_as_a_real_process():
    version = run_aihub("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"aihub, version {__version__}"
    helped = run_aihub("--help")
    assert helped.returncode == 0
    for command in ("init", "serve", "models", "config"):
        assert command in helped.stdout


# --- init ---------------------------------------------------------------------------------


def test_init_creates_a_private_node_and_shows_a_working_admin_key(tmp_path):
    folder = tmp_path / "data" / "bob-node"
    result = invoke("init", "--name", "bob", "--data-dir", str(folder))
    assert result.exit_code == 0, result.output

    for name in NODE_FILES:
        assert (folder / name).is_file(), name
    for path in folder.iterdir():
        assert mode(path) == 0o600, (path.name, oct(mode(path)))
    assert mode(folder) == 0o700

    keys = KEY_RE.findall(result.output)
    assert keys, result.output
    key = keys[0]
    assert set(keys) == {key}
    assert admin_key_is_stored(folder, key)
    # Examples that work when pasted: curl and the openai package, both with the key.
    assert "curl http://127.0.0.1:8787/v1/chat/completions" in result.output
    assert f'-H "Authorization: Bearer {key}"' in result.output
    assert '"model": "echo"' in result.output
    assert "from openai import OpenAI" in result.output
    assert f'OpenAI(base_url="http://127.0.0.1:8787/v1", api_key="{key}")' in result.output

    identity = NodeIdentity.load(folder / IDENTITY_FILE)
    assert identity.node_id in result.output
    config = load_config(folder)
    assert config.node.name == "bob"
    assert [d.name for d in config.models] == ["echo", "echo-embed"]


def test_init_with_a_port_writes_it_and_its_examples_say_it(tmp_path):
    """`make run PORT=9000` on a new node: the examples `init` prints are pasted as they
    are, so they must name the port the node will serve on."""
    folder = tmp_path / "ported"
    result = invoke("init", "--port", "9123", "--data-dir", str(folder))
    assert result.exit_code == 0, result.output
    assert load_config(folder).server.port == 9123
    assert "curl http://127.0.0.1:9123/v1/chat/completions" in result.output
    assert "8787" not in result.output
    refused = invoke("init", "--port", "70000", "--data-dir", str(tmp_path / "nope"))
    assert refused.exit_code == 2 and not (tmp_path / "nope").exists()


def host_name() -> str:
    return socket.gethostname().split(".")[0][:64]


def test_init_names_the_node_after_the_host_by_default(tmp_path):
    result = invoke("init", "--data-dir", str(tmp_path / "dave"))
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "dave").node.name == (host_name() or "dave")


@pytest.mark.parametrize(
    "name", ['bob "the" hub', "back\\slash", "ünïcødé ✓", "tab\there", "a" * 64]
)
def test_init_keeps_any_valid_name_exactly(tmp_path, name):
    result = invoke("init", "--name", name, "--data-dir", str(tmp_path / "n"))
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "n").node.name == name


def test_second_init_refuses_and_changes_nothing(node_folder):
    before = snapshot(node_folder)
    result = invoke("init", "--name", "mallory", "--data-dir", str(node_folder))
    assert_clean_failure(result, "already exists", str(node_folder), "refusing to overwrite")
    assert not KEY_RE.search(result.output)
    assert snapshot(node_folder) == before


def test_second_init_fails_for_real_with_exit_status_1(tmp_path):
    folder = tmp_path / "node"
    first = run_aihub("init", "--data-dir", str(folder))
    assert first.returncode == 0, first.stderr
    before = snapshot(folder)
    second = run_aihub("init", "--data-dir", str(folder))
    assert second.returncode == 1
    assert "already exists" in second.stderr
    assert "Traceback" not in second.stderr
    assert snapshot(folder) == before


def test_init_refuses_a_half_made_node_too(tmp_path):
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / IDENTITY_FILE).write_bytes(b"\x01" * 32)
    result = invoke("init", "--data-dir", str(folder))
    assert_clean_failure(result, "already exists")
    assert sorted(p.name for p in folder.iterdir()) == [IDENTITY_FILE]


def test_init_if_missing_leaves_an_existing_node_alone(node_folder):
    before = snapshot(node_folder)
    result = invoke("init", "--if-missing", "--name", "other", "--data-dir", str(node_folder))
    assert result.exit_code == 0, result.output
    assert not KEY_RE.search(result.output)
    assert snapshot(node_folder) == before


def test_init_if_missing_creates_a_missing_node(tmp_path):
    folder = tmp_path / "fresh"
    result = invoke("init", "--if-missing", "--data-dir", str(folder))
    assert result.exit_code == 0, result.output
    assert node_exists(folder)
    assert admin_key_is_stored(folder, KEY_RE.findall(result.output)[0])


def test_init_honours_aihub_home(tmp_path):
    folder = tmp_path / "from-env"
    result = invoke("init", "--name", "envy", env={"AIHUB_HOME": str(folder)})
    assert result.exit_code == 0, result.output
    assert load_config(folder).node.name == "envy"
    listed = invoke("models", env={"AIHUB_HOME": str(folder)})
    assert listed.exit_code == 0, listed.output
    assert "Models of envy" in listed.output


def test_data_dir_option_wins_over_aihub_home(tmp_path):
    result = invoke(
        "init",
        "--data-dir",
        str(tmp_path / "option"),
        env={"AIHUB_HOME": str(tmp_path / "env")},
    )
    assert result.exit_code == 0, result.output
    assert node_exists(tmp_path / "option")
    assert not (tmp_path / "env").exists()


def test_default_data_dir_is_dot_aihub_in_home(tmp_path):
    result = invoke("init", env={"HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert node_exists(tmp_path / ".aihub")
    assert load_config(tmp_path / ".aihub").node.name == (host_name() or "aihub")


def test_init_with_an_invalid_name_creates_nothing(tmp_path):
    """A name the config cannot hold (over 64 characters) must be refused up front: today the
    node is created, then its own config fails to load, so init exits 1 with a half-usable
    node on disk and its admin key never shown."""
    folder = tmp_path / "node"
    result = invoke("init", "--name", "a" * 65, "--data-dir", str(folder))
    assert_clean_failure(result, "node.name")
    assert not node_exists(folder)


@pytest.mark.parametrize("name", ["[/x]", "[bold]loud"])
def test_init_prints_the_name_literally(tmp_path, name):
    """Names go through rich, whose markup must not apply to them: `[/x]` crashed init with
    rich.errors.MarkupError after the node was created (so its admin key was lost), and
    `[bold]loud` printed as `loud`."""
    folder = tmp_path / "node"
    result = invoke("init", "--name", name, "--data-dir", str(folder))
    assert result.exit_code == 0, repr(result.exception)
    assert squash(f"Created node {name} at") in squash(result.output)
    key = KEY_RE.findall(result.output)[0]
    assert admin_key_is_stored(folder, key)


# --- config check -------------------------------------------------------------------------


def test_config_check_passes_on_a_fresh_node(node_folder):
    result = invoke("config", "check", "--data-dir", str(node_folder))
    assert result.exit_code == 0, result.output
    assert squash(f"{node_folder / CONFIG_FILE}: ok (2 deployments, 2 models)") in squash(
        result.output
    )


def _template_line(text: str) -> int:
    return CONFIG_TEMPLATE.splitlines().index(text) + 1


BROKEN_EDITS = {
    "wrong type": (
        ("port = 8787", 'port = "x"'),
        ["server.port:", "Expected `int`, got `str`"],
    ),
    "out of range": (("port = 8787", "port = 0"), ["server.port:", ">= 1"]),
    "unknown key in a section": (
        ("retries = 2 ", "retry = 5\nretries = 2 "),
        ["router:", "unknown field `retry`"],
    ),
    "unknown section": (("[upstream]", "[upstreams]\n[upstream]"), ["`upstreams`"]),
    "dangling fallback": (
        ('# "gpt-4o" = ["claude-sonnet", "llama3"]', '"echo" = ["ghost"]'),
        ["router.fallbacks.echo:", "'ghost' is not a configured model"],
    ),
    "fallback from an unknown model": (
        ('# "gpt-4o" = ["claude-sonnet", "llama3"]', '"phantom" = ["echo"]'),
        ["router.fallbacks:", "'phantom' is not a configured model"],
    ),
    "bad currency": (('currency = "USD"', 'currency = "usd"'), ["node.currency:"]),
    "invalid TOML": (
        ("port = 8787", "port = = 8787"),
        ["not valid TOML", f"line {_template_line('port = 8787')}"],
    ),
}

BROKEN_APPENDS = {
    "unknown provider": (
        '[[models]]\nname = "m"\nprovider = "nope"',
        ["models[2].provider:", "'nope'"],
    ),
    "negative price": (
        '[[models]]\nname = "m"\nprovider = "echo"\nprice_in = -1',
        ["models[2].price_in:", ">= 0"],
    ),
    "azure without base_url": (
        '[[models]]\nname = "az"\nprovider = "azure"\nmodel = "my-deployment"',
        ["models[2] (az):", "azure needs base_url"],
    ),
    "base_url without a scheme": (
        '[[models]]\nname = "o"\nprovider = "openai"\nbase_url = "api.example.com"',
        ["models[2] (o):", "base_url must start with http:// or https://"],
    ),
    "anthropic embeddings": (
        '[[models]]\nname = "c"\nprovider = "anthropic"\nkind = "embeddings"',
        ["models[2] (c):", "anthropic serves no embeddings"],
    ),
    "missing api_key_env variable": (
        f'[[models]]\nname = "o"\nprovider = "openai"\napi_key_env = "{UNSET_VAR}"',
        [f"models[2] (o): environment variable {UNSET_VAR} is not set"],
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_EDITS))
def test_config_check_names_the_place_of_an_edit_that_breaks_it(node_folder, case):
    (old, new), fragments = BROKEN_EDITS[case]
    edit_config(node_folder, old, new)
    result = invoke("config", "check", "--data-dir", str(node_folder))
    assert_clean_failure(result, str(node_folder / CONFIG_FILE), *fragments)


@pytest.mark.parametrize("case", list(BROKEN_APPENDS))
def test_config_check_names_the_deployment_that_breaks_it(node_folder, case):
    toml, fragments = BROKEN_APPENDS[case]
    append_config(node_folder, toml)
    result = invoke("config", "check", "--data-dir", str(node_folder))
    assert_clean_failure(result, *fragments)


def test_config_check_passes_once_the_secret_is_set(node_folder):
    append_config(
        node_folder, f'[[models]]\nname = "o"\nprovider = "openai"\napi_key_env = "{UNSET_VAR}"'
    )
    result = invoke("config", "check", "--data-dir", str(node_folder), env={UNSET_VAR: "sk-x"})
    assert result.exit_code == 0, result.output
    assert "ok (3 deployments, 3 models)" in result.output


def test_config_check_reports_several_problems_at_once(node_folder):
    edit_config(node_folder, '# "gpt-4o" = ["claude-sonnet", "llama3"]', '"echo" = ["ghost"]')
    append_config(node_folder, '[[models]]\nname = "az"\nprovider = "azure"')
    result = invoke("config", "check", "--data-dir", str(node_folder))
    assert_clean_failure(result, "router.fallbacks.echo:", "models[2] (az):")


def test_config_check_fails_for_real_with_exit_status_1(node_folder):
    edit_config(node_folder, "port = 8787", 'port = "x"')
    completed = run_aihub("config", "check", "--data-dir", str(node_folder))
    assert completed.returncode == 1
    assert "server.port: Expected `int`, got `str`" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_config_check_reports_a_config_that_is_not_utf8(node_folder):
    """A stray Latin-1 byte made `load_config` raise UnicodeDecodeError, not ConfigError, so
    the CLI died with a traceback instead of saying what is wrong."""
    path = node_folder / CONFIG_FILE
    path.write_bytes(path.read_bytes().replace(b'name = "carol"', b'name = "caf\xe9"'))
    result = invoke("config", "check", "--data-dir", str(node_folder))
    assert_clean_failure(result, str(path))
    assert "utf-8" in result.output.lower()


def test_config_errors_print_user_text_literally(node_folder):
    """Messages quote the config's own text, which rich must not read as markup: an unknown
    key `"[/oops]"` crashed `config check` with rich.errors.MarkupError."""
    edit_config(node_folder, "port = 8787", 'port = 8787\n"[/oops]" = 3')
    result = invoke("config", "check", "--data-dir", str(node_folder))
    assert_clean_failure(result, "server:", "unknown field `[/oops]`")


# --- models -------------------------------------------------------------------------------


def table_rows(output: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in output.splitlines()
        if line.strip().startswith("│")
    ]


def test_models_lists_every_deployment(node_folder):
    append_config(
        node_folder,
        '[[models]]\nname = "gpt-x"\nprovider = "openai"\nmodel = "up-x"\n'
        "price_in = 2_500_000\nprice_out = 10_000_000\n\n"
        '[[models]]\nname = "gpt-x"\nprovider = "ollama"\n'
        'base_url = "http://127.0.0.1:11434"',
    )
    result = invoke("models", "--data-dir", str(node_folder))
    assert result.exit_code == 0, result.output
    assert "Models of carol" in result.output
    assert table_rows(result.output) == [
        ["echo", "chat", "echo", "echo", "0.1", "0.2"],
        ["echo-embed", "embeddings", "echo", "echo-embed", "0.02", "0"],
        ["gpt-x", "chat", "openai", "up-x", "2.5", "10"],
        ["gpt-x", "chat", "ollama", "gpt-x", "0", "0"],
    ]


def test_models_prints_names_literally(node_folder):
    """A deployment named `[bold]y` (a valid name) must be listed as such, not as `y`."""
    append_config(node_folder, '[[models]]\nname = "[bold]y"\nprovider = "echo"')
    result = invoke("models", "--data-dir", str(node_folder))
    assert result.exit_code == 0, repr(result.exception)
    assert ["[bold]y", "chat", "echo", "[bold]y", "0", "0"] in table_rows(result.output)


def test_models_on_a_broken_config_says_where(node_folder):
    append_config(node_folder, '[[models]]\nname = "m"\nprovider = "nope"')
    result = invoke("models", "--data-dir", str(node_folder))
    assert_clean_failure(result, "models[2].provider:")


# --- no node here -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["models"], ["config", "check"]])
def test_commands_without_a_node_say_to_run_init(tmp_path, command):
    folder = tmp_path / "empty"
    result = invoke(*command, "--data-dir", str(folder))
    assert_clean_failure(result, f"no node at {folder}", "run `aihub init`")
    assert not folder.exists()


def test_commands_without_a_node_via_aihub_home(tmp_path):
    result = invoke("models", env={"AIHUB_HOME": str(tmp_path / "nothing")})
    assert_clean_failure(result, f"no node at {tmp_path / 'nothing'}", "aihub init")


def test_serve_without_a_node_exits_without_starting(tmp_path):
    folder = tmp_path / "empty"
    completed = run_aihub("serve", "--data-dir", str(folder), "--port", "1", timeout=20)
    assert completed.returncode == 1
    assert f"no node at {folder}" in completed.stderr
    assert "run `aihub init`" in completed.stderr
    assert "serving" not in completed.stdout
    assert not folder.exists()


def test_serve_without_an_identity_exits_without_starting(node_folder):
    (node_folder / IDENTITY_FILE).unlink()
    completed = run_aihub("serve", "--data-dir", str(node_folder), "--port", "1", timeout=20)
    assert completed.returncode == 1
    assert squash(f"no identity at {node_folder / IDENTITY_FILE}") in squash(completed.stderr)
    assert "run `aihub init`" in completed.stderr
    assert "serving" not in completed.stdout


def test_serve_with_a_broken_config_exits_without_starting(node_folder):
    edit_config(node_folder, "port = 8787", 'port = "x"')
    completed = run_aihub("serve", "--data-dir", str(node_folder), "--port", "1", timeout=20)
    assert completed.returncode == 1
    assert "server.port: Expected `int`, got `str`" in completed.stderr
    assert "serving" not in completed.stdout


def test_serve_refuses_a_missing_provider_key_as_config_check_does(node_folder):
    """A deployment whose key is not in the environment was only warned about, then called
    without a key; `serve` now refuses to start with the same errors as `config check`."""
    append_config(
        node_folder, f'[[models]]\nname = "o"\nprovider = "openai"\napi_key_env = "{UNSET_VAR}"'
    )
    served = run_aihub("serve", "--data-dir", str(node_folder), "--port", "1", timeout=20)
    checked = run_aihub("config", "check", "--data-dir", str(node_folder))
    assert served.returncode == checked.returncode == 1
    missing = f"models[2] (o): environment variable {UNSET_VAR} is not set"
    assert missing in served.stderr and missing in checked.stderr
    assert served.stderr == checked.stderr
    assert "serving" not in served.stdout


# --- config errors a person can act on ----------------------------------------------------


def _line_of(folder: Path, text: str) -> int:
    lines = (folder / CONFIG_FILE).read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.startswith(text))


READABLE_ERRORS = {
    "an unknown provider lists the valid ones": (
        '[[models]]\nname = "m"\nprovider = "nope"',
        'provider = "nope"',
        # Every provider, in the order node/config.py declares them (more come with adapters).
        "models[2].provider: 'nope' is not one of "
        + ", ".join(typing.get_args(node.config.Provider)),
    ),
    "an unknown strategy lists the valid ones": (
        '[router]\nstrategy = "fastest"',
        None,
        "'fastest' is not one of priority, lowest-cost, lowest-latency, least-busy, weighted",
    ),
    "an unknown kind lists the valid ones": (
        '[[models]]\nname = "m"\nprovider = "echo"\nkind = "audio"',
        'kind = "audio"',
        "models[2].kind: 'audio' is not one of chat, embeddings, completions, images",
    ),
    "a model name's rule in words": (
        '[[models]]\nname = "my model"\nprovider = "echo"',
        'name = "my model"',
        "models[2].name: Expected `str`: a model name is 1 to 256 characters with no spaces "
        "and no `@`",
    ),
    "an environment variable's rule in words": (
        '[[models]]\nname = "m"\nprovider = "openai"\napi_key_env = "1-KEY"',
        'api_key_env = "1-KEY"',
        "letters, digits and `_`, not starting with a digit",
    ),
}


@pytest.mark.parametrize("case", list(READABLE_ERRORS))
def test_config_errors_say_what_is_allowed_and_on_which_line(node_folder, case):
    toml, line_text, expected = READABLE_ERRORS[case]
    if toml.startswith("[router]"):
        edit_config(node_folder, 'strategy = "priority"', 'strategy = "fastest"')
        line_text = 'strategy = "fastest"'
    else:
        append_config(node_folder, toml)
    result = invoke("config", "check", "--data-dir", str(node_folder))
    line = _line_of(node_folder, line_text)
    assert_clean_failure(result, f"line {line}:", expected)


def test_an_unknown_key_is_named_with_its_line(node_folder):
    edit_config(node_folder, "retries = 2 ", "retry = 5\nretries = 2 ")
    result = invoke("config", "check", "--data-dir", str(node_folder))
    line = _line_of(node_folder, "retry = 5")
    assert_clean_failure(result, f"line {line}: router: Object contains unknown field `retry`")


def test_an_unknown_section_is_named_with_its_header_line(node_folder):
    edit_config(node_folder, "[upstream]", "[upstreams]\n[upstream]")
    result = invoke("config", "check", "--data-dir", str(node_folder))
    line = _line_of(node_folder, "[upstreams]")
    assert_clean_failure(result, f"line {line}: (top level): Object contains unknown field")


def test_an_unknown_key_in_the_third_deployment_is_found_in_that_one(node_folder):
    append_config(node_folder, '[[models]]\nname = "m"\nprovider = "echo"\nprise_in = 5')
    result = invoke("config", "check", "--data-dir", str(node_folder))
    line = _line_of(node_folder, "prise_in = 5")
    assert_clean_failure(result, f"line {line}: models[2]: Object contains unknown field")


# --- commands printed for the shell they are typed in -------------------------------------


def test_init_prints_commands_that_run_where_aihub_is_not_on_the_path(tmp_path):
    """After `make run`, `aihub` is .venv/bin/aihub, not on the PATH: what init prints must
    run as printed, so it names the script (and how to activate the virtualenv); the Python
    example is a here-document that runs as pasted."""
    folder = tmp_path / "n"
    env = {k: v for k, v in os.environ.items() if k not in ("AIHUB_HOME", UNSET_VAR)}
    env["PATH"] = "/usr/bin:/bin"  # not the virtualenv's bin
    env["COLUMNS"] = "400"
    done = subprocess.run(
        [str(AIHUB), "init", "--name", "n", "--data-dir", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    (key,) = set(KEY_RE.findall(done.stdout))
    assert f"  {AIHUB} keys create --name my-app --budget 5 --data-dir {folder}" in done.stdout
    assert f". {AIHUB.parent / 'activate'}" in done.stdout
    # The printed here-document, run exactly as printed, reaches the openai package.
    start = done.stdout.index(" - <<'EOF'\n")
    python = done.stdout[:start].rsplit("\n", 1)[1].strip()
    assert Path(python).parent == AIHUB.parent  # the virtualenv's, which has openai
    script = done.stdout[start:].split("\n", 1)[1].split("\nEOF\n", 1)[0]
    compile(script, "printed", "exec")
    assert f'api_key="{key}"' in script and "from openai import OpenAI" in script


def test_init_prints_plain_aihub_where_the_path_finds_this_one(tmp_path):
    folder = tmp_path / "n"
    env = {k: v for k, v in os.environ.items() if k not in ("AIHUB_HOME", UNSET_VAR)}
    env["PATH"] = f"{AIHUB.parent}{os.pathsep}/usr/bin:/bin"
    done = subprocess.run(
        [str(AIHUB), "init", "--name", "n", "--data-dir", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "COLUMNS": "400"},
    )
    assert done.returncode == 0, done.stderr
    assert f"  aihub keys create --name my-app --budget 5 --data-dir {folder}" in done.stdout
    assert "activate" not in done.stdout


def test_network_takes_data_dir_like_every_command_and_dir_still_works():
    from node.cli.network import network

    for command in network.commands.values():
        names = {name for param in command.params for name in getattr(param, "opts", [])}
        assert {"--data-dir", "--dir"} <= names, command.name
    helped = invoke("network", "up", "--help")
    assert "--data-dir, --dir" in helped.output


def test_make_network_takes_a_port():
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    assert "aihub network up --base-port $(PORT)" in makefile
    assert re.search(r"^PORT \?= 8801$", makefile, re.M)


def test_update_help_says_that_options_not_given_keep_their_values():
    for group in ("keys", "tenants"):
        helped = squash(invoke(group, "update", "--help").output)
        assert squash("only the options given change, the others keep their values") in helped
        assert helped.count("[notgiven:unchanged]") >= 6, group
        assert "[default:monthly]" not in helped  # a default would be a lie on update
    created = squash(invoke("keys", "create", "--help").output)
    assert "[default:monthly]" in created and "[default:never]" in created
    assert squash("a number with s, m, h, d or w (90s, 30m, 12h, 30d, 2w)") in created


def test_help_gives_the_format_and_default_of_since_and_format():
    export = squash(invoke("ledger", "export", "--help").output)
    assert "[csv|json]" in export and "[default:csv]" in export and "[default:30d]" in export
    assert squash("a UTC date (2025-01-31) or unix seconds") in export
    usage = squash(invoke("usage", "--help").output)
    assert "[default:7d]" in usage and squash("(30m, 24h, 7d)") in usage


# --- hostile configs: any text gives a ConfigError, never a crash --------------------------

TOML_PIECES = st.sampled_from(
    [
        "[node]\n",
        'name = "n"\n',
        "[[models]]\n",
        'provider = "nope"\n',
        'name = "a b"\n',
        "[router]\n",
        'strategy = "x"\n',
        "retry = 1\n",
        '"quoted.key" = 1\n',
        "a.b.c = 2\n",
        "[ weird . 'header' ]\n",
        "[[ models ]]  # comment\n",
        "x = [\n1,\n2]\n",
        "y = {z = 1}\n",
        "= = =\n",
        "[\n",
        "\x00\n",
        "\u202e = 1\n",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TOML_PIECES | st.text(max_size=30), max_size=25))
def test_any_config_text_is_a_config_error_or_a_config(pieces):
    text = "".join(pieces)
    try:
        parse_config(text.encode("utf-8", "surrogatepass"), "config.toml")
    except ConfigError as exc:
        assert str(exc).startswith("config.toml")


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=400),
    st.lists(st.one_of(st.text(max_size=10), st.integers(0, 5)), max_size=4),
)
def test_finding_a_line_never_fails(text, target):
    line = find_line(text, target)
    assert line is None or 1 <= line <= len(text.splitlines())


def _leaf_commands(command, path):
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from _leaf_commands(command.get_command(ctx, name), [*path, name])
    else:
        yield path, command


def test_every_option_says_what_it_takes():
    """`--help` everywhere gives each option's meaning (and, through click, its default),
    the invite, join and peer commands included."""
    from node.cli.main import COMMANDS, load

    missing = [
        (" ".join(path), param.opts[0])
        for name in COMMANDS
        for path, command in _leaf_commands(load(name), [name])
        for param in command.params
        if isinstance(param, click.Option) and not param.help
    ]
    assert not missing


def test_without_the_openai_package_init_says_to_install_it_and_prints_runnable_python(
    tmp_path,
):
    """A server installed from the runtime lock has no openai package: the example names a
    plain python3 and says to install openai, and the here-document still runs as printed."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class NoOpenAI(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'openai' or name.startswith('openai.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoOpenAI())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("AIHUB_HOME", UNSET_VAR)}
    env.update(PYTHONPATH=str(blocker), COLUMNS="400")
    done = subprocess.run(
        [str(AIHUB), "init", "--name", "n", "--data-dir", str(tmp_path / "n")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "Or with the openai Python package (pip install openai first):" in done.stdout
    assert "\n  python3 - <<'EOF'\n" in done.stdout


def test_the_data_folder_may_be_given_before_the_command(node_folder, tmp_path):
    """`aihub --data-dir DIR keys list`, as people type it: above $AIHUB_HOME, below the
    command's own --data-dir."""
    elsewhere = str(tmp_path / "elsewhere")
    listed = invoke("keys", "list", "--json", "--data-dir", str(node_folder))
    assert listed.exit_code == 0 and '"name": "admin"' in listed.output, listed.output
    for args, env in (
        (("--data-dir", str(node_folder), "keys", "list", "--json"), {}),
        (("--data-dir", str(node_folder), "keys", "list", "--json"), {"AIHUB_HOME": elsewhere}),
        (("--data-dir", elsewhere, "keys", "list", "--json", "--data-dir", str(node_folder)), {}),
    ):
        result = invoke(*args, env=env)
        assert (result.exit_code, result.output) == (0, listed.output), (args, result.output)
    missing = invoke("--data-dir", elsewhere, "keys", "list")
    assert missing.exit_code == 1 and squash(f"no node at {elsewhere}") in squash(missing.output)
