"""Router overhead: CPU time per request and per streamed chunk, herd beside bare proxies.

Processes on 127.0.0.1, all started by this script and all running for the whole run:

- a fast fake Ollama (``bench/fake_ollama.py``): pre-rendered answers, every API shape;
- two bare pass-through proxies (``bench/bare_proxy.py``): hypercorn + httpx (the floor of
  herd's own stack) and hypercorn + httpcore; no routing, no parsing;
- herd: a router (``herd``) and a node agent (``herd serve --role node``) reporting the fake.
  On loopback the router calls the backend directly, so the node agent is not on the request
  path: only the router's CPU is counted (the agent's, heartbeats only, is shown apart);
- this process, the load generator: raw trio sockets, keep-alive connections, requests
  rendered once. Its CPU and the fake's are not counted.

What is measured is the CPU time (``utime + stime`` from ``/proc/<pid>/stat``, every thread)
each proxy process spends on a phase of the run, read before it and after it has settled
(:data:`SETTLE`, longer than herd's trace batches take to be written). Within a phase the
proxies take turns, :data:`ROUND` requests at a time, so all of them see the same load from
whatever else the machine runs; the CPU a proxy spends idle meanwhile (herd: heartbeats, its
timers) is counted too, and is small. Wall-clock latency on a shared machine says little; CPU
per request says what a router core can carry. Per path:

- **µs per request**: short answers (one token), non-streamed (streamed on the Ollama stream
  row), ``--requests`` of them at ``--concurrency``;
- **µs per chunk**: streams of ``--chunks`` tokens against streams of one token (the same
  count, at ``--stream-concurrency``), the difference divided by the chunks between them. The
  fake writes ``--tokens-per-write`` tokens per write, ``--gap-ms`` apart, so a relay reads one
  write at a time as it would from a real model. On the Ollama non-streamed row the chunks are
  what herd reads from the backend and folds into one answer (herd always streams from the
  backend); a bare proxy relays one body there, so that ratio is not shown.

Each figure is the median over ``--repeats`` (the spread is min-max), and the ratios are
against bare hypercorn + httpx measured in the same run, so they hold on any machine.

CPU time on a shared machine moves from minute to minute. ``--instructions`` counts machine
instructions instead: the proxies (bare and herd's routers) run under valgrind's callgrind, and
each one's count is read before and after each phase (``callgrind_control``). The counts are the
same within about 1% on every run, whatever else the machine does; they leave out the kernel's
side (socket calls). Under valgrind a process runs some fifty times slower, so the fake writes
50 ms apart and two streams run at once: each write is still read alone, as at full speed (a
router that read several writes at once would send them as one chunk and look cheaper).

    python bench/overhead.py                  # the full run (about 10 minutes on 2 cores)
    python bench/overhead.py --quick          # a smoke run (a minute)
    python bench/overhead.py --tokens-per-write 5   # several tokens per read
    python bench/overhead.py --instructions   # counted by valgrind (about 12 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODEL = "bench:latest"
READ = 65536
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# Seconds after a batch before its CPU is read (herd's trace batches flush within 0.5 s).
SETTLE = 0.8
ROUND = 50  # requests (or streams) a proxy gets before the next one takes its turn

SYSTEM = (
    "You are a helpful assistant for a small engineering team. Answer briefly and precisely, "
    "cite the file you are talking about, and say so when you are not sure. " * 4
)
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What does the router do with a request it cannot place?"},
    {"role": "assistant", "content": "It waits for the fleet to change, up to queue_timeout."},
    {"role": "user", "content": "And then?"},
]


@dataclass(frozen=True)
class Row:
    name: str
    path: str
    request_stream: bool  # the per-request figure: streamed or not
    chunk_stream: bool  # the per-chunk figure
    chunk_ratio: bool = True  # is the bare proxy's per-chunk figure a fair baseline?


ROWS = (
    Row("ollama /api/chat", "/api/chat", False, False, chunk_ratio=False),
    Row("ollama /api/chat stream", "/api/chat", True, True),
    Row("openai /v1/chat/completions", "/v1/chat/completions", False, True),
    Row("anthropic /v1/messages", "/v1/messages", False, True),
    Row("openai /v1/responses", "/v1/responses", False, True),
)


def request_body(path: str, stream: bool, tokens: int) -> dict[str, object]:
    if path == "/api/chat":
        return {
            "model": MODEL,
            "messages": CONVERSATION,
            "stream": stream,
            "options": {"num_predict": tokens},
        }
    if path == "/v1/chat/completions":
        return {"model": MODEL, "messages": CONVERSATION, "stream": stream, "max_tokens": tokens}
    if path == "/v1/messages":
        return {
            "model": MODEL,
            "system": SYSTEM,
            "messages": CONVERSATION[1:],
            "stream": stream,
            "max_tokens": tokens,
        }
    return {
        "model": MODEL,
        "instructions": SYSTEM,
        "input": CONVERSATION[1:],
        "stream": stream,
        "max_output_tokens": tokens,
    }


def render(port: int, path: str, stream: bool, tokens: int) -> bytes:
    body = json.dumps(request_body(path, stream, tokens)).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


# --- the load generator: raw sockets, just enough HTTP/1.1 to find where answers end --------


class Connection:
    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.buffer = bytearray()

    async def open(self) -> None:
        self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        self.stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    async def _more(self) -> None:
        assert self.stream is not None
        data = await self.stream.receive_some(READ)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        self.buffer += data

    async def exchange(self, request: bytes, keep: bool = False) -> tuple[int, bytes]:
        """Send one request, read its answer; the body only if ``keep``. A connection the
        proxy closed while idle is opened again (once)."""
        if self.stream is None:
            await self.open()
        assert self.stream is not None
        try:
            await self.stream.send_all(request)
            await self._more()
        except (ConnectionError, trio.BrokenResourceError):
            await self.stream.aclose()
            await self.open()
            await self.stream.send_all(request)
        buffer = self.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            await self._more()
        head = bytes(buffer[:end]).lower()
        del buffer[: end + 4]
        status = int(head[9:12])
        kept = bytearray()
        if b"transfer-encoding: chunked" in head:
            while True:
                while (line := buffer.find(b"\r\n")) < 0:
                    await self._more()
                size = int(buffer[:line].split(b";")[0], 16)
                while len(buffer) < line + 2 + size + 2:
                    await self._more()
                if keep:
                    kept += buffer[line + 2 : line + 2 + size]
                del buffer[: line + 2 + size + 2]
                if size == 0:
                    break
        else:
            start = head.find(b"content-length:")
            length = int(head[start + 15 : head.find(b"\r\n", start)]) if start >= 0 else 0
            while len(buffer) < length:
                await self._more()
            if keep:
                kept += buffer[:length]
            del buffer[:length]
        return status, bytes(kept)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def instructions(pid: int) -> float:
    """Machine instructions a process run under callgrind has executed so far (all threads:
    callgrind counts them together unless told not to), asked of it by ``callgrind_control``."""
    answer = subprocess.run(
        ["callgrind_control", "-e", "Ir", str(pid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    counts = [
        int(n.replace(",", "")) for n in re.findall(r"^\s*Th \d+\s+([\d,]+)\s*$", answer, re.M)
    ]
    if not counts:
        raise RuntimeError(f"callgrind_control gave no count for pid {pid}: {answer[-300:]!r}")
    return float(sum(counts))


@dataclass(frozen=True)
class Meter:
    """What a proxy's work is measured in: CPU time from /proc (µs), or, with
    ``--instructions``, machine instructions counted by valgrind's callgrind (thousands), which
    come out the same on every run whatever else the machine is doing, but leave out the
    kernel's side (socket calls) and run the measured processes some fifty times slower."""

    unit: str  # per request and per chunk
    read: Callable[[int], float]  # a process's count so far, in ``unit``
    prefix: tuple[str, ...] = ()  # the command the measured processes run under


CPU = Meter("us", lambda pid: cpu_seconds(pid) * 1e6)
INSTRUCTIONS = Meter(
    "k instr",
    lambda pid: instructions(pid) / 1e3,
    ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
)


@dataclass
class Proxy:
    name: str
    port: int
    pid: int
    herd: bool = False
    connections: list[Connection] = field(default_factory=list)

    async def connect(self, count: int) -> None:
        while len(self.connections) < count:
            connection = Connection(self.port)
            await connection.open()
            self.connections.append(connection)


async def run_batch(proxy: Proxy, request: bytes, total: int, concurrency: int) -> None:
    await proxy.connect(concurrency)
    remaining = total

    async def worker(connection: Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            status, _ = await connection.exchange(request)
            if status != 200:
                raise RuntimeError(f"{proxy.name}: HTTP {status}")

    async with trio.open_nursery() as nursery:
        for connection in proxy.connections[:concurrency]:
            nursery.start_soon(worker, connection)


async def check(proxy: Proxy, path: str, stream: bool, tokens: int) -> None:
    """One request whose answer is read and checked: 200 and every token there."""
    await proxy.connect(1)
    status, body = await proxy.connections[0].exchange(
        render(proxy.port, path, stream, tokens), keep=True
    )
    if status != 200 or body.count(b"tok") < tokens:
        raise RuntimeError(
            f"{proxy.name} {path} stream={stream}: HTTP {status}, "
            f"{body.count(b'tok')} of {tokens} tokens: {body[:300]!r}"
        )


async def measure(
    proxies: Sequence[Proxy],
    requests: dict[str, bytes],
    total: int,
    concurrency: int,
    settings: Settings,
) -> dict[str, float]:
    """The work (``settings.meter``) each proxy spends on ``total`` requests
    (``requests[proxy.name]``), the proxies taking turns in rounds of :data:`ROUND` so that all
    of them run under the same load from whatever else the machine is doing; read after
    everything has settled."""
    read = settings.meter.read
    before = {proxy.name: read(proxy.pid) for proxy in proxies}
    done = 0
    while done < total:
        batch = min(ROUND if settings.rounds else total, total - done)
        for proxy in proxies:
            await run_batch(proxy, requests[proxy.name], batch, concurrency)
        done += batch
    await trio.sleep(settings.settle)
    return {proxy.name: read(proxy.pid) - before[proxy.name] for proxy in proxies}


@dataclass
class Settings:
    requests: int
    concurrency: int
    streams: int
    stream_concurrency: int
    chunks: int
    repeats: int
    settle: float = SETTLE
    rounds: bool = True  # proxies take turns (see measure)
    meter: Meter = CPU


@dataclass
class Result:
    per_request: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    per_chunk: dict[tuple[str, str], list[float]] = field(default_factory=dict)


def rendered(proxies: Sequence[Proxy], path: str, stream: bool, tokens: int) -> dict[str, bytes]:
    return {p.name: render(p.port, path, stream, tokens) for p in proxies}


async def bench(proxies: list[Proxy], settings: Settings, result: Result) -> None:
    s = settings
    for proxy in proxies:  # warm up: every path and shape, answers checked
        for row in ROWS:
            for stream in {row.request_stream, row.chunk_stream}:
                await check(proxy, row.path, stream, 1)
                await check(proxy, row.path, stream, s.chunks)
        await run_batch(proxy, render(proxy.port, "/api/chat", True, 4), 50, s.concurrency)
    for repeat in range(s.repeats):
        for row in ROWS:
            order = proxies if repeat % 2 == 0 else proxies[::-1]

            cpu = await measure(
                order,
                rendered(order, row.path, row.request_stream, 1),
                s.requests,
                s.concurrency,
                s,
            )
            for name, spent in cpu.items():
                result.per_request.setdefault((row.name, name), []).append(spent / s.requests)
            one = rendered(order, row.path, row.chunk_stream, 1)
            many = rendered(order, row.path, row.chunk_stream, s.chunks)
            base = await measure(order, one, s.streams, s.stream_concurrency, s)
            long = await measure(order, many, s.streams, s.stream_concurrency, s)
            for name in base:
                result.per_chunk.setdefault((row.name, name), []).append(
                    (long[name] - base[name]) / s.streams / (s.chunks - 1)
                )
            print(f"  repeat {repeat + 1}/{s.repeats}: {row.name} done", file=sys.stderr)


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):>7,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def report(
    result: Result, names: Sequence[str], node_cpu: float, seconds: float, unit: str = "us"
) -> str:
    lines = []
    header = (
        f"{'path':<28} {'proxy':<14} {unit + '/request (min-max)':>24} {'x bare':>7} "
        f"{unit + '/chunk (min-max)':>22} {'x bare':>7}"
    )
    lines += [header, "-" * len(header)]
    for row in ROWS:
        base_request = statistics.median(result.per_request[(row.name, "bare httpx")])
        base_chunk = statistics.median(result.per_chunk[(row.name, "bare httpx")])
        for proxy in names:
            request = result.per_request[(row.name, proxy)]
            chunk = result.per_chunk[(row.name, proxy)]
            chunk_ratio = (
                f"{statistics.median(chunk) / base_chunk:>7.2f}"
                if row.chunk_ratio and base_chunk > 0
                else f"{'-':>7}"
            )
            lines.append(
                f"{row.name if proxy == names[0] else '':<28} {proxy:<14} "
                f"{spread(request):>24} {statistics.median(request) / base_request:>7.2f} "
                f"{spread(chunk):>22} {chunk_ratio}"
            )
    lines.append(
        f"herd node agent (not on the path, heartbeats): {node_cpu:.2f} s CPU over {seconds:.0f} s"
    )
    return "\n".join(lines)


# --- the processes --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def processes(
    tokens_per_write: int,
    gap_ms: float,
    herds: Sequence[tuple[str, Path]],
    measured_under: Sequence[str] = (),
) -> Iterator[tuple[list[Proxy], list[int]]]:
    """Start the fake, the bare proxies, and a router and node agent of each herd checkout
    (label, directory); stop them all after. Yields the proxies and the node agents' pids.
    The proxies (the bare ones and herd's routers) run under ``measured_under``, if given."""
    children: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:

        def start(*argv: str, tree: Path = ROOT, measured: bool = False) -> subprocess.Popen[bytes]:
            env = {
                **os.environ,
                "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "FLEET_MDNS": "false",
            }
            child = subprocess.Popen(
                [*(measured_under if measured else ()), sys.executable, *argv],
                env=env,
                cwd=tree,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            children.append(child)
            return child

        try:
            port_file = Path(tmp) / "fake.port"
            start(
                str(BENCH / "fake_ollama.py"),
                "--port-file",
                str(port_file),
                "--tokens-per-write",
                str(tokens_per_write),
                "--gap-ms",
                str(gap_ms),
            )
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text().strip():
                if time.monotonic() > deadline:
                    raise RuntimeError("the fake backend did not start")
                time.sleep(0.05)
            fake = f"http://127.0.0.1:{port_file.read_text().strip()}"
            proxies = []
            for client in ("httpx", "httpcore"):
                port = free_port()
                child = start(
                    str(BENCH / "bare_proxy.py"),
                    "--client",
                    client,
                    "--port",
                    str(port),
                    "--upstream",
                    fake,
                    measured=True,
                )
                proxies.append(Proxy(f"bare {client}", port, child.pid))
            nodes = []
            for index, (label, tree) in enumerate(herds):
                port = free_port()
                data = Path(tmp) / f"herd-{index}"
                router = start(
                    "-m",
                    "herd",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--data-dir",
                    str(data / "router"),
                    tree=tree,
                    measured=True,
                )
                proxies.append(Proxy(label, port, router.pid, herd=True))
                node = start(
                    "-m",
                    "herd",
                    "serve",
                    "--role",
                    "node",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                    "--router-url",
                    f"http://127.0.0.1:{port}",
                    "--ollama-url",
                    fake,
                    "--node-id",
                    "bench",
                    "--parallel-slots",
                    "64",
                    "--data-dir",
                    str(data / "node"),
                    tree=tree,
                )
                nodes.append(node.pid)
            yield proxies, nodes
        finally:
            for child in reversed(children):
                child.terminate()
            for child in children:
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()


async def wait_ready(proxies: list[Proxy], limit: float = 60) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=limit) as client:
        with trio.fail_after(limit):
            for proxy in proxies:
                while True:
                    try:
                        if proxy.herd:
                            status = (
                                await client.get(f"http://127.0.0.1:{proxy.port}/fleet/status")
                            ).json()
                            if status["fleet"]["nodes_online"] >= 1:
                                tags = await client.get(f"http://127.0.0.1:{proxy.port}/api/tags")
                                if MODEL in tags.text:
                                    break
                        else:
                            await client.get(f"http://127.0.0.1:{proxy.port}/api/version")
                            break
                    except (httpx.HTTPError, KeyError, ValueError):
                        pass
                    await trio.sleep(0.1)


async def run(
    settings: Settings,
    tokens_per_write: int,
    gap_ms: float,
    herds: Sequence[tuple[str, Path]],
    out: str | None,
) -> None:
    meter = settings.meter
    with processes(tokens_per_write, gap_ms, herds, meter.prefix) as (proxies, node_pids):
        await wait_ready(proxies, 600 if meter.prefix else 60)
        started = time.monotonic()
        node_before = sum(cpu_seconds(pid) for pid in node_pids)
        result = Result()
        await bench(proxies, settings, result)
        node_cpu = (sum(cpu_seconds(pid) for pid in node_pids) - node_before) / len(node_pids)
        seconds = time.monotonic() - started
        for proxy in proxies:
            for connection in proxy.connections:
                if connection.stream is not None:
                    await connection.stream.aclose()
    print(
        f"requests {settings.requests} at c={settings.concurrency}; streams {settings.streams} "
        f"at c={settings.stream_concurrency}, {settings.chunks} tokens vs 1, "
        f"{tokens_per_write} per write, {gap_ms:g} ms apart; {settings.repeats} repeats"
    )
    print(report(result, [p.name for p in proxies], node_cpu, seconds, meter.unit))
    if out:
        data = {
            "settings": {
                **{k: v for k, v in settings.__dict__.items() if k != "meter"},
                "unit": settings.meter.unit,
                "tokens_per_write": tokens_per_write,
            },
            "per_request": {f"{k[0]} | {k[1]}": v for k, v in result.per_request.items()},
            "per_chunk": {f"{k[0]} | {k[1]}": v for k, v in result.per_chunk.items()},
        }
        data["settings"]["gap_ms"] = gap_ms
        await trio.Path(out).write_text(json.dumps(data, indent=1))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, 1 repeat")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="default 3 (1 with --quick, 2 with --instructions)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="per batch (default 600, 100 with --instructions)",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--streams", type=int, default=None, help="per batch (default 100, 8 with --instructions)"
    )
    parser.add_argument(
        "--stream-concurrency", type=int, default=None, help="default 4 (2 with --instructions)"
    )
    parser.add_argument("--chunks", type=int, default=41, help="tokens in a long stream")
    parser.add_argument("--tokens-per-write", type=int, default=1)
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=None,
        help="between the fake's writes (default 2, 50 with --instructions)",
    )
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count machine instructions (valgrind's callgrind) instead of CPU time: the same "
        "on every run; about fifty times slower, so fewer requests",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also run the herd of another checkout (e.g. a git worktree of an older commit)",
    )
    args = parser.parse_args(argv)
    counted = args.instructions
    if counted and shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (apt install valgrind)")
    settings = Settings(
        requests=args.requests or (60 if args.quick else 100 if counted else 600),
        concurrency=args.concurrency,
        streams=args.streams or (8 if args.quick or counted else 100),
        # Under valgrind a router is slow enough to read several of the fake's writes at once
        # (one read, one send: fewer instructions per chunk than one write at a time costs), so
        # its writes come further apart and fewer streams run at once.
        stream_concurrency=args.stream_concurrency or (2 if counted else 4),
        chunks=args.chunks if not args.quick else min(args.chunks, 11),
        repeats=args.repeats or (1 if args.quick else 2 if counted else 3),
        # Under valgrind herd's trace batches take longer to be written.
        settle=(0.2 if args.quick else SETTLE) * (5 if counted else 1),
        meter=INSTRUCTIONS if counted else CPU,
    )
    herds = [("herd", ROOT)]
    for item in args.compare:
        label, _, tree = item.rpartition("=")
        herds.append((label or f"herd {Path(tree).name}", Path(tree).resolve()))
    gap_ms = args.gap_ms if args.gap_ms is not None else 50.0 if counted else 2.0
    trio.run(run, settings, args.tokens_per_write, gap_ms, herds, args.json)


if __name__ == "__main__":
    main()
