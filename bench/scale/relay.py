"""A byte-counting TCP relay in front of every node's federation address.

Each node listens on an internal port and tells its peers (`public_urls`) the relay's port, so
every byte a peer sends it or it answers a peer passes here and is counted, per node and per
direction; the harness talks to the nodes' internal ports, so its own polling is not counted.
Run as `python -m bench.scale.relay COUNTS_FILE PUBLIC:INTERNAL …`; it rewrites COUNTS_FILE
(JSON: public port -> [bytes to the node, bytes from the node, connections]) each 0.2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

CHUNK = 65536
WRITE_EVERY = 0.2


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: list[int], at: int
) -> None:
    try:
        while data := await reader.read(CHUNK):
            count[at] += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _handler(internal: int, count: list[int]):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count[2] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", internal)
        except OSError:
            writer.close()  # the node is down: the peer sees a refused/closed connection
            return
        await asyncio.gather(_pipe(reader, up_writer, count, 0), _pipe(up_reader, writer, count, 1))

    return handle


async def _write(path: Path, counts: dict[int, list[int]]) -> None:
    while True:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(counts))
        os.replace(temporary, path)
        await asyncio.sleep(WRITE_EVERY)


async def main(path: Path, pairs: list[tuple[int, int]]) -> None:
    counts: dict[int, list[int]] = {public: [0, 0, 0] for public, _ in pairs}
    servers = [
        await asyncio.start_server(_handler(internal, counts[public]), "127.0.0.1", public)
        for public, internal in pairs
    ]
    writer = asyncio.ensure_future(_write(path, counts))
    try:
        await asyncio.gather(*(server.serve_forever() for server in servers))
    finally:
        writer.cancel()


if __name__ == "__main__":
    target = Path(sys.argv[1])
    ports = [tuple(int(p) for p in arg.split(":")) for arg in sys.argv[2:]]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(target, ports))  # type: ignore[arg-type]
