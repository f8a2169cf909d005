"""Both protocol eras through one relay with the official Python SDK (`mcp` 2.3.0): a
client in mode="2026-07-28" (stateless, `_meta` on every request) and one in
mode="legacy" (initialize handshake) at the same time, on the HTTP and the stdio front;
and mode="auto", which must pick the stateless era now that the relay answers
`server/discover`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.shared.exceptions import MCPError

from conftest import LogRegistry, RelayUnderTest, http_relay, http_relay_client, write_config

pytestmark = pytest.mark.anyio

MODERN = "2026-07-28"


def text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


async def test_modern_and_legacy_clients_at_once(relay: RelayUnderTest) -> None:
    tag = uuid.uuid4().hex[:8]
    async with relay.client(mode=MODERN) as modern, relay.client() as legacy:
        assert modern.session.protocol_version == MODERN
        assert legacy.session.protocol_version != MODERN
        names = {t.name for t in (await modern.list_tools()).tools}
        assert {"ex__echo", "everything__echo", "memory__read_graph"} <= names, sorted(names)
        assert names == {t.name for t in (await legacy.list_tools()).tools}

        async def call(c: Any, who: str, i: int) -> None:
            r = await c.call_tool("ex__echo", {"message": f"{who}-{tag}-{i}"})
            assert text_of(r) == f"Echo: {who}-{tag}-{i}", r

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(call, modern, "modern", i)
                tg.start_soon(call, legacy, "legacy", i)

        # A backend of the handshake era serves the stateless client: server-everything.
        r = await modern.call_tool("everything__get-sum", {"a": 40, "b": 2})
        assert "42" in text_of(r), r
        prompts = {p.name for p in (await modern.list_prompts()).prompts}
        assert any(p.startswith("everything__") for p in prompts), sorted(prompts)


async def test_modern_progress_reaches_the_caller(relay: RelayUnderTest) -> None:
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with relay.client(mode=MODERN) as c:
        r = await c.call_tool("ex__slow", {"steps": 3, "ms": 20}, progress_callback=on_progress)
        assert text_of(r) == "done after 3 steps", r
    assert seen == [1, 2, 3], seen


async def test_auto_mode_picks_the_stateless_era(relay: RelayUnderTest) -> None:
    async with relay.client(mode="auto") as c:
        assert c.session.protocol_version == MODERN
        r = await c.call_tool("ex__echo", {"message": "auto"})
        assert text_of(r) == "Echo: auto"


# --------------------------------------------------------------------------- upstream era

FIXTURE = Path(__file__).resolve().parents[1] / "fixture" / "conformance_server.py"


@contextlib.contextmanager
def dual_era_server() -> Iterator[str]:
    """The Python SDK fixture (a server of both eras) over Streamable HTTP; its /mcp URL."""
    proc = subprocess.Popen(
        [sys.executable, str(FIXTURE), "http", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("LISTENING "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.parametrize("era", ["auto", "modern"])
async def test_a_server_of_the_stateless_era_is_spoken_to_in_it(
    tmp_path: Path, logs: LogRegistry, era: str
) -> None:
    """`era: auto|modern`: the relay probes `server/discover`, then sends that server
    stateless requests (`_meta` and headers, no session); clients of both eras use it."""
    with dual_era_server() as url:
        config = write_config(tmp_path, {"fx": {"type": "http", "url": url, "era": era}})
        with http_relay(config, logs) as relay:
            relay.wait_for_tools(["fx"])
            async with http_relay_client(relay.url) as legacy, http_relay_client(relay.url, mode=MODERN) as modern:
                status = await legacy.call_tool("relay__status", {})
                fx = next(s for s in status.structured_content["servers"] if s["name"] == "fx")
                assert fx["protocolVersion"] == MODERN, fx
                assert fx["state"] == "ready", fx
                for c in (legacy, modern):
                    names = [t.name for t in (await c.list_tools()).tools]
                    assert "fx__test_simple_text" in names, names
                    r = await c.call_tool("fx__test_simple_text", {})
                    assert text_of(r) == "This is a simple text response for testing.", r
                # A method the era removed reaches the client as the server's own error.
                with pytest.raises(MCPError) as e:
                    await legacy.subscribe_resource("test://static-text")
                assert e.value.error.code == -32601, e.value
