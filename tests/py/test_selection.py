"""Prompt-mode tool selection through the official Python SDK (cache=None): two HTTP sessions
of one relay fronting server-everything, server-filesystem, server-memory and the example
server; each session's tool list is its own."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

import mcp_types as types

from conftest import ROOT, LogRegistry, http_relay, http_relay_client, server_entries, stdio_relay_client
from test_relay import Notes, text_of

pytestmark = pytest.mark.anyio


def prompt_config(workdir: Path, **filtering: object) -> Path:
    servers = server_entries(workdir, None)
    path = workdir / "relay-prompt.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": servers,
                "relay": {"requestTimeoutMs": 30000, "startupWaitMs": 30000},
                "toolFiltering": {"mode": "prompt", **filtering},
            },
            indent=2,
        )
    )
    return path


async def tool_names(client: object) -> set[str]:
    return {t.name for t in (await client.list_tools()).tools}  # type: ignore[attr-defined]


async def test_analyze_prompt_exposes_filesystem_tools_to_one_session(tmp_path: Path, logs: LogRegistry) -> None:
    config = prompt_config(tmp_path)
    notes_file = tmp_path / "fsroot" / "notes.txt"
    notes_file.write_text("the relay keeps its notes here\n")
    with http_relay(config, logs, "relay stderr (prompt mode)") as relay:
        relay.wait_for_tools([])
        notes_a = Notes()
        async with (
            http_relay_client(relay.url, message_handler=notes_a) as a,
            http_relay_client(relay.url) as b,
        ):
            initial = await tool_names(a)
            assert "relay__analyze_prompt" in initial and "relay__call_tool" in initial, initial
            assert all(n.startswith("relay__") for n in initial), initial
            assert await tool_names(b) == initial

            r = await a.call_tool(
                "relay__analyze_prompt",
                {"prompt": "Read the text file notes.txt in my project folder and list the other files in that directory"},
            )
            assert not r.is_error, r
            picked = [t["name"] for t in (r.structured_content or {})["tools"]]
            assert "fs__read_text_file" in picked and "fs__list_directory" in picked, picked
            assert all(p.startswith("fs__") for p in picked[:3]), picked
            await notes_a.wait_for(
                lambda m: isinstance(m, types.ToolListChangedNotification), "tools/list_changed for session A"
            )
            seen_a = await tool_names(a)
            assert set(picked) <= seen_a, (picked, seen_a)
            assert not any(n.startswith("memory__") for n in seen_a), seen_a
            assert text_of(await a.call_tool("fs__read_text_file", {"path": str(notes_file)})) == (
                "the relay keeps its notes here\n"
            )

            # Session B still sees only the selection and management tools...
            assert await tool_names(b) == initial
            # ...and reaches the same tool through relay__call_tool without re-listing.
            r = await b.call_tool(
                "relay__call_tool", {"name": "fs__read_text_file", "arguments": {"path": str(notes_file)}}
            )
            assert text_of(r) == "the relay keeps its notes here\n"

            # A different task in session A: its tools come first, the file tools stay.
            r = await a.call_tool(
                "relay__analyze_prompt", {"prompt": "remember that Alice works at Acme: create an entity in the knowledge graph"}
            )
            picked2 = [t["name"] for t in (r.structured_content or {})["tools"]]
            assert picked2 and picked2[0].startswith("memory__"), picked2
            seen_a2 = await tool_names(a)
            assert "memory__create_entities" in seen_a2 and "fs__read_text_file" in seen_a2, seen_a2
            assert await tool_names(b) == initial


async def test_search_tools_returns_schemas_without_changing_the_list(tmp_path: Path, logs: LogRegistry) -> None:
    config = prompt_config(tmp_path, defaultExposure="none")
    with http_relay(config, logs, "relay stderr (prompt mode, none)") as relay:
        relay.wait_for_tools([])
        async with http_relay_client(relay.url) as c:
            before = await tool_names(c)
            assert before == {"relay__analyze_prompt", "relay__search_tools", "relay__call_tool"}, before
            r = await c.call_tool("relay__search_tools", {"query": "directory tree of a folder", "limit": 3})
            found = (r.structured_content or {})["tools"]
            assert 1 <= len(found) <= 3 and found[0]["name"] == "fs__directory_tree", found
            assert "path" in found[0]["inputSchema"]["properties"], found[0]
            assert await tool_names(c) == before


MODEL = ROOT / ".models" / "all-MiniLM-L6-v2"


async def test_embeddings_pick_tools_by_meaning(tmp_path: Path, logs: LogRegistry) -> None:
    """toolFiltering.embeddings with the real model over the real servers: a prompt that shares
    no word with the memory server's tools (the local ranker alone finds nothing for it) gets
    the knowledge-graph tools, and the session uses them."""
    assert (MODEL / "model.safetensors").is_file(), f"{MODEL} missing: run scripts/setup-test-deps.sh"
    prompt = "Remember that Alice leads the Berlin office and that she knows Bob."
    with http_relay(prompt_config(tmp_path), logs, "relay stderr (prompt mode, local)") as relay:
        relay.wait_for_tools([])
        async with http_relay_client(relay.url) as c:
            r = await c.call_tool("relay__search_tools", {"query": prompt})
            assert (r.structured_content or {})["tools"] == [], r
    config = prompt_config(tmp_path, embeddings={"model": str(MODEL)})
    with http_relay(config, logs, "relay stderr (prompt mode, embeddings)") as relay:
        relay.wait_for_tools([])
        async with http_relay_client(relay.url) as c:
            sel: dict = {}
            for _ in range(600):  # the catalog is embedded in the background (bounded wait)
                status = await c.call_tool("relay__status", {})
                sel = (status.structured_content or {})["toolSelection"]
                emb = sel["embeddings"]
                if emb["state"] == "ready" and emb["embeddedTools"] == sel["visibleTools"] > 40:
                    break
                await anyio.sleep(0.1)
            assert sel["embeddings"]["state"] == "ready", sel
            r = await c.call_tool("relay__analyze_prompt", {"prompt": prompt, "maxTools": 5})
            assert not r.is_error, r
            tools = (r.structured_content or {})["tools"]
            picked = [t["name"] for t in tools]
            assert picked and all(p.startswith("memory__") for p in picked[:2]), picked
            assert "memory__create_relations" in picked, picked
            assert "close in meaning" in tools[0]["reason"], tools[0]
            assert "memory__create_relations" in await tool_names(c)
            await c.call_tool(
                "memory__create_entities",
                {
                    "entities": [
                        {"name": "Alice", "entityType": "person", "observations": ["leads the Berlin office"]},
                        {"name": "Bob", "entityType": "person", "observations": []},
                    ]
                },
            )
            await c.call_tool(
                "memory__create_relations", {"relations": [{"from": "Alice", "to": "Bob", "relationType": "knows"}]}
            )
            graph = text_of(await c.call_tool("memory__read_graph", {}))
            assert "Berlin" in graph and "knows" in graph, graph


async def test_a_stateless_client_keeps_its_picks_where_it_has_an_identity(tmp_path: Path, logs: LogRegistry) -> None:
    """A 2026-07-28 client has no session: over stdio (one client) its picks are kept for
    its next requests; an anonymous HTTP client's end with the request (two such clients
    cannot be told apart), so it calls through `relay__call_tool`."""
    config = prompt_config(tmp_path)
    (tmp_path / "fsroot" / "notes.txt").write_text("kept notes\n")
    prompt = "Read the text file notes.txt in my project folder and list the other files in that directory"
    log = tmp_path / "relay-stdio.log"
    logs.add("relay stderr (stdio, stateless)", log)
    async with stdio_relay_client(config, log, mode="2026-07-28") as c:
        initial = await tool_names(c)
        assert all(n.startswith("relay__") for n in initial), initial
        r = await c.call_tool("relay__analyze_prompt", {"prompt": prompt})
        assert not r.is_error, r
        after = await tool_names(c)
        assert any(n.startswith("fs__") for n in after), after
        read = next(n for n in ("fs__read_text_file", "fs__read_file") if n in after)
        r = await c.call_tool(read, {"path": str(tmp_path / "fsroot" / "notes.txt")})
        assert "kept notes" in text_of(r), r
        await c.call_tool("relay__analyze_prompt", {"prompt": "x", "reset": True})
        assert await tool_names(c) == initial
    with http_relay(config, logs, "relay stderr (prompt mode, stateless http)") as relay:
        relay.wait_for_tools([])
        async with http_relay_client(relay.url, mode="2026-07-28") as h:
            r = await h.call_tool("relay__analyze_prompt", {"prompt": prompt})
            assert not r.is_error, r
            assert all(n.startswith("relay__") for n in await tool_names(h))
            listed = await h.call_tool("relay__call_tool", {"name": "fs__list_allowed_directories", "arguments": {}})
            assert not listed.is_error, listed
