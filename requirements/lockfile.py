"""The locks' freshness: `make setup` refuses a lock older than pyproject.toml's dependencies.

Each lock in this folder starts with `# inputs-sha256: …`, the digest of what it was resolved
from: pyproject.toml's `requires-python`, dependencies, optional dependencies and build
requirements, and the `.in` files beside this script. Only those count: editing the
import-linter contracts or ruff's settings in pyproject.toml does not make a lock stale.

    python requirements/lockfile.py check   # exit 1, saying what to run, if a lock is stale
    python requirements/lockfile.py stamp   # after `uv pip compile` (make lock) wrote them

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parent / "pyproject.toml"
LOCKS = ("dev.txt", "runtime.txt", "guardrails.txt", "uv.txt")
MARK = "# inputs-sha256: "
HEADER = "# Written by `make lock` (uv pip compile) from pyproject.toml and requirements/*.in."


def inputs_digest() -> str:
    project = tomllib.loads(PYPROJECT.read_text())
    inputs = {
        "requires-python": project["project"].get("requires-python"),
        "dependencies": project["project"].get("dependencies", []),
        "optional-dependencies": project["project"].get("optional-dependencies", {}),
        "build-system": project.get("build-system", {}).get("requires", []),
        "in": {path.name: path.read_text() for path in sorted(HERE.glob("*.in"))},
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def recorded(lock: Path) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(MARK):
            return line[len(MARK) :].strip()
    return None


def stale() -> list[str]:
    digest = inputs_digest()
    problems = []
    for name in LOCKS:
        lock = HERE / name
        if not lock.exists():
            problems.append(f"{lock.relative_to(HERE.parent)} is missing")
        elif recorded(lock) != digest:
            problems.append(
                f"{lock.relative_to(HERE.parent)} was resolved from other dependencies than "
                "pyproject.toml's"
            )
    return problems


def stamp() -> None:
    digest = inputs_digest()
    for name in LOCKS:
        lock = HERE / name
        lines = [
            line
            for line in lock.read_text().splitlines()
            if not line.startswith((MARK, HEADER.split(" (")[0]))
        ]
        lock.write_text("\n".join([HEADER, MARK + digest, *lines]) + "\n")


def main(argv: list[str]) -> int:
    if argv == ["stamp"]:
        stamp()
        return 0
    if argv == ["check"]:
        problems = stale()
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            print(
                "error: the dependency lock is stale: run `make lock` (it re-resolves only what "
                "changed), then commit requirements/",
                file=sys.stderr,
            )
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
