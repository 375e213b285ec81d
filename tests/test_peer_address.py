"""Where peers reach a node (`node/peers/address.py`): the address it serves on, and which
addresses another server cannot reach."""

from __future__ import annotations

import os

import msgspec

from node.config import load_config
from node.peers.address import (
    SERVED_FILE,
    Served,
    advertised_urls,
    reachability,
    reachability_warning,
    recorded,
    running_url,
    served_url,
)


def test_an_address_on_every_interface_is_this_machines_own():
    assert served_url("127.0.0.1", 28001) == "http://127.0.0.1:28001"
    assert served_url("::1", 28001) == "http://[::1]:28001"
    for anywhere in ("0.0.0.0", "::"):
        url = served_url(anywhere, 28001)
        assert url.endswith(":28001") and "0.0.0.0" not in url and "[::]" not in url


def test_which_addresses_another_server_cannot_reach():
    assert reachability("http://127.0.0.1:8787") == "loopback"
    assert reachability("http://localhost:8787") == "loopback"
    assert reachability("http://[::1]:8787") == "loopback"
    assert reachability("http://192.168.1.20:8787") == "private"
    assert reachability("http://10.0.0.5:8787") == "private"
    assert reachability("https://hub.example.org") is None
    assert reachability("http://8.8.8.8:8787") is None
    assert reachability_warning(["https://hub.example.org"]) is None
    # One reachable URL is enough; all unreachable is warned of, with the fix.
    assert reachability_warning(["http://127.0.0.1:1", "https://hub.example.org"]) is None
    warning = reachability_warning(["http://192.168.1.20:8787"])
    assert warning is not None and "public_urls" in warning


def test_the_served_address_is_used_while_its_process_runs(node_dir):
    config = load_config(node_dir.path)
    assert advertised_urls(config, node_dir.path) == ["http://127.0.0.1:8787"]
    with recorded(node_dir.path, "127.0.0.1", 28001) as url:
        assert running_url(node_dir.path) == url == "http://127.0.0.1:28001"
        assert advertised_urls(config, node_dir.path) == [url]
    assert running_url(node_dir.path) is None
    # A file left by a process that is gone (killed by a signal) is not believed; nor garbage.
    dead = Served("http://127.0.0.1:28002", 2**22 + 12345)
    (node_dir.path / SERVED_FILE).write_bytes(msgspec.json.encode(dead))
    assert running_url(node_dir.path) is None
    (node_dir.path / SERVED_FILE).write_bytes(b"\xff{not json")
    assert running_url(node_dir.path) is None
    # public_urls, when set, wins over the served address.
    (node_dir.path / SERVED_FILE).write_bytes(
        msgspec.json.encode(Served("http://127.0.0.1:28003", os.getpid()))
    )
    node_dir.set_config("public_urls = []", 'public_urls = ["https://hub.example.org/"]')
    config = load_config(node_dir.path)
    assert advertised_urls(config, node_dir.path) == ["https://hub.example.org"]
