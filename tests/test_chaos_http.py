"""Faults end in bounded time: slow or stuck readers and heavy requests hold nothing shared.

Real HTTP against a real coordinator over in-process workers. Every case checks
a time bound, the status, that no worker keeps a session or KV afterwards, and
that the next ordinary request still gets the same text.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from mlx_cluster.contract.config import LimitsConfig

CHAT = {
    "messages": [{"role": "user", "content": "Tell me about the river."}],
    "max_tokens": 32,
    "temperature": 0,
}
# Large events (20 alternatives a token), so that a client that does not read soon
# fills every buffer between it and the server.
HEAVY = {**CHAT, "max_tokens": 1500, "logprobs": True, "top_logprobs": 20, "stream": True}


async def assert_nothing_held(cluster, within_s: float = 5.0) -> None:
    """Every worker reports no session and no KV in use, within `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        infos = [await stage.client.info() for stage in cluster.stages]
        held = [(i.sessions_open, i.kv_used_tokens) for i in infos]
        if all(h == (0, 0) for h in held):
            return
        assert time.monotonic() < deadline, f"(sessions, KV tokens) still held: {held}"
        await asyncio.sleep(0.05)


async def chat_text(http: httpx.AsyncClient) -> str:
    reply = await http.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


async def open_stream(url: str, body: dict, receive_buffer: int = 4096):
    """A raw connection that has sent `body` as a streamed chat request and read the
    status line. Its socket takes little before the server's sends block: a small
    receive buffer, and small segments (loopback's 64 KB ones let the server's send
    buffer grow to megabytes)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.setblocking(False)
    host, port = url.removeprefix("http://").split(":")
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=receive_buffer)
    data = json.dumps(body).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    status = await asyncio.wait_for(reader.readline(), 30)
    assert status.startswith(b"HTTP/1.1 200"), status
    return reader, writer


async def token_gaps(http: httpx.AsyncClient, window: asyncio.Event, gaps: list[float]) -> None:
    """Stream a long chat, noting each gap between its events while `window` is set."""
    body = {**CHAT, "max_tokens": 1500, "stream": True}
    last = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            now = time.perf_counter()
            if line.startswith("data: ") and last is not None and window.is_set():
                gaps.append(now - last)
            last = now


STALL_S = 0.1  # the longest pause a stream may see from another request's work


def parse_seconds(body: bytes) -> float:
    """How long this machine takes to parse `body` as JSON, the least of three tries: the
    server must read a body to refuse it, and that much it may hold a stream up."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        json.loads(body)
        times.append(time.perf_counter() - started)
    return min(times)


async def during_stream(http: httpx.AsyncClient, heavy) -> tuple[object, float]:
    """Run `heavy()` while a stream flows; its result and the stream's longest gap."""
    window, gaps = asyncio.Event(), []
    stream = asyncio.create_task(token_gaps(http, window, gaps))
    await asyncio.sleep(0.5)  # the stream is decoding
    window.set()
    result = await heavy()
    await asyncio.sleep(0.2)  # a stall it caused may end just after it
    assert not stream.done(), "the stream ended before the heavy request did"
    stream.cancel()  # the server frees its session (checked by each test)
    await asyncio.wait([stream])
    return result, max(gaps)


# --- slow and stuck readers ---------------------------------------------------------------


async def test_slow_readers_do_not_slow_a_normal_request(serve_cluster):
    url, cluster = await serve_cluster()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        want = await chat_text(http)
        started = time.perf_counter()
        assert await chat_text(http) == want
        alone = time.perf_counter() - started

        # 150 KB each: more than their sockets take, less than the server buffers.
        readers = [await open_stream(url, {**HEAVY, "max_tokens": 48}) for _ in range(4)]
        stop = asyncio.Event()

        async def trickle(reader: asyncio.StreamReader) -> None:
            while not stop.is_set() and await reader.read(64):
                await asyncio.sleep(0.05)  # about 1 KB/s

        trickling = [asyncio.create_task(trickle(r)) for r, _ in readers]
        await assert_nothing_held(cluster)  # while they still read
        started = time.perf_counter()
        assert await chat_text(http) == want
        loaded = time.perf_counter() - started
        print(f"normal request alone {alone:.3f} s, with 4 slow readers {loaded:.3f} s")
        assert loaded < 1.5 * alone + 0.05, (alone, loaded)  # 50 ms of scheduling noise

        stop.set()
        await asyncio.gather(*trickling)
        for _, writer in readers:
            writer.close()
        await assert_nothing_held(cluster)
        assert await chat_text(http) == want


@pytest.mark.parametrize(
    "settings, bound_s",
    [
        # Bounds with room for a busy machine, where the buffers fill slowly: a stream
        # that is never cut holds its KV past them, or ends in [DONE] (checked below).
        (LimitsConfig(send_timeout_s=1.0), 12.0),  # cut when the client reads nothing
        (LimitsConfig(send_timeout_s=60.0, request_timeout_s=2.0), 12.0),  # the deadline
    ],
    ids=["send_timeout", "request_timeout"],
)
async def test_stuck_reader_is_cut_off_and_its_kv_freed(serve_cluster, settings, bound_s):
    url, cluster = await serve_cluster(settings=settings)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        want = await chat_text(http)
        started = time.perf_counter()
        reader, writer = await open_stream(url, HEAVY)  # and never read again
        await assert_nothing_held(cluster, within_s=bound_s)
        freed = time.perf_counter() - started
        print(f"stuck reader's session freed after {freed:.2f} s")
        # The stream did not finish as a success: the server closed the connection (its
        # buffers full), or, where they still had room, the deadline's error ended it.
        tail = await asyncio.wait_for(reader.read(), 10)
        end = tail[-4096:]
        assert b"[DONE]" not in end or b'"code": "timeout"' in end, end[-300:]
        writer.close()
        assert await chat_text(http) == want


# --- heavy requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "separators, status",
    [((", ", ": "), 413), ((",", ":"), 400)],
    ids=["3.3MB_over_the_body_limit", "2.9MB_over_the_message_limit"],
)
async def test_many_messages_are_refused_without_stalling_streams(
    serve_cluster, separators, status
):
    url, cluster = await serve_cluster()
    messages = [{"role": "user", "content": ""}] * 100_000
    body = json.dumps({**CHAT, "messages": messages}, separators=separators).encode()
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        want = await chat_text(http)

        async def heavy() -> httpx.Response:
            return await http.post("/v1/chat/completions", content=body, headers=headers)

        reply, gap = await during_stream(http, heavy)
        allowed = STALL_S + 2 * parse_seconds(body)
        print(
            f"{len(body)} bytes of messages: token gap {gap * 1000:.0f} ms of {allowed * 1000:.0f}"
        )
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        if status == 400:
            assert error["param"] == "messages" and "100000 messages" in error["message"]
        else:
            assert error["code"] == "request_too_large" and str(len(body)) in error["message"]
        assert gap < allowed
        await assert_nothing_held(cluster)
        assert await chat_text(http) == want


async def test_a_3mb_prompt_does_not_stall_streams(serve_cluster):
    limits = LimitsConfig(max_prompt_bytes=4_000_000)
    url, cluster = await serve_cluster(settings=limits)
    prompt = "the river runs past the hills " * 100_000  # 3 MB
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        want = await chat_text(http)

        async def heavy() -> tuple[httpx.Response, float]:
            started = time.perf_counter()
            reply = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
            return reply, time.perf_counter() - started

        (reply, took), gap = await during_stream(http, heavy)
        print(f"3 MB prompt answered in {took:.2f} s; longest token gap {gap * 1000:.0f} ms")
        assert reply.status_code == 400 and "context window" in reply.text  # too long
        assert gap < STALL_S
        await assert_nothing_held(cluster)
        assert await chat_text(http) == want


async def test_a_300mb_body_is_refused_before_it_is_read(serve_cluster):
    url, cluster = await serve_cluster()
    host, port = url.removeprefix("http://").split(":")
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        want = await chat_text(http)
        framings = (b"content-length: 300000000\r\n\r\n", b"transfer-encoding: chunked\r\n\r\n")
        for framing in framings:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head + framing)
            started, sent = time.perf_counter(), 0
            piece = b"[" * 65536
            chunk = piece if b"length" in framing else b"10000\r\n" + piece + b"\r\n"
            answer = asyncio.create_task(reader.readline())
            while not answer.done() and sent < 300_000_000:
                writer.write(chunk)
                await writer.drain()
                sent += len(piece)
                await asyncio.sleep(0)
            status = await asyncio.wait_for(answer, 5)
            took = time.perf_counter() - started
            print(f"{framing.split(b':')[0].decode()}: 413 after {took:.3f} s, {sent} bytes sent")
            assert status.startswith(b"HTTP/1.1 413"), status
            assert sent < 10_000_000 and took < 2.0
            writer.close()
        await assert_nothing_held(cluster)
        assert await chat_text(http) == want
