"""Fixtures for the mcp-relay end-to-end tests (official Python SDK `mcp` as the client).

Everything runs on loopback with ports chosen by the OS. Every process we start gets its own
process group (session), and teardown always kills those groups, plus the groups of the
relay's own backend children (the relay starts each backend in a group of its own).

Binaries are used as built (`target/debug/mcp-relay`, `target/debug/mcp-example-server`);
these tests never build. Relay stderr is captured with RUST_LOG=debug and the part written
during a failing test is attached to its report.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest

from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

ROOT = Path(__file__).resolve().parents[2]
RELAY = ROOT / "target" / "debug" / "mcp-relay"
EXAMPLE = ROOT / "target" / "debug" / "mcp-example-server"
MCP_NODE_MODULES = ROOT / "node_modules" / "@modelcontextprotocol"
EVERYTHING_JS = MCP_NODE_MODULES / "server-everything" / "dist" / "index.js"
FILESYSTEM_JS = MCP_NODE_MODULES / "server-filesystem" / "dist" / "index.js"
MEMORY_JS = MCP_NODE_MODULES / "server-memory" / "dist" / "index.js"
LOOPBACK_PRELOAD = Path(__file__).resolve().parent / "loopback_listen.cjs"

# Generous limits: the machine has 2 cores and may be busy compiling.
START_TIMEOUT_S = 60.0  # a process announcing its port / a backend appearing in the catalog
CALL_TIMEOUT_S = 60.0  # one client request (the relay's own request timeout is 30 s)
KILL_GRACE_S = 5.0
RELAY_LOG_LEVEL = os.environ.get("RUST_LOG", "debug")

PROTOCOL_VERSION = "2025-11-25"


def node_binary() -> str:
    node = os.environ.get("MCP_TEST_NODE") or shutil.which("node")
    if not node:
        pytest.fail("node is not on PATH; run scripts/setup-test-deps.sh")
    return node


# --------------------------------------------------------------------------- processes


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) for every process we can see."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            table[int(entry)] = (int(fields[1]), int(fields[2]))
        except (OSError, ValueError, IndexError):
            continue
    return table


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True



def request_message(client: Any, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The next JSON-RPC request of a raw client (its `next_id` counter is advanced)."""
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": client.next_id, "method": method}
    client.next_id += 1
    if params is not None:
        msg["params"] = params
    return msg

class ProcessTree:
    """A process we started in its own session, plus the process groups of its descendants."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self.pgids: set[int] = {pid}

    def snapshot(self) -> None:
        """Records the process groups of every current descendant (backends, their children)."""
        table = _proc_table()
        todo = [self.pid]
        seen: set[int] = set()
        while todo:
            parent = todo.pop()
            for child, (ppid, pgid) in table.items():
                if ppid == parent and child not in seen:
                    seen.add(child)
                    self.pgids.add(pgid)
                    todo.append(child)

    def _exited(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is not None
        return not _alive(self.pid)

    def kill(self, grace: float = KILL_GRACE_S) -> None:
        """SIGTERM the leader's group (the relay drains and stops its backends), wait a little,
        then SIGKILL every group we ever saw."""
        if not self._exited():
            self.snapshot()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and not self._exited():
                time.sleep(0.05)
        for pgid in sorted(self.pgids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)


def wait_for_log(path: Path, pattern: str, tree: ProcessTree, timeout: float = START_TIMEOUT_S) -> re.Match[str]:
    """Waits until `pattern` shows up in the log file a process writes."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        m = rx.search(text)
        if m:
            return m
        if tree.popen is not None and tree.popen.poll() is not None:
            raise RuntimeError(f"process exited ({tree.popen.returncode}) before printing {pattern!r}:\n{text[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {pattern!r} within {timeout} s:\n{text[-4000:]}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- logs on failure


class LogRegistry:
    """Log files a test used; the part written during the test is attached if it fails."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Path, int]] = []

    def add(self, label: str, path: Path) -> None:
        start = path.stat().st_size if path.exists() else 0
        self.entries.append((label, path, start))

    def render(self, limit: int = 12000) -> list[tuple[str, str]]:
        out = []
        for label, path, start in self.entries:
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(start)
                text = f.read().decode("utf-8", "replace")
            if len(text) > limit:
                text = "...\n" + text[-limit:]
            out.append((f"{label} ({path})", text))
        return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    logs: LogRegistry | None = getattr(item, "_relay_logs", None)
    if logs is not None and report.failed and report.when in ("call", "setup"):
        for title, text in logs.render():
            report.sections.append((title, text))


@pytest.fixture
def logs(request: pytest.FixtureRequest) -> LogRegistry:
    reg = LogRegistry()
    request.node._relay_logs = reg
    return reg


# --------------------------------------------------------------------------- configs


def server_entries(workdir: Path, everything_http_url: str | None) -> dict[str, Any]:
    """The standard backend set: everything (stdio), fs, memory, ex, and everything over HTTP."""
    node = node_binary()
    fs_root = workdir / "fsroot"
    fs_root.mkdir(parents=True, exist_ok=True)
    servers: dict[str, Any] = {
        "everything": {"command": node, "args": [str(EVERYTHING_JS), "stdio"]},
        "fs": {"command": node, "args": [str(FILESYSTEM_JS), str(fs_root)]},
        "memory": {
            "command": node,
            "args": [str(MEMORY_JS)],
            "env": {"MEMORY_FILE_PATH": str(workdir / "memory.jsonl")},
        },
        "ex": {"command": str(EXAMPLE), "args": ["--name", "ex"]},
    }
    if everything_http_url:
        servers["evh"] = {"type": "http", "url": everything_http_url}
    return servers


def write_config(workdir: Path, servers: dict[str, Any], name: str | None = None, **relay: Any) -> Path:
    settings = {"requestTimeoutMs": 30000, "startupWaitMs": 30000}
    settings.update(relay)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / (name or f"relay-{uuid.uuid4().hex[:8]}.json")
    path.write_text(json.dumps({"mcpServers": servers, "relay": settings}, indent=2))
    return path


# --------------------------------------------------------------------------- server-everything over HTTP


@contextlib.contextmanager
def everything_listening(workdir: Path, mode: str) -> Iterator[int]:
    """server-everything in a network `mode` (`streamableHttp`, `sse`) on 127.0.0.1, port
    from the OS; stopped (process group) on exit."""
    log = workdir / f"everything-{mode}.log"
    with open(log, "wb") as f:
        popen = subprocess.Popen(
            [node_binary(), "--require", str(LOOPBACK_PRELOAD), str(EVERYTHING_JS), mode],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=f,
            env=dict(os.environ, PORT="0"),
            cwd=workdir,
            start_new_session=True,
        )
    tree = ProcessTree(popen.pid, popen)
    try:
        m = wait_for_log(log, r"LOOPBACK_LISTEN 127\.0\.0\.1 (\d+)", tree)
        yield int(m.group(1))
    finally:
        tree.kill()


@pytest.fixture(scope="session")
def everything_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """server-everything in Streamable HTTP mode on 127.0.0.1, port from the OS."""
    with everything_listening(tmp_path_factory.mktemp("everything-http"), "streamableHttp") as port:
        yield f"http://127.0.0.1:{port}/mcp"


# --------------------------------------------------------------------------- the relay over HTTP


class HttpRelay:
    """`mcp-relay serve` on 127.0.0.1:0 in its own process group."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        env = dict(os.environ, RUST_LOG=RELAY_LOG_LEVEL)
        with open(log, "wb") as f:
            self.popen = subprocess.Popen(
                [str(RELAY), "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                env=env,
                cwd=config.parent,
                start_new_session=True,
            )
        self.tree = ProcessTree(self.popen.pid, self.popen)
        try:
            m = wait_for_log(log, r"mcp-relay listening on (http://127\.0\.0\.1:\d+/mcp)", self.tree)
        except BaseException:
            self.tree.kill()
            raise
        self.url = m.group(1)

    def wait_for_tools(self, prefixes: list[str], timeout: float = START_TIMEOUT_S) -> list[str]:
        """Polls tools/list until a tool of every prefix is listed (backends start in the background)."""
        deadline = time.monotonic() + timeout
        names: list[str] = []
        with RawHttp(self.url) as raw:
            raw.initialize()
            while time.monotonic() < deadline:
                reply, _ = raw.rpc("tools/list", {})
                names = [t["name"] for t in reply.get("result", {}).get("tools", [])]
                if all(any(n.startswith(p + "__") for n in names) for p in prefixes):
                    self.tree.snapshot()
                    return names
                time.sleep(0.2)
        raise RuntimeError(f"backends {prefixes} not all listed within {timeout} s; tools: {names}")

    def close(self) -> None:
        self.tree.kill()


@contextlib.contextmanager
def http_relay(config: Path, logs: LogRegistry | None = None, label: str = "relay stderr") -> Iterator[HttpRelay]:
    relay = HttpRelay(config, config.with_suffix(".log"))
    if logs is not None:
        logs.entries.append((label, relay.log, 0))
    try:
        yield relay
    finally:
        relay.close()


STANDARD_PREFIXES = ["everything", "fs", "memory", "ex", "evh"]


@pytest.fixture(scope="session")
def shared_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("relay-shared")


@pytest.fixture(scope="session")
def shared_http_relay(shared_workdir: Path, everything_http: str) -> Iterator[HttpRelay]:
    """One HTTP relay over the standard backend set, shared by the HTTP-transport tests."""
    config = write_config(shared_workdir, server_entries(shared_workdir, everything_http))
    relay = HttpRelay(config, shared_workdir / "relay-http.log")
    try:
        relay.wait_for_tools(STANDARD_PREFIXES)
        yield relay
    finally:
        relay.close()


# --------------------------------------------------------------------------- SDK clients


@contextlib.asynccontextmanager
async def stdio_relay_client(
    config: Path, log: Path, relay_binary: Path = RELAY, **client_kwargs: Any
) -> AsyncIterator[Client]:
    """The SDK spawns `mcp-relay stdio` (through sh, to learn its pid, written next to `log`
    with the suffix `.pid`) and talks to it."""
    pidfile = log.with_suffix(".pid")
    params = StdioServerParameters(
        command="/bin/sh",
        args=["-c", 'echo $$ > "$0"; exec "$@"', str(pidfile), str(relay_binary), "stdio", "--config", str(config)],
        env={"RUST_LOG": RELAY_LOG_LEVEL},
        cwd=str(config.parent),
    )
    tree: ProcessTree | None = None
    try:
        with open(log, "a", encoding="utf-8") as errlog:
            kwargs: dict[str, Any] = {"mode": "legacy", "cache": None, "read_timeout_seconds": CALL_TIMEOUT_S}
            kwargs.update(client_kwargs)
            async with Client(stdio_client(params, errlog=errlog), **kwargs) as client:
                # A stateless client sends nothing when it connects, so the shell may not
                # have written the pid yet: wait for it (bounded).
                with anyio.fail_after(CALL_TIMEOUT_S):
                    while not pidfile.exists() or not pidfile.read_text().strip():
                        await anyio.sleep(0.02)
                tree = ProcessTree(int(pidfile.read_text().strip()))
                tree.snapshot()
                try:
                    yield client
                finally:
                    tree.snapshot()
    finally:
        if tree is None and pidfile.exists():
            with contextlib.suppress(ValueError):
                tree = ProcessTree(int(pidfile.read_text().strip()))
        if tree is not None:
            tree.kill()


@contextlib.asynccontextmanager
async def http_relay_client(url: str, **client_kwargs: Any) -> AsyncIterator[Client]:
    kwargs: dict[str, Any] = {"mode": "legacy", "cache": None, "read_timeout_seconds": CALL_TIMEOUT_S}
    kwargs.update(client_kwargs)
    async with Client(url, **kwargs) as client:
        yield client


class RelayUnderTest:
    """The relay over one transport; `client()` opens an SDK client session to it."""

    def __init__(self, transport: str, workdir: Path, logs: LogRegistry, http: HttpRelay | None, config: Path) -> None:
        self.transport = transport
        self.workdir = workdir
        self.logs = logs
        self.http = http
        self.config = config
        self.fs_root = workdir / "fsroot"

    def client(self, **client_kwargs: Any) -> contextlib.AbstractAsyncContextManager[Client]:
        if self.transport == "http":
            assert self.http is not None
            return http_relay_client(self.http.url, **client_kwargs)
        log = self.workdir / f"relay-stdio-{uuid.uuid4().hex[:8]}.log"
        log.touch()
        self.logs.add("relay stderr (stdio)", log)
        return stdio_relay_client(self.config, log, **client_kwargs)


@pytest.fixture(scope="session")
def stdio_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("relay-stdio")


@pytest.fixture(params=["stdio", "http"])
def relay(request: pytest.FixtureRequest, logs: LogRegistry, everything_http: str) -> RelayUnderTest:
    if request.param == "http":
        shared: HttpRelay = request.getfixturevalue("shared_http_relay")
        logs.add("relay stderr (http, shared)", shared.log)
        workdir = shared.config.parent
        return RelayUnderTest("http", workdir, logs, shared, shared.config)
    workdir: Path = request.getfixturevalue("stdio_workdir")
    config = workdir / "relay-standard.json"
    if not config.exists():
        write_config(workdir, server_entries(workdir, everything_http), name=config.name)
    return RelayUnderTest("stdio", workdir, logs, None, config)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- raw clients


def parse_http_messages(resp: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an HTTP answer: one JSON body, or the data of SSE events."""
    ctype = resp.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        body = resp.json()
        return body if isinstance(body, list) else [body]
    if ctype.startswith("text/event-stream"):
        out = []
        for block in resp.text.replace("\r\n", "\n").split("\n\n"):
            data = "\n".join(line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:"))
            if data.strip():
                out.append(json.loads(data))
        return out
    return []


class RawHttp:
    """A bare Streamable HTTP client (httpx), for wire-level assertions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(timeout=CALL_TIMEOUT_S)
        self.session_id: str | None = None
        self.next_id = 1

    def __enter__(self) -> RawHttp:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.http.close()

    def headers(self, extra: dict[str, str] | None = None, session: bool = True) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if session and self.session_id:
            h["Mcp-Session-Id"] = self.session_id
            h["MCP-Protocol-Version"] = PROTOCOL_VERSION
        if extra:
            h.update(extra)
        return h

    def post(self, body: Any, extra: dict[str, str] | None = None, session: bool = True) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.http.post(self.url, content=content, headers=self.headers(extra, session))

    def initialize(self, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.post(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": PROTOCOL_VERSION,
                    "capabilities": capabilities or {},
                    "clientInfo": {"name": "raw-http-test", "version": "0"},
                },
            },
            session=False,
        )
        assert r.status_code == 200, (r.status_code, r.text)
        self.session_id = r.headers.get("mcp-session-id")
        assert self.session_id, f"initialize answered without Mcp-Session-Id: {dict(r.headers)}"
        note = self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert note.status_code == 202, (note.status_code, note.text)
        return parse_http_messages(r)[0]

    def rpc(self, method: str, params: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Sends one request; returns (its response, the other messages of the answer)."""
        msg = request_message(self, method, params)
        rid = msg["id"]
        r = self.post(msg)
        assert r.status_code == 200, (method, r.status_code, r.text)
        msgs = parse_http_messages(r)
        replies = [m for m in msgs if m.get("id") == rid and "method" not in m]
        assert len(replies) == 1, f"expected one response to id {rid}, got {msgs}"
        return replies[0], [m for m in msgs if m is not replies[0]]

    def delete(self) -> httpx.Response:
        return self.http.delete(self.url, headers=self.headers())


class RawStdio:
    """`mcp-relay stdio` driven line by line, for wire-level assertions."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        env = dict(os.environ, RUST_LOG=RELAY_LOG_LEVEL)
        with open(log, "ab") as f:
            self.popen = subprocess.Popen(
                [str(RELAY), "stdio", "--config", str(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=f,
                env=env,
                cwd=config.parent,
                start_new_session=True,
            )
        self.tree = ProcessTree(self.popen.pid, self.popen)
        self.sel = selectors.DefaultSelector()
        assert self.popen.stdout is not None
        os.set_blocking(self.popen.stdout.fileno(), False)
        self.sel.register(self.popen.stdout, selectors.EVENT_READ)
        self.buf = b""
        self.next_id = 1

    def __enter__(self) -> RawStdio:
        return self

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(OSError):
            assert self.popen.stdin is not None
            self.popen.stdin.close()
        self.tree.kill()
        self.sel.close()

    def send_line(self, data: bytes) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(data + b"\n")
        self.popen.stdin.flush()

    def send(self, msg: dict[str, Any]) -> None:
        self.send_line(json.dumps(msg).encode())

    def read(self, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line from the relay within {timeout} s (partial: {self.buf[:200]!r})")
            if self.sel.select(left):
                assert self.popen.stdout is not None
                chunk = self.popen.stdout.read(65536)
                if chunk == b"":
                    raise EOFError(f"relay closed stdout (exit {self.popen.poll()})")
                if chunk:
                    self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def read_response(self, rid: Any, timeout: float = CALL_TIMEOUT_S) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        others = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.read(max(0.1, deadline - time.monotonic()))
            if msg.get("id") == rid and "method" not in msg:
                return msg, others
            if "method" in msg and "id" in msg:
                # A server-to-client request we do not serve: refuse it so nothing waits on us.
                self.send({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "not supported by test"}})
            others.append(msg)

    def rpc(self, method: str, params: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        msg = request_message(self, method, params)
        rid = msg["id"]
        self.send(msg)
        return self.read_response(rid)

    def initialize(self) -> dict[str, Any]:
        reply, _ = self.rpc(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "raw-stdio-test", "version": "0"},
            },
        )
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.tree.snapshot()
        return reply
