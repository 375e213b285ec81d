"""The upstream POST below aiohttp's `ClientRequest.send` (adapters/aiohttp_post.py), against a
raw TCP server of the test's own that sees every byte and answers whatever it is told to, a
hostile upstream included: what goes on the wire, the connection going back to the pool or not,
interim answers, a malformed answer, a silent one, and a header that would split the request."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yarl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from adapters.aiohttp_post import ORIGINS_KEPT, Pool, ProviderAnswer, post

TIMEOUTS = aiohttp.ClientTimeout(total=30, sock_connect=5, sock_read=30)
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
Answer = Callable[[bytes], bytes | None]


class Upstream:
    """Reads each request whole (head and Content-Length body) and writes what `answer` returns
    for it; None leaves the request unanswered. Records the requests and the connections."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.close_after_answer = False

    async def start(self, tls: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.answer(request)
                if answer is None:
                    await reader.read()  # silent until the client hangs up
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after_answer:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def run(answer: Answer, scenario: Callable[[Pool, str], Awaitable[None]]) -> Upstream:
    return _run_upstream(Upstream(answer), scenario)


def _run_upstream(upstream: Upstream, scenario: Callable[[Pool, str], Awaitable[None]]) -> Upstream:

    async def main() -> None:
        base = await upstream.start()
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            await scenario(Pool(session), base)
        await upstream.stop()

    asyncio.run(main())
    return upstream


def _url(base: str, path: str = "/v1/chat/completions") -> yarl.URL:
    return yarl.URL(base + path, encoded=True)


def test_the_request_leaves_whole_and_its_connection_is_kept() -> None:
    async def scenario(session: Pool, base: str) -> None:
        for _ in range(2):
            answer = await post(
                session,
                _url(base, "/v1/x?a=%2F"),
                b'{"q":1}',
                {"authorization": "Bearer k"},
                TIMEOUTS,
            )
            assert isinstance(answer, ProviderAnswer)
            assert (answer.status, answer.reason, answer.content_length) == (200, "OK", 2)
            assert answer.headers["Content-Type"] == "application/json"
            assert await answer.content.read() == b"{}"
            assert answer.connection is None  # let go at the body's end, as aiohttp does
            answer.release()  # and again: nothing happens

    upstream = run(lambda _: OK, scenario)
    assert upstream.connections == 1  # the second request went on the first one's connection
    head, _, body = upstream.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/x?a=%2F HTTP/1.1"  # the path exactly as given
    fields = {line.split(b": ", 1)[0].lower(): line.split(b": ", 1)[1] for line in lines[1:]}
    assert fields[b"host"].startswith(b"127.0.0.1:")
    assert fields[b"authorization"] == b"Bearer k"
    # What aiohttp's own path sends: its default headers, the body's length and type.
    assert fields[b"accept-encoding"] and fields[b"user-agent"].startswith(b"Python/")
    assert fields[b"content-length"] == b"7" and body == b'{"q":1}'
    assert fields[b"content-type"] == b"application/octet-stream"


def test_an_answer_cut_short_closes_its_connection_and_its_body_can_no_longer_be_read() -> None:
    big = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000

    async def scenario(session: Pool, base: str) -> None:
        answer = await post(session, _url(base), b"{}", {}, TIMEOUTS)
        answer.release()  # 99,000 bytes unread: the protocol will not keep it
        with pytest.raises(aiohttp.ClientConnectionError):
            await answer.content.read()
        again = await post(session, _url(base), b"{}", {}, TIMEOUTS)
        again.close()

    upstream = run(lambda _: big, scenario)
    assert upstream.connections == 2


def test_an_answer_read_until_the_upstream_closes_is_whole_and_its_connection_not_kept() -> None:
    # No Content-Length, `connection: close`: the body is what comes until the upstream
    # hangs up (an HTTP/1.0-style server); `Upstream` closes after writing it.
    until_close = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"y" * 70_000

    async def scenario(session: Pool, base: str) -> None:
        for _ in range(2):
            got = await post(session, _url(base), b"{}", {}, TIMEOUTS)
            assert got.content_length is None
            assert await got.content.read() == b"y" * 70_000
            got.release()

    upstream = Upstream(lambda _: until_close)
    upstream.close_after_answer = True
    _run_upstream(upstream, scenario)
    assert upstream.connections == 2


def test_an_interim_answer_is_passed_over() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"

    async def scenario(session: Pool, base: str) -> None:
        answer = await post(session, _url(base), b"{}", {}, TIMEOUTS)
        assert answer.status == 200 and await answer.content.read() == b"{}"

    run(lambda _: interim + OK, scenario)


def test_a_malformed_answer_is_a_client_error() -> None:
    async def scenario(session: Pool, base: str) -> None:
        with pytest.raises(aiohttp.ClientError):
            await post(session, _url(base), b"{}", {}, TIMEOUTS)

    run(lambda _: b"HTTP/1.1 2x0 Nope\r\n\r\n", scenario)


def test_a_silent_upstream_is_given_up_at_the_read_timeout() -> None:
    timeouts = aiohttp.ClientTimeout(total=30, sock_connect=5, sock_read=0.2)

    async def scenario(session: Pool, base: str) -> None:
        with pytest.raises(aiohttp.ServerTimeoutError):
            await post(session, _url(base), b"{}", {}, timeouts)

    upstream = run(lambda _: None, scenario)
    assert len(upstream.requests) == 1


def test_a_header_that_would_split_the_request_is_refused_before_anything_is_sent() -> None:
    async def scenario(session: Pool, base: str) -> None:
        # A transport error (the caller answers 502 and tries the next deployment), not a
        # ValueError escaping as a 500.
        with pytest.raises(aiohttp.ClientError, match="control character"):
            await post(session, _url(base), b"{}", {"x-a": "b\r\nx-smuggled: 1"}, TIMEOUTS)

    upstream = run(lambda _: OK, scenario)
    assert upstream.requests == []


def test_a_given_content_length_is_replaced_by_the_bodys_own() -> None:
    async def scenario(session: Pool, base: str) -> None:
        # aiohttp's own path would send this 999 as given: a request the upstream would
        # read past its end, into the next one on the connection.
        answer = await post(session, _url(base), b'{"q":1}', {"content-length": "999"}, TIMEOUTS)
        assert await answer.content.read() == b"{}"

    upstream = run(lambda _: OK, scenario)
    [request] = upstream.requests
    assert request.lower().count(b"content-length:") == 1
    assert b"Content-Length: 7\r\n" in request


def test_each_origin_gets_its_own_connections_and_the_pool_keeps_a_bounded_few() -> None:
    first, second = Upstream(lambda _: OK), Upstream(lambda _: OK)

    async def main() -> Pool:
        bases = [await first.start(), await second.start()]
        async with aiohttp.ClientSession() as session:
            pool = Pool(session)
            for index in range(6):
                base = bases[index % 2]
                answer = await post(pool, _url(base, f"/v1/{index}"), b"{}", {}, TIMEOUTS)
                assert await answer.content.read() == b"{}"
            for port in range(1, ORIGINS_KEPT + 10):  # never connected to: worked out only
                pool.origin(yarl.URL(f"http://127.0.0.1:{port}/v1"))
                assert len(pool._origins) <= ORIGINS_KEPT
        await first.stop()
        await second.stop()
        return pool

    asyncio.run(main())
    assert [r.split(b" ")[1] for r in first.requests] == [b"/v1/0", b"/v1/2", b"/v1/4"]
    assert [r.split(b" ")[1] for r in second.requests] == [b"/v1/1", b"/v1/3", b"/v1/5"]
    assert first.connections == second.connections == 1


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (as `localhost`), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_a_tls_upstream_is_verified_by_its_name_and_its_connection_kept(tmp_path: Path) -> None:
    """Every real provider is HTTPS: the connection the pool asks for is TLS to the URL's
    host, checked against the name (a certificate for another name is refused), and kept."""
    cert, key = _certificate(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    upstream = Upstream(lambda _: OK)

    async def main() -> None:
        port = yarl.URL(await upstream.start(served)).port
        connector = aiohttp.TCPConnector(ssl=trusting)
        async with aiohttp.ClientSession(connector=connector) as session:
            pool = Pool(session)
            for _ in range(2):
                url = yarl.URL(f"https://localhost:{port}/v1/chat/completions")
                answer = await post(pool, url, b"{}", {}, TIMEOUTS)
                assert answer.status == 200 and await answer.content.read() == b"{}"
            # The same server by another name than its certificate's: refused.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await post(pool, yarl.URL(f"https://127.0.0.1:{port}/v1"), b"{}", {}, TIMEOUTS)
        await upstream.stop()

    asyncio.run(main())
    # Both requests on one connection; the refused handshake never became one.
    assert len(upstream.requests) == 2 and upstream.connections == 1
    assert b"\r\nHost: localhost:" in upstream.requests[0]
