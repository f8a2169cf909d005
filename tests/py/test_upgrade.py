"""An in-place upgrade of a stdio relay under an official Python SDK client: the client keeps
calling tools while the relay's binary is replaced (a second build of the same code, its
build tag patched so that it reports another version) and SIGUSR2 makes it exec the new one.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from conftest import CALL_TIMEOUT_S, EXAMPLE, RELAY, LogRegistry, server_entries, stdio_relay_client, write_config

pytestmark = pytest.mark.anyio

MARKER = b"MCP-RELAY-BUILD-TAG:"
SLOT = 28


def patched_build(dest: Path, tag: str) -> Path:
    """A copy of the relay binary that reports VERSION+tag."""
    data = bytearray(RELAY.read_bytes())
    slot = MARKER + b"\0" * SLOT
    at = data.find(slot)
    assert at >= 0 and data.find(slot, at + 1) < 0, "exactly one build-tag slot in the relay binary"
    start = at + len(MARKER)
    data[start : start + len(tag)] = tag.encode()
    dest.write_bytes(bytes(data))
    dest.chmod(0o755)
    return dest


def install(build: Path, at: Path) -> None:
    """A new file renamed over the old one, as package managers install."""
    tmp = at.with_suffix(".new")
    shutil.copyfile(build, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, at)


async def status(client: Any) -> dict[str, Any]:
    r = await client.call_tool("relay__status", {})
    assert not r.is_error, r
    return r.structured_content


def pids(st: dict[str, Any]) -> dict[str, int]:
    return {s["name"]: s["pid"] for s in st["servers"] if "pid" in s}


async def test_sdk_client_calls_on_across_an_in_place_upgrade(tmp_path: Path, logs: LogRegistry) -> None:
    entries = server_entries(tmp_path, None)
    servers = {"everything": entries["everything"], "ex": {"command": str(EXAMPLE), "args": ["--name", "ex"]}}
    config = write_config(tmp_path, servers)
    binary = tmp_path / "bin" / "mcp-relay"
    binary.parent.mkdir()
    install(RELAY, binary)
    new = patched_build(tmp_path / "mcp-relay-py2", "py2")
    log = tmp_path / "relay-upgrade.log"
    logs.add("relay stderr (upgrade)", log)
    async with stdio_relay_client(config, log, relay_binary=binary) as client:
        before = await status(client)
        tools = sorted(t.name for t in (await client.list_tools()).tools)
        assert "everything__echo" in tools and "ex__echo" in tools
        done: list[int] = []
        upgraded = anyio.Event()

        async def caller() -> None:
            # Calls go on until the new version answers, and a while after.
            i = 0
            after = 0
            while after < 30:
                if upgraded.is_set():
                    after += 1
                name = "everything__echo" if i % 2 else "ex__echo"
                r = await client.call_tool(name, {"message": f"m{i}"})
                assert not r.is_error, r
                text = "".join(c.text for c in r.content if c.type == "text")
                assert text.endswith(f"m{i}"), text
                done.append(i)
                i += 1

        with anyio.fail_after(CALL_TIMEOUT_S * 2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(caller)
                while len(done) < 20:
                    await anyio.sleep(0.01)
                install(new, binary)
                os.kill(int(log.with_suffix(".pid").read_text().strip()), signal.SIGUSR2)
                want = f"{before['version']}+py2"
                while (after := await status(client))["version"] != want:
                    await anyio.sleep(0.05)
                upgraded.set()
        assert len(done) >= 50 and done == list(range(len(done)))
        assert after["upgrades"] == 1
        assert after["pid"] == before["pid"]
        assert pids(after) == pids(before) and len(pids(before)) == 2
        assert sorted(t.name for t in (await client.list_tools()).tools) == tools
