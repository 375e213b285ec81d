"""`[server] workers` defaults to one worker process per core: what the config names wins, then
$WEB_CONCURRENCY, then the cores this process may use (affinity, bounded by a cgroup quota).
A real `aihub serve` on a node made by `aihub init` (whose config leaves `workers` unset)
starts that many workers and answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import openai
import pytest

from node.config import MAX_WORKERS, ServerSection, cores, quota_cpus
from node.provision import create_node
from tests.conftest import wait_ready
from tests.mocks.server import free_port
from tests.procfs import workers_of


def section(**fields: object) -> ServerSection:
    return msgspec.convert(fields, ServerSection)


def test_the_config_wins_then_web_concurrency_then_the_cores(monkeypatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    assert section(workers=5).worker_count() == 5
    assert section().worker_count() == 3
    monkeypatch.setenv("WEB_CONCURRENCY", "1000")
    assert section().worker_count() == MAX_WORKERS
    for unusable in ("", "0", "-2", "two", " "):
        monkeypatch.setenv("WEB_CONCURRENCY", unusable)
        assert section().worker_count() == min(cores(), MAX_WORKERS)
    monkeypatch.delenv("WEB_CONCURRENCY")
    assert section().worker_count() == min(cores(), MAX_WORKERS)
    assert 1 <= cores() <= len(os.sched_getaffinity(0))


def test_a_cgroup_cpu_quota_bounds_the_cores() -> None:
    assert quota_cpus("max 100000") is None  # no quota
    assert quota_cpus("100000 100000") == 1
    assert quota_cpus("150000 100000") == 2  # 1.5 CPUs: rounded up
    assert quota_cpus("400000 100000\n") == 4
    for unreadable in ("", "max", "0 100000", "100000 0", "-1 100000", "1.5 1", "a b", "1 2 3"):
        assert quota_cpus(unreadable) is None


def test_a_worker_count_out_of_range_is_refused() -> None:
    for wrong in (0, -1, MAX_WORKERS + 1):
        with pytest.raises(msgspec.ValidationError, match="workers"):
            section(workers=wrong)


def test_a_new_node_serves_on_every_core(tmp_path: Path) -> None:
    folder = tmp_path / "node"
    _, key = create_node(folder, "cores")
    assert "\nworkers =" not in (folder / "config.toml").read_text()
    env = {name: value for name, value in os.environ.items() if name != "WEB_CONCURRENCY"}
    port = free_port()
    aihub = Path(sys.executable).parent / "aihub"
    process = subprocess.Popen(
        [str(aihub), "serve", "--data-dir", str(folder), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        expected = cores() if cores() > 1 else 0  # one worker: uvicorn serves in-process
        deadline = time.monotonic() + 60
        while len(workers_of(process.pid)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(workers_of(process.pid)) == expected
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        for _ in range(4):
            answer = client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.choices[0].message.content
    finally:
        process.terminate()
        process.wait(timeout=30)
