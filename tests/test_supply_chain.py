"""The environment the suite runs in is the locked one: every dependency at its locked version
(requirements/, with hashes), the lock no older than pyproject.toml's dependencies, and no
`.pth` file but the known ones (a `.pth` line that starts with `import` runs at every start
of Python: the way a compromised package keeps itself running, as one did in 2026)."""

from __future__ import annotations

import importlib.util
import re
import site
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)
# `.pth` files that may be in the environment, and why:
ALLOWED_PTH = {
    # setuptools' editable install of aihub itself (make setup's `pip install -e .`): it
    # installs a finder that maps aihub's packages to this checkout.
    re.compile(r"__editable__\.aihub-[\w.]+\.pth"),
    # setuptools' own: prefers its bundled distutils when SETUPTOOLS_USE_DISTUTILS says so.
    re.compile(r"distutils-precedence\.pth"),
    # virtualenv-made environments (not `python -m venv`) carry this one.
    re.compile(r"_virtualenv\.pth"),
}
# Distributions that are in the environment without being in the lock: the installer that
# `python -m venv` brings, and aihub itself.
UNLOCKED = {"pip", "aihub"}


def lockfile() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lockfile", LOCKS / "lockfile.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(lock: Path) -> dict[str, str]:
    return {normalized(name): version for name, version in REQUIREMENT.findall(lock.read_text())}


def site_folders() -> list[Path]:
    folders = [Path(p) for p in site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        folders.append(Path(site.getusersitepackages()))
    return [folder for folder in folders if folder.is_dir()]


def test_no_pth_file_but_the_known_ones() -> None:
    found = [path for folder in site_folders() for path in folder.glob("*.pth")]
    unexpected = [p for p in found if not any(rule.fullmatch(p.name) for rule in ALLOWED_PTH)]
    assert not unexpected, f"unexpected .pth files (code that runs at every start): {unexpected}"


def test_the_editable_install_points_at_this_checkout_only() -> None:
    for folder in site_folders():
        for path in folder.glob("__editable__.aihub-*.pth"):
            text = path.read_text()
            assert re.fullmatch(r"import __editable___aihub_[\w]+_finder; [^\n]+\n?", text), text


def test_the_lock_is_as_fresh_as_pyproject() -> None:
    assert lockfile().stale() == []


def test_every_requirement_is_pinned_with_hashes() -> None:
    for name in ("dev.txt", "runtime.txt", "uv.txt"):
        text = (LOCKS / name).read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        assert entries, name
        for entry in entries:
            assert REQUIREMENT.match(entry), (name, entry[:80])
            assert "--hash=sha256:" in entry, (name, entry[:80])


def test_the_runtime_lock_is_the_dev_lock_without_the_dev_tools() -> None:
    runtime, dev = pinned(LOCKS / "runtime.txt"), pinned(LOCKS / "dev.txt")
    assert {"litestar", "msgspec", "pynacl", "setuptools"} <= set(runtime)
    assert "pytest" not in runtime and "pytest" in dev
    assert {name: dev.get(name) for name in runtime} == runtime


def test_the_guardrails_lock_is_the_runtime_lock_and_the_extra_at_the_dev_versions() -> None:
    """requirements/guardrails.txt (the Docker image built with GUARDRAILS=1): every runtime
    pin as it is, the guardrails extra's libraries, no dev tool, each pinned with hashes."""
    runtime, dev = pinned(LOCKS / "runtime.txt"), pinned(LOCKS / "dev.txt")
    guarded = pinned(LOCKS / "guardrails.txt")
    assert {name: guarded.get(name) for name in runtime} == runtime
    assert {"presidio-analyzer", "detect-secrets", "spacy"} <= set(guarded)
    assert "pytest" not in guarded
    assert {name: dev.get(name) for name in guarded} == guarded
    text = (LOCKS / "guardrails.txt").read_text()
    for entry in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2]):
        assert REQUIREMENT.match(entry) and "--hash=sha256:" in entry, entry[:80]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements/guardrails.txt" in dockerfile
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "!requirements/guardrails.txt" in ignore


def test_every_installed_distribution_is_the_locked_version() -> None:
    locked = pinned(LOCKS / "dev.txt")
    installed = {
        normalized(dist.metadata["Name"]): dist.version
        for dist in metadata.distributions()
        if dist.metadata["Name"]
    }
    wrong = {
        name: (version, locked.get(name, "not locked"))
        for name, version in installed.items()
        if name not in UNLOCKED and locked.get(name) != version
    }
    assert not wrong, f"installed (version, locked) that differ, in {sys.prefix}: {wrong}"


def test_building_aihub_warns_of_nothing(tmp_path: Path) -> None:
    """setuptools deprecated `project.license` as a table (and warned on every install):
    building the package from a copy of its sources, with the locked setuptools and nothing
    fetched, prints no warning."""
    import shutil
    import subprocess

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("adapters", "federation", "ledger", "node"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    # -v: pip shows what the build backend prints (its warnings) only when verbose.
    wheel = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*wheel, "--no-index", "--wheel-dir", str(tmp_path / "wheels"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    output = (built.stdout + built.stderr).lower()
    assert "deprecat" not in output and "backendwarning" not in output, output
    assert list((tmp_path / "wheels").glob("aihub-*.whl"))


def test_a_lock_older_than_the_dependencies_fails_clearly(tmp_path: Path) -> None:
    """What the lead meets after merging a branch that adds a dependency: `make setup` (and
    CI's first step) stops, saying to run `make lock`. Other edits to pyproject.toml do not."""
    import shutil
    import subprocess

    shutil.copytree(LOCKS, tmp_path / "requirements")
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()

    def check() -> subprocess.CompletedProcess[str]:
        script = tmp_path / "requirements" / "lockfile.py"
        return subprocess.run(
            [sys.executable, str(script), "check"], capture_output=True, text=True, timeout=30
        )

    pyproject.write_text(text + "\n[tool.someone-elses-tool]\nsetting = 1\n")
    assert check().returncode == 0
    added = text.replace('    "rich>=13",\n', '    "rich>=13",\n    "asyncpg>=0.29",\n')
    assert added != text
    pyproject.write_text(added)
    stale = check()
    assert stale.returncode == 1
    assert "the dependency lock is stale: run `make lock`" in stale.stderr
    assert "requirements/dev.txt" in stale.stderr


def test_the_docker_image_installs_from_the_lock_it_is_given() -> None:
    """deploy/Dockerfile installs requirements/runtime.txt with hashes checked, and its
    build context (deploy/Dockerfile.dockerignore: nothing but what is let in) carries every
    file the Dockerfile copies, the lock included."""
    deploy = ROOT / "deploy"
    dockerfile = (deploy / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements/runtime.txt" in dockerfile
    assert "pip install --no-deps --no-build-isolation ." in dockerfile
    allowed = [
        line[1:].rstrip("/")
        for line in (deploy / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    copied = [
        source
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    ]
    assert "requirements/runtime.txt" in copied
    for source in copied:
        assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source
