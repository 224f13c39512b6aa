"""The guarded h11 protocol under slowloris and slow readers, with raw sockets against uvicorn on
a background thread: half-open connections (silent, partial request line, partial headers,
unfinished body, a head dripped a line at a time) are closed by the server after their deadline
while ``/health`` answers beside them, the connection cap evicts idle ones first, and a response
nobody reads is cut off."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from conveyor.server.connection_guard import ConnectionGuard, ConnectionLimits
from server_process import free_port

PARTIAL = [b"", b"GET /heal", b"GET /health HTTP/1.1\r\nHost: x\r\n",
           b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro"]


class ToyApp:
    """/health answers 200, /echo reads its body, /endless streams until the client is gone."""

    def __init__(self):
        self.endless_ended = threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["path"] == "/endless":
            return await self._endless(receive, send)
        while (message := await receive())["type"] == "http.request" and message["more_body"]:
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def _endless(self, receive, send):
        gone = asyncio.Event()

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
        watcher = asyncio.ensure_future(watch())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while not gone.is_set():
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            await asyncio.sleep(0)
        watcher.cancel()
        self.endless_ended.set()


class ThreadedServer:
    """uvicorn with the guarded protocol on a daemon thread (no signal handling)."""

    def __init__(self, app, limits: ConnectionLimits):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.guard = ConnectionGuard(limits)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                log_level="warning", ws="none", backlog=4096,
                                http=self.guard.protocol_factory())
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed ``sock`` (whatever it sent before is read and dropped)."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait_all_closed(socks: list[socket.socket], bound: float = 60.0) -> list[socket.socket]:
    deadline = time.monotonic() + bound
    open_ = list(socks)
    while open_ and time.monotonic() < deadline:
        open_ = [s for s in open_ if not closed_by_server(s)]
        time.sleep(0.1)
    return open_


def half_open(port: int, i: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    if PARTIAL[i % len(PARTIAL)]:
        sock.sendall(PARTIAL[i % len(PARTIAL)])
    sock.setblocking(False)
    return sock


def test_half_open_connections_are_closed_and_health_answers_beside_them():
    limits = ConnectionLimits(max_connections=150, header_timeout=3, body_timeout=3)
    with ThreadedServer(ToyApp(), limits) as server:
        socks = [half_open(server.port, i) for i in range(200)]
        health = httpx.get(server.url + "/health", timeout=30)
        still_open = wait_all_closed(socks)
        after = httpx.get(server.url + "/health", timeout=30)
        guard = server.guard
        for sock in socks:
            sock.close()
    assert health.status_code == 200 and after.status_code == 200
    assert not still_open
    assert guard.num_evicted >= 50 and guard.num_timed_out >= 1 and guard.num_refused == 0


def drip(port: int, head: list[bytes], pause: float) -> int:
    """Send ``head`` a piece at a time; the number of pieces sent before the server closed."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for sent, piece in enumerate(head):
            sock.setblocking(False)
            if closed_by_server(sock):
                return sent
            sock.setblocking(True)
            try:
                sock.sendall(piece)
            except OSError:
                return sent
            time.sleep(pause)
    return len(head)


def test_a_head_or_body_sent_slowly_is_cut_off_at_its_deadline():
    limits = ConnectionLimits(header_timeout=1, body_timeout=1)
    head = [b"GET /health HTTP/1.1\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(60)] + [b"\r\n"]
    body = [b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n"] + [b"y"] * 60
    with ThreadedServer(ToyApp(), limits) as server:
        sent_head = drip(server.port, head, 0.25)
        sent_body = drip(server.port, body, 0.25)
        ok = httpx.post(server.url + "/echo", content=b"z" * 60, timeout=30)
    assert sent_head < len(head) and sent_body < len(body)
    assert ok.status_code == 200


def test_a_response_nobody_reads_is_cut_off():
    app = ToyApp()
    with ThreadedServer(app, ConnectionLimits(write_timeout=1)) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        ended = app.endless_ended.wait(60)           # never read a byte until then
        sock.setblocking(False)
        closed = wait_all_closed([sock]) == []
        sock.close()
    assert ended and closed


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="--header-timeout must be positive"):
        ConnectionLimits(header_timeout=0)
    with pytest.raises(ValueError, match="--stream-write-timeout must be positive"):
        ConnectionLimits(write_timeout=-1)
