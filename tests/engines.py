"""Real shared engines for the scale-out tests: a private Redis-protocol server and a private
PostgreSQL, each started from the Debian package's binaries on loopback in a temporary
directory, once per test session, and stopped at its end.

``.ci/run`` installs the packages (``redis-server``, ``postgresql``). Readiness is read from
the server's own log line, not polled. PostgreSQL refuses to run as root: as root, its
programs run as the ``postgres`` user the package creates.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

READY_WITHIN = 60.0  # seconds a server may take to say it is ready


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_line(process: subprocess.Popen[str], marker: str, what: str) -> threading.Thread:
    """Read the process's output until ``marker`` appears (or it exits, or READY_WITHIN). The
    returned thread keeps reading (so the server never blocks on a full pipe) and closes the
    pipe when the process ends."""
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        with process.stdout:
            for line in process.stdout:
                seen.append(line)
                del seen[:-30]
                if marker in line:
                    found.set()
        found.set()  # EOF: the process ended

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not found.wait(READY_WITHIN) or process.poll() is not None:
        _stop(process, reader)
        raise RuntimeError(f"{what} did not start:\n" + "".join(seen))
    return reader


def _stop(process: subprocess.Popen[str], reader: threading.Thread | None) -> None:
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(20)
    if process.poll() is None:
        process.kill()
        process.wait()
    if reader is not None:
        reader.join(10)


def redis_binary() -> str:
    for name in ("valkey-server", "redis-server"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no valkey-server or redis-server on PATH (.ci/run installs redis-server)")


@contextlib.contextmanager
def redis_server(directory: Path, *extra: str, port: int | None = None) -> Iterator[str]:
    """A private server (on ``port``, else a free one); yields its ``valkey://127.0.0.1:PORT/0``
    URL. A test that stops it can start another on the same port: the store came back."""
    port = port or free_port()
    argv = [
        redis_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
        "--loglevel", "notice",
        *extra,
    ]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = _wait_for_line(process, "Ready to accept connections", "redis-server")
    try:
        yield f"valkey://127.0.0.1:{port}/0"
    finally:
        _stop(process, reader)


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries (.ci/run installs postgresql)")
    return found[-1].parent


def _as_postgres(argv: Sequence[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return list(argv)


@contextlib.contextmanager
def postgres_server(directory: Path) -> Iterator[str]:
    """A private cluster with trust auth on loopback; yields a ``postgresql://`` URL.

    As root the cluster lives in a directory of its own under the system's temporary
    directory (the ``postgres`` user can't enter pytest's, which only root may), removed
    after."""
    binaries = postgres_bin()
    if os.geteuid() == 0:
        own = Path(tempfile.mkdtemp(prefix="herd-postgres-"))
        try:
            shutil.chown(own, "postgres")
            with _postgres_in(binaries, own) as url:
                yield url
        finally:
            shutil.rmtree(own, ignore_errors=True)
    else:
        with _postgres_in(binaries, directory) as url:
            yield url


@contextlib.contextmanager
def _postgres_in(binaries: Path, directory: Path) -> Iterator[str]:
    data = directory / "pgdata"
    data.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    subprocess.run(
        _as_postgres(
            [str(binaries / "initdb"), "-D", str(data), "-U", "herd", "--auth=trust", "-E", "UTF8"]
        ),
        check=True,
        capture_output=True,
    )
    port = free_port()
    process = subprocess.Popen(
        _as_postgres(
            [
                str(binaries / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={directory}",
                "-c",
                "fsync=off",
            ]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_line(process, "database system is ready to accept connections", "postgresql")
        yield f"postgresql://herd@127.0.0.1:{port}/postgres"
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(20)
        if process.poll() is None:
            process.kill()
