#!/usr/bin/env python3
"""A tiny OpenAI-style origin for the SSE-delay measurement of benches/proxy.sh.

Why not the emulator: to measure the delay an SSE event gains crossing a proxy we need the
moment each event left the origin. This origin writes `"t_ns": <CLOCK_MONOTONIC ns>` into
every event, taken just before the write; the client (bench_client.py sse-delay) takes the
same clock when the bytes arrive. CLOCK_MONOTONIC is one clock for every process on the
machine, so arrival - t_ns is the event's one-way delay. Measured direct and through each
proxy, the difference is what the proxy adds.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length request bodies, chunked SSE
responses) and mirrors the emulator's knobs: POST /v1/chat/completions; with "stream": true
in the body it streams `x-emu-stream-events` events (default 5) `x-emu-stream-interval-ms`
apart (default 0), then `data: [DONE]`. Otherwise a small chat.completion JSON. It also
serves as a stand-in upstream when the emulator binary is missing.

Usage: sse_origin.py --listen 127.0.0.1:0      (prints "listening on ADDR")
"""

import argparse
import asyncio
import gc
import json
import re
import sys
import time

STREAM_RE = re.compile(rb'"stream"\s*:\s*true')

COMPLETION = json.dumps({
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help?"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 250, "completion_tokens": 7, "total_tokens": 257},
}, separators=(",", ":")).encode()


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


async def stream(writer, events: int, interval_ms: float) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
    await writer.drain()
    start = time.monotonic()
    for i in range(events):
        if interval_ms > 0 and i > 0:
            # A fixed schedule (no drift); the delay is measured from the write, not the schedule.
            await asyncio.sleep(max(0.0, start + i * interval_ms / 1000.0 - time.monotonic()))
        ev = ('{"id":"chatcmpl-bench","object":"chat.completion.chunk","model":"gpt-4o-mini",'
              '"choices":[{"index":0,"delta":{"content":"tok%d "},"finish_reason":null}],'
              '"seq":%d,"t_ns":%d}' % (i, i, time.monotonic_ns())).encode()
        writer.write(chunk(b"data: " + ev + b"\n\n"))
        await writer.drain()
    writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                if b":" in line:
                    k, v = line.split(b":", 1)
                    headers[k.strip().lower()] = v.strip()
            n = int(headers.get(b"content-length", b"0"))
            body = await reader.readexactly(n) if n else b""
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:  # a proxy may re-chunk the request body
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    body += await reader.readexactly(size + 2)
                    if size == 0:
                        break
            if STREAM_RE.search(body):
                events = int(headers.get(b"x-emu-stream-events", b"5"))
                interval = float(headers.get(b"x-emu-stream-interval-ms", b"0"))
                await stream(writer, events, interval)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(COMPLETION), COMPLETION))
                await writer.drain()
            if headers.get(b"connection", b"").lower() == b"close":
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    a = ap.parse_args()
    gc.set_threshold(50000, 20, 20)  # rare collector pauses between an event's stamp and its write
    host, port = a.listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port), backlog=4096)
    h, p = server.sockets[0].getsockname()[:2]
    print(f"listening on {h}:{p}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
