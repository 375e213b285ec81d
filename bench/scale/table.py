"""`python -m bench.scale.table`: every run of bench/README.md's fifty-node table, one after
another, and the table itself (a column per run), printed and written to
`bench/scale-table.md`; each run's figures in `bench/scale-results/`.

`--print-only` makes the table from the results written before, without running anything;
other options (say `--base-port 19100`) are passed on to each run (`python -m bench.scale`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.scale.report import columns

BENCH = Path(__file__).resolve().parent.parent
RESULTS = BENCH / "scale-results"
TABLE = BENCH / "scale-table.md"
# (column title, file name, arguments): the table's runs, in its order.
RUNS = [
    ("50 nodes, star", "star-50", ["--nodes", "50"]),
    ("10 nodes, star", "star-10", ["--nodes", "10"]),
    (
        "50 nodes, random (seed 19, `--requests 100`)",
        "random-50",
        ["--nodes", "50", "--topology", "random", "--seed", "19", "--requests", "100"],
    ),
    ("50 nodes, chain", "chain-50", ["--nodes", "50", "--topology", "chain"]),
]


def main() -> None:
    extra = [arg for arg in sys.argv[1:] if arg != "--print-only"]
    if "--print-only" not in sys.argv:
        RESULTS.mkdir(exist_ok=True)
        for title, name, arguments in RUNS:
            print(f"=== {title}", flush=True)
            out = ["--out", str(RESULTS / f"{name}.json")]
            command = [sys.executable, "-m", "bench.scale", *arguments, *out, *extra]
            # A run that fails keeps what it measured; the next one runs all the same.
            subprocess.run(command, check=False, cwd=BENCH.parent)
    runs = [
        (title, json.loads((RESULTS / f"{name}.json").read_text()))
        for title, name, _ in RUNS
        if (RESULTS / f"{name}.json").exists()
    ]
    text = columns(runs)
    TABLE.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
