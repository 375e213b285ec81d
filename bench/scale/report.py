"""The table a scale run prints (and bench/README.md holds)."""

from __future__ import annotations

from typing import Any


def _s(value: object) -> str:
    return "-" if value is None else f"{value} s"


def table(r: dict[str, Any]) -> str:
    labelled = rows(r)
    width = max(len(label) for label, _ in labelled)
    return "\n".join(f"| {label.ljust(width)} | {value} |" for label, value in labelled)


def columns(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """Several runs side by side: a row per figure, a column per run (bench/README.md's
    table). A figure a run lacks (it failed before it) is shown as `-`."""
    cells = [dict(rows(r)) for _, r in runs]
    labels = list(dict.fromkeys(label for one in cells for label in one))
    lines = [
        "| figure | " + " | ".join(title for title, _ in runs) + " |",
        "|---" * (len(runs) + 1) + "|",
    ]
    for label in labels:
        values = [one.get(label, "-").replace("|", "/") for one in cells]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures of one run, labelled; those of the steps it did not reach are left out."""
    labelled: list[tuple[str, str]] = []
    for part in (_setup, _convergence, _revocation, _idle, _load, _dead_peer, _ledger):
        try:
            labelled += part(r)
        except KeyError:
            continue
    return labelled


def _setup(r: dict[str, Any]) -> list[tuple[str, str]]:
    i = r["intervals"]
    rows = [
        ("nodes / topology / joins", f"{r['nodes']} / {r['topology']} / {r['joins']}"),
        ("intervals", f"health {i['health_s']} s, reconcile {i['reconcile_s']} s"),
        ("start all / join all", f"{r['start_all_s']} s / {r['join_all_s']} s"),
    ]
    if "load_average" in r:
        rows.append(("load average (1 min) at start / end", r["load_average"]))
    return rows


def _convergence(r: dict[str, Any]) -> list[tuple[str, str]]:
    c = r["convergence"]
    rows = []
    for step in ("add", "price", "remove"):
        s = c[step]
        rows.append(
            (
                f"advert {step} (config + restart)",
                f"restart {s['restart_s']} s, then p50 {_s(s['p50_s'])}, p100 {_s(s['p100_s'])} "
                f"({s['reached']}/{s['peers']} peers)",
            )
        )
    for step, s in c["key_models"].items():
        rows.append(
            (f"key's models {step} (live)", f"{_s(s['p100_s'])} ({s['reached']}/{s['peers']})")
        )
    return rows


def _revocation(r: dict[str, Any]) -> list[tuple[str, str]]:
    v = r["revocation"]
    return [
        (
            "revocation: request refused / unlisted",
            f"{_s(v['request_refused_s'])} / {_s(v['unlisted_s'])}",
        )
    ]


def _idle(r: dict[str, Any]) -> list[tuple[str, str]]:
    d = r["idle"]
    return [
        (
            "idle traffic per node",
            f"{d['bytes_per_node_s']} B/s, {d['requests_per_node_s']} req/s "
            f"({d['mean_peers']} peers on average, {d['seconds']} s)",
        ),
        (
            "idle traffic per node per peer",
            f"{d['bytes_per_node_peer_s']} B/s, {d['requests_per_node_peer_s']} req/s",
        ),
        (
            f"idle traffic served by the provider ({d['provider_peers']} peers)",
            f"{d['provider_bytes_s']} B/s, {d['provider_bytes_peer_s']} B/s per peer",
        ),
        ("idle: requests by path", ", ".join(f"{p} {n}" for p, n in sorted(d["by_path"].items()))),
        (
            f"provider ({d['provider_peers']} peers) idle",
            f"CPU {d['provider_cpu_pct']} %, RSS {d['provider_rss_mib']} MiB",
        ),
    ]


def _load(r: dict[str, Any]) -> list[tuple[str, str]]:
    load = r["load"]
    return [
        (
            "provider under load",
            f"{load['requests_s']} req/s at {load['concurrency']} parallel, "
            f"CPU {load['cpu_pct']} %, RSS {load['rss_mib']} MiB, {load['failed']} failed",
        )
    ]


def _dead_peer(r: dict[str, Any]) -> list[tuple[str, str]]:
    p = r["dead_peer"]
    up = p["marked_up_after_ready"]
    return [
        (
            "dead peer: failed requests per consumer",
            f"max {p['max_failed_per_consumer']} "
            f"({p['consumers']} consumers: {p['failed_requests']})",
        ),
        (
            "dead peer: marked down",
            f"p50 {_s(p['marked_down']['p50_s'])}, p100 {_s(p['marked_down']['p100_s'])}",
        ),
        (
            "dead peer: restart, then marked up",
            f"{p['restart_s']} s, then p50 {_s(up['p50_s'])}, p100 {_s(up['p100_s'])}",
        ),
    ]


def _ledger(r: dict[str, Any]) -> list[tuple[str, str]]:
    g = r["ledger"]
    return [
        (
            "ledger: requests",
            f"{g['requests']} from {g['consumers']} consumers, {g['requests_s']} req/s, "
            f"{g['failed']} failed",
        ),
        (
            "ledger: reconcile / settle all pairs",
            f"{g['reconcile_all_s']} s / {g['settle_all_s']} s",
        ),
        ("ledger net", f"{g['net_s']} s, {g['transfers']} transfers"),
    ]
