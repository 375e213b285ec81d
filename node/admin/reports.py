"""The usage and audit reports as the admin API and the CLI both give them: the groupings,
the defaults and bounds of their parameters, the report's JSON shape and its CSV.

Apart from `routes.py` so that `aihub usage` does not import Litestar to print a table.
"""

from __future__ import annotations

import csv
import io
from typing import Literal

import msgspec

from node.storage.records import UsageGroup

UsageBy = Literal["key", "tenant", "model", "peer"]
USAGE_BY: tuple[UsageBy, ...] = ("key", "tenant", "model", "peer")
USAGE_COLUMNS = UsageGroup.__struct_fields__
DEFAULT_SINCE = "7d"
AUDIT_LIMIT_MAX = 1000


def usage_csv(rows: list[UsageGroup]) -> str:
    """A usage report as CSV, with a header line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(USAGE_COLUMNS)
    for row in rows:
        writer.writerow(["" if value is None else value for value in msgspec.structs.astuple(row)])
    return out.getvalue()


class UsageReport(msgspec.Struct, tag_field="object", tag="list"):
    by: str
    since: int
    data: list[UsageGroup]
