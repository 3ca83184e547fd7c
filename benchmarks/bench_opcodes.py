"""Python bytecodes executed per connect+close: pgproto's adapters and psycopg.

Run from the repository root::

    python benchmarks/bench_opcodes.py [-n N] [--top K]

Client CPU per connection (``bench_connect.py``) drifts by tens of percent on
a shared machine; the number of Python bytecodes a connection executes does
not, so this is the measure to hunt regressions with.  Every client connects
N times (after a warm-up) over a Unix socket to an in-process fake server that
answers each startup packet with the burst PostgreSQL 18 sent in the recorded
transcript ``tests/data/transcripts/trust_unix_pg18.json`` (AuthenticationOk,
ParameterStatus x 15, BackendKeyData, ReadyForQuery) and waits for Terminate.
A ``sys.settrace`` hook with ``f_trace_opcodes`` counts the bytecodes the
client's thread executes, by source file, less those of a batch of no
connections (an event loop's start and stop); the server's thread is not
traced.

Only Python is counted: libpq's work under psycopg (C) is not, and neither is
what a bytecode costs -- which roughly doubles when the caches are cold, as
they are between two connections to a real server.  It tells how much Python
a connection runs, not what it costs against libpq: ``bench_connect.py`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Final

import anyio
import pgproto_adapters.anyio as pgproto_anyio
import pgproto_adapters.asyncio as pgproto_asyncio
import pgproto_adapters.trio as pgproto_trio
import psycopg
import trio
from pgproto_adapters import blocking as pgproto_blocking

TRANSCRIPT: Final = (
    Path(__file__).resolve().parent.parent / "tests/data/transcripts/trust_unix_pg18.json"
)
READY_IDLE: Final = b"Z\x00\x00\x00\x05I"


def startup_burst() -> bytes:
    """What the server sent after the startup packet, up to its ReadyForQuery."""
    steps = json.loads(TRANSCRIPT.read_text())["steps"]
    sent = b"".join(bytes.fromhex(data) for kind, data in steps if kind == "server")
    return sent[: sent.index(READY_IDLE) + len(READY_IDLE)]


class FakeServer:
    """A Unix socket in a temporary directory; a daemon thread answers every
    connection with *burst* and closes it after the client's next message."""

    def __init__(self, burst: bytes) -> None:
        self.directory = tempfile.TemporaryDirectory(prefix="pgproto-opcodes-")
        self.port = 5432
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(f"{self.directory.name}/.s.PGSQL.{self.port}")
        self.listener.listen(64)
        self.burst = burst
        self.thread = threading.Thread(target=self._serve, name="fake server", daemon=True)
        self.thread.start()

    @property
    def conninfo(self) -> str:
        return f"host={self.directory.name} port={self.port} user=postgres dbname=postgres"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            with conn:
                conn.recv(65536)  # the startup packet
                conn.sendall(self.burst)
                conn.recv(65536)  # Terminate (or the end of the stream)

    def close(self) -> None:
        """Stop the thread (on Linux, shutdown() wakes its accept(); close()
        alone would not) and remove the socket's directory."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:  # not here: the daemon thread stays in accept()
            woken = False
        else:
            woken = True
        self.listener.close()
        if woken:
            self.thread.join()
        self.directory.cleanup()


def clients(conninfo: str) -> dict[str, Callable[[int], None]]:
    """Each client: a function that connects and closes N times."""

    async def asyncio_loop(n: int) -> None:
        for _ in range(n):
            await (await pgproto_asyncio.connect(conninfo)).close()

    async def trio_loop(n: int) -> None:
        for _ in range(n):
            await (await pgproto_trio.connect(conninfo)).close()

    async def anyio_loop(n: int) -> None:
        for _ in range(n):
            await (await pgproto_anyio.connect(conninfo)).close()

    async def psycopg_async_loop(n: int) -> None:
        for _ in range(n):
            await (await psycopg.AsyncConnection.connect(conninfo)).close()

    def blocking(n: int) -> None:
        for _ in range(n):
            pgproto_blocking.connect(conninfo).close()

    def psycopg_sync(n: int) -> None:
        for _ in range(n):
            psycopg.connect(conninfo).close()

    return {
        "psycopg sync (libpq)": psycopg_sync,
        "psycopg async (libpq)": lambda n: asyncio.run(psycopg_async_loop(n)),
        "pgproto blocking": blocking,
        "pgproto asyncio": lambda n: asyncio.run(asyncio_loop(n)),
        "pgproto trio": lambda n: trio.run(trio_loop, n),
        "pgproto anyio (asyncio)": lambda n: anyio.run(anyio_loop, n),
    }


def count_opcodes(run: Callable[[int], None], n: int) -> collections.Counter[str]:
    """Bytecodes executed by this thread during ``run(n)``, by source file."""
    counts: collections.Counter[str] = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[frame.f_code.co_filename] += 1
        return tracer

    sys.settrace(tracer)
    try:
        run(n)
    finally:
        sys.settrace(None)
    return counts


def _where(filename: str) -> str:
    """A short name for a source file: package-relative when it is in one."""
    path = Path(filename)
    for marker in ("site-packages", "adapters", "lib"):
        if marker in path.parts:
            parts = path.parts[path.parts.index(marker) + 1 :]
            return "/".join(parts[-2:]) if parts else path.name
    if path.parent.name == "pgproto":
        return f"pgproto/{path.name}"
    return path.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=20, help="traced connections per client (20)")
    parser.add_argument("--top", type=int, default=6, help="source files shown per client (6)")
    args = parser.parse_args(argv)
    server = FakeServer(startup_burst())
    try:
        results = {}
        for name, run in clients(server.conninfo).items():
            run(10)  # warm-up: imports, caches
            # Less what starting and stopping the event loop costs (trio.run,
            # asyncio.run: once per batch, not per connection).
            counts = count_opcodes(run, args.n)
            counts.subtract(count_opcodes(run, 0))
            results[name] = +counts
        print(f"Python bytecodes per connect+close (mean of {args.n}), Unix socket, trust")
        print(f"(fake server replaying {TRANSCRIPT.name}; C code such as libpq is not counted)")
        for name, counts in results.items():
            total = sum(counts.values()) / args.n
            print(f"\n{name:<26} {total:8.0f}")
            for filename, count in counts.most_common(args.top):
                print(f"    {_where(filename):<36} {count / args.n:8.0f}")
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
