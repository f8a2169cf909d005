"""End-to-end tests of mcp-relay with the official Python SDK (`mcp` 2.3.0, mode="legacy").

Backends: server-everything (stdio, prefix `everything`), server-everything over Streamable
HTTP (`evh`), server-filesystem (`fs`), server-memory (`memory`) and the bundled example
server (`ex`). The SDK-level tests run over both relay fronts (stdio and HTTP); wire-level
checks use raw HTTP (httpx) or raw stdio lines, because the SDK's typed models drop fields
the relay must keep.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import mcp_types as types
from mcp.shared.exceptions import MCPError

from conftest import (
    CALL_TIMEOUT_S,
    EXAMPLE,
    STANDARD_PREFIXES,
    LogRegistry,
    RawHttp,
    RawStdio,
    RelayUnderTest,
    http_relay,
    http_relay_client,
    server_entries,
    stdio_relay_client,
    write_config,
)

pytestmark = pytest.mark.anyio

NOTE_TIMEOUT_S = 30.0


def text_of(result: Any) -> str:
    """The concatenated text content of a CallToolResult / GetPromptResult message list."""
    assert not getattr(result, "is_error", False), f"tool returned an error: {result}"
    return "".join(c.text for c in result.content if getattr(c, "type", None) == "text")


class Notes:
    """Collects server notifications (a `message_handler`) and waits for specific ones."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.errors: list[Exception] = []
        self._changed = anyio.Event()

    async def __call__(self, message: Any) -> None:
        if isinstance(message, Exception):
            self.errors.append(message)
        else:
            self.items.append(message)
        self._changed.set()
        self._changed = anyio.Event()

    def of(self, cls: type) -> list[Any]:
        return [m for m in self.items if isinstance(m, cls)]

    async def wait_for(self, pred: Any, what: str, timeout: float = NOTE_TIMEOUT_S) -> Any:
        with anyio.move_on_after(timeout):
            while True:
                for m in self.items:
                    if pred(m):
                        return m
                await self._changed.wait()
        raise AssertionError(
            f"no {what} within {timeout} s; got {[type(m).__name__ for m in self.items]} {self.errors}"
        )


@contextlib.contextmanager
def example_over_raw_stdio(workdir: Path, logs: LogRegistry, **settings: Any) -> Iterator[RawStdio]:
    """`mcp-relay stdio` in front of the example server `ex`, initialized, as a raw client."""
    config = write_config(workdir, {"ex": {"command": str(EXAMPLE), "args": ["--name", "ex"]}}, **settings)
    log = config.with_suffix(".log")
    logs.add("relay stderr (raw stdio)", log)
    with RawStdio(config, log) as raw:
        raw.initialize()
        yield raw


# =============================================================================== catalog


async def test_management_status_through_the_sdk(relay: RelayUnderTest) -> None:
    async with relay.client() as c:
        r = await c.call_tool("relay__status", {})
        assert not r.is_error, r
        st = r.structured_content
        assert st is not None and st["version"] and st["sessions"] >= 1
        states = {s["name"]: s["state"] for s in st["servers"]}
        assert states.get("ex") == "ready", states
        listed = await c.call_tool("relay__list_servers", {})
        names = [s["name"] for s in (listed.structured_content or {}).get("servers", [])]
        assert "ex" in names and "memory" in names, names


async def test_merged_catalog(relay: RelayUnderTest) -> None:
    async with relay.client() as c:
        assert c.protocol_version == "2025-11-25"
        assert c.server_info is not None and c.server_info.name == "mcp-relay"
        assert c.server_capabilities.tools is not None and c.server_capabilities.tools.list_changed
        assert c.server_capabilities.resources is not None and c.server_capabilities.resources.subscribe

        tools = {t.name: t for t in (await c.list_tools()).tools}
        for name in [
            "everything__echo",
            "everything__get-sum",
            "everything__trigger-long-running-operation",
            "evh__echo",
            "fs__write_file",
            "fs__read_text_file",
            "memory__create_entities",
            "memory__read_graph",
            "ex__echo",
            "ex__add",
            "ex__slow",
            "ex__lossless",
        ]:
            assert name in tools, f"{name} missing from the merged tools/list: {sorted(tools)}"
        # Every exposed name carries a configured prefix (or the relay's own, for its
        # management tools); nothing leaks through unprefixed.
        unprefixed = [
            n for n in tools if n.split("__", 1)[0] not in (*STANDARD_PREFIXES, "relay")
        ]
        assert not unprefixed, f"tools without a server prefix: {unprefixed}"
        # Only `name` is rewritten: the rest of the item is the backend's.
        assert tools["ex__echo"].description == "Echoes the message back."
        assert tools["ex__echo"].input_schema["required"] == ["message"]
        assert tools["fs__write_file"].input_schema["required"] == ["path", "content"]

        prompts = {p.name: p for p in (await c.list_prompts()).prompts}
        assert "ex__greet" in prompts, sorted(prompts)
        assert prompts["ex__greet"].arguments and prompts["ex__greet"].arguments[0].name == "name"
        assert any(n.startswith("everything__") for n in prompts), sorted(prompts)
        greeting = await c.get_prompt("ex__greet", {"name": "Ada"})
        assert greeting.messages[0].content.text == "Hello, Ada!"

        resources = {str(r.uri): r for r in (await c.list_resources()).resources}
        assert "example://greeting" in resources, sorted(resources)
        assert any(u.startswith("demo://resource/") for u in resources), sorted(resources)
        read = await c.read_resource("example://greeting")
        assert read.contents[0].text == "content of example://greeting"

        templates = [t.uri_template for t in (await c.list_resource_templates()).resource_templates]
        assert "example://item/{id}" in templates, templates
        assert any(t.startswith("demo://resource/dynamic/") for t in templates), templates
        item = await c.read_resource("example://item/42")
        assert item.contents[0].text == "content of example://item/42"


# =============================================================================== calls


async def test_calls_reach_each_server(relay: RelayUnderTest) -> None:
    tag = uuid.uuid4().hex[:10]
    async with relay.client() as c:
        r = await c.call_tool("everything__echo", {"message": f"hi-{tag}"})
        assert text_of(r) == f"Echo: hi-{tag}"

        r = await c.call_tool("evh__echo", {"message": f"over-http-{tag}"})
        assert text_of(r) == f"Echo: over-http-{tag}"

        r = await c.call_tool("everything__get-sum", {"a": 19, "b": 23})
        assert "42" in text_of(r)

        path = relay.fs_root / f"note-{tag}.txt"
        body = f"line one {tag}\nline two"
        r = await c.call_tool("fs__write_file", {"path": str(path), "content": body})
        assert "Successfully wrote" in text_of(r), text_of(r)
        assert path.read_text() == body
        r = await c.call_tool("fs__read_text_file", {"path": str(path)})
        assert text_of(r) == body
        assert r.structured_content == {"content": body}

        entity = f"Entity-{tag}"
        r = await c.call_tool(
            "memory__create_entities",
            {"entities": [{"name": entity, "entityType": "test", "observations": [f"observed-{tag}"]}]},
        )
        assert entity in text_of(r)
        r = await c.call_tool("memory__read_graph", {})
        graph = text_of(r)
        assert entity in graph and f"observed-{tag}" in graph, graph[:2000]

        r = await c.call_tool("ex__add", {"a": 2, "b": 3.5})
        assert text_of(r) == "5.5"
        r = await c.call_tool("ex__echo", {"message": f"ex-{tag}"})
        assert text_of(r) == f"Echo: ex-{tag}"


async def test_unknown_tool_is_invalid_params_naming_it(relay: RelayUnderTest) -> None:
    async with relay.client() as c:
        with pytest.raises(MCPError) as err:
            await c.call_tool("nope__missing_tool", {})
        assert err.value.code == -32602, err.value.error
        assert "nope__missing_tool" in err.value.message
        # The session is still usable afterwards.
        assert text_of(await c.call_tool("ex__echo", {"message": "still here"})) == "Echo: still here"


# =============================================================================== progress


async def _check_progress(c: Any, tool: str, args: dict[str, Any], steps: int, notes: Notes) -> None:
    # 1) The SDK's own token (its request id) via progress_callback.
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    r = await c.call_tool(tool, args, progress_callback=on_progress)
    text_of(r)
    with anyio.fail_after(NOTE_TIMEOUT_S):
        while len(seen) < steps:
            await anyio.sleep(0.02)
    # (The SDK runs each callback in a task of its own, so compare as a set of steps.)
    assert sorted(p for p, _, _ in seen) == [float(i) for i in range(1, steps + 1)], seen
    assert all(t == float(steps) for _, t, _ in seen), seen

    # 2) A token the client picked itself (a string), seen raw through the message handler.
    token = f"client-token-{uuid.uuid4().hex[:8]}"
    r = await c.call_tool(tool, args, meta={"progressToken": token})
    text_of(r)

    def mine(m: Any) -> bool:
        return isinstance(m, types.ProgressNotification) and m.params.progress_token == token

    await notes.wait_for(lambda m: mine(m) and m.params.progress == steps, f"progress {steps} for {token}")
    got = [m.params for m in notes.items if mine(m)]
    assert sorted(p.progress for p in got) == list(range(1, steps + 1)), got
    # No notification carries a relay-internal token.
    foreign = [
        m.params.progress_token
        for m in notes.of(types.ProgressNotification)
        if not isinstance(m.params.progress_token, int) and m.params.progress_token != token
    ]
    assert not foreign, foreign


async def test_progress_example_server(relay: RelayUnderTest) -> None:
    notes = Notes()
    async with relay.client(message_handler=notes) as c:
        await _check_progress(c, "ex__slow", {"steps": 3, "ms": 100}, 3, notes)
        got = [m.params for m in notes.of(types.ProgressNotification) if isinstance(m.params.progress_token, str)]
        assert sorted(p.message for p in got) == ["step 1", "step 2", "step 3"], got


@pytest.mark.parametrize("server", ["everything", "evh"])
async def test_progress_everything_long_running(relay: RelayUnderTest, server: str) -> None:
    notes = Notes()
    async with relay.client(message_handler=notes) as c:
        await _check_progress(c, f"{server}__trigger-long-running-operation", {"duration": 1, "steps": 3}, 3, notes)


# =============================================================================== server -> client requests


async def test_sampling_round_trip(relay: RelayUnderTest) -> None:
    tag = uuid.uuid4().hex[:8]
    asked: list[str] = []

    async def sampling(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=f"model answer {tag}"),
            model="test-model",
            stop_reason="endTurn",
        )

    async with relay.client(sampling_callback=sampling) as c:
        r = await c.call_tool("ex__sample", {"prompt": f"question {tag}"})
        assert text_of(r) == f"sampled: model answer {tag}"
        assert f"question {tag}" in asked, asked


async def test_elicitation_round_trip(relay: RelayUnderTest) -> None:
    tag = uuid.uuid4().hex[:8]
    asked: list[str] = []

    async def elicit(ctx: Any, params: Any) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": f"Ada {tag}"})

    async with relay.client(elicitation_callback=elicit) as c:
        r = await c.call_tool("ex__elicit", {})
        text = text_of(r)
        assert text.startswith("elicited: "), text
        answer = json.loads(text[len("elicited: ") :])
        assert answer["action"] == "accept" and answer["content"] == {"name": f"Ada {tag}"}, answer
        assert "Your name?" in asked


async def test_roots_round_trip(relay: RelayUnderTest) -> None:
    root_uri = relay.fs_root.resolve().as_uri()

    async def roots(ctx: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=root_uri, name="test-root")])

    async with relay.client(list_roots_callback=roots) as c:
        r = await c.call_tool("ex__roots", {})
        text = text_of(r)
        assert text.startswith("roots: "), text
        answer = json.loads(text[len("roots: ") :])
        assert answer["roots"] == [{"uri": root_uri, "name": "test-root"}], answer


# =============================================================================== notifications


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
async def test_resource_subscription_updates(relay: RelayUnderTest) -> None:
    notes = Notes()
    async with relay.client(message_handler=notes) as c:
        await c.subscribe_resource("example://greeting")
        # Not subscribed: must not be delivered. Sent first so it would arrive first.
        assert text_of(await c.call_tool("ex__touch", {"uri": "example://item/7"})) == "touched"
        assert text_of(await c.call_tool("ex__touch", {"uri": "example://greeting"})) == "touched"
        got = await notes.wait_for(
            lambda m: isinstance(m, types.ResourceUpdatedNotification) and str(m.params.uri) == "example://greeting",
            "notifications/resources/updated for example://greeting",
        )
        assert str(got.params.uri) == "example://greeting"
        stray = [str(m.params.uri) for m in notes.of(types.ResourceUpdatedNotification) if "item/7" in str(m.params.uri)]
        assert not stray, f"got an update for a URI this session never subscribed to: {stray}"


async def test_tools_list_changed_and_new_tool_callable(relay: RelayUnderTest) -> None:
    notes = Notes()
    name = f"dyn_{uuid.uuid4().hex[:8]}"
    async with relay.client(message_handler=notes) as c:
        before = {t.name for t in (await c.list_tools()).tools}
        assert f"ex__{name}" not in before
        assert text_of(await c.call_tool("ex__add_tool", {"name": name})) == f"added {name}"
        await notes.wait_for(
            lambda m: isinstance(m, types.ToolListChangedNotification), "notifications/tools/list_changed"
        )
        after = {t.name for t in (await c.list_tools()).tools}
        assert f"ex__{name}" in after, sorted(after - before)
        assert before <= after
        assert text_of(await c.call_tool(f"ex__{name}", {})) == f"{name} ran"


# =============================================================================== concurrency (HTTP)


async def test_two_http_sessions_interleaved(shared_http_relay: Any, logs: LogRegistry) -> None:
    logs.add("relay stderr (http, shared)", shared_http_relay.log)
    notes = {"A": Notes(), "B": Notes()}
    results: dict[str, list[tuple[str, str]]] = {"A": [], "B": []}
    callbacks: dict[str, list[list[float]]] = {"A": [], "B": []}

    async def run(who: str, c: Any) -> None:
        for i in range(6):
            msg = f"{who}-{i}-{uuid.uuid4().hex[:6]}"
            server = ["ex", "everything", "evh"][i % 3]
            r = await c.call_tool(f"{server}__echo", {"message": msg})
            results[who].append((msg, text_of(r)))
            if i % 2 == 0:
                token = f"{who}-progress-{i}"
                r = await c.call_tool("ex__slow", {"steps": 2, "ms": 40}, meta={"progressToken": token})
                results[who].append(("done after 2 steps", text_of(r)))
            else:
                # The SDK's own token is its request id: both sessions use the same ids.
                seen: list[float] = []

                async def on_progress(p: float, total: float | None, message: str | None, seen: list[float] = seen) -> None:
                    seen.append(p)

                r = await c.call_tool("ex__slow", {"steps": 2, "ms": 40}, progress_callback=on_progress)
                results[who].append(("done after 2 steps", text_of(r)))
                callbacks[who].append(seen)

    async with (
        http_relay_client(shared_http_relay.url, message_handler=notes["A"]) as a,
        http_relay_client(shared_http_relay.url, message_handler=notes["B"]) as b,
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "A", a)
            tg.start_soon(run, "B", b)
        for who in "AB":
            for sent, got in results[who]:
                want = sent if sent.startswith("done") else f"Echo: {sent}"
                assert got == want, (who, sent, got)
            # Progress of each session's own calls, and only those.
            await notes[who].wait_for(
                lambda m, who=who: isinstance(m, types.ProgressNotification)
                and m.params.progress_token == f"{who}-progress-4"
                and m.params.progress == 2,
                f"last progress of session {who}",
            )
            tokens = {
                m.params.progress_token
                for m in notes[who].of(types.ProgressNotification)
                if isinstance(m.params.progress_token, str)
            }
            assert tokens == {f"{who}-progress-{i}" for i in (0, 2, 4)}, (who, tokens)
            with anyio.fail_after(NOTE_TIMEOUT_S):
                while any(len(seen) < 2 for seen in callbacks[who]):
                    await anyio.sleep(0.02)
            assert [sorted(seen) for seen in callbacks[who]] == [[1.0, 2.0]] * 3, (who, callbacks[who])


async def test_two_http_sessions_sampling_stays_in_its_session(shared_http_relay: Any, logs: LogRegistry) -> None:
    """Both sessions call `ex__sample` at the same moment, 20 rounds. A sampling request the
    backend sends must never reach a session other than the one whose call caused it: it is
    routed to the right session or refused with a clear error, never answered by the other."""
    logs.add("relay stderr (http, shared)", shared_http_relay.log)
    asked: dict[str, list[str]] = {"A": [], "B": []}

    def sampler(who: str) -> Any:
        async def sampling(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
            asked[who].append(params.messages[0].content.text)
            return types.CreateMessageResult(
                role="assistant",
                content=types.TextContent(type="text", text=f"answer from {who}"),
                model="test-model",
            )

        return sampling

    rounds: list[dict[str, str]] = []
    async with (
        http_relay_client(shared_http_relay.url, sampling_callback=sampler("A")) as a,
        http_relay_client(shared_http_relay.url, sampling_callback=sampler("B")) as b,
    ):
        for i in range(20):
            go = anyio.Event()
            got: dict[str, str] = {}

            async def run(who: str, c: Any, i: int = i, go: anyio.Event = go, got: dict[str, str] = got) -> None:
                await go.wait()
                r = await c.call_tool("ex__sample", {"prompt": f"prompt of {who} #{i}"})
                # A refused sampling request makes the tool fail (is_error); ok() judges the text.
                got[who] = "".join(getattr(x, "text", "") for x in r.content)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "A", a)
                tg.start_soon(run, "B", b)
                await anyio.sleep(0.05)
                go.set()
            rounds.append(got)
    # A shared stdio server cannot say which call a request belongs to; when calls from both
    # sessions are in flight the relay must refuse clearly rather than guess.
    def ok(who: str, text: str) -> bool:
        return text == f"sampled: answer from {who}" or "cannot tell which client session" in text

    wrong = [(i, r) for i, r in enumerate(rounds) if not (ok("A", r.get("A", "")) and ok("B", r.get("B", "")))]
    leaked = {who: [p for p in asked[who] if not p.startswith(f"prompt of {who} ")] for who in "AB"}
    assert not wrong and not leaked["A"] and not leaked["B"], (
        f"sampling requests crossed sessions: wrong answers in rounds {wrong}; "
        f"prompts a session saw that another session's call caused: {leaked}"
    )


# =============================================================================== lossless (raw wire)


def _check_lossless_listing(tools: list[dict[str, Any]]) -> None:
    by_name = {t["name"]: t for t in tools}
    assert "ex__lossless" in by_name, sorted(by_name)
    t = by_name["ex__lossless"]
    assert t["execution"] == {"taskSupport": "optional"}, t
    assert t["x-vendor"] == {"deep": [1, 2.5, {"k": None}]}, t
    assert t["outputSchema"] == {"type": "object", "properties": {"n": {"type": "number"}}}, t
    assert t["icons"] == [{"src": "data:image/png;base64,AA==", "mimeType": "image/png"}], t
    assert t["annotations"] == {"readOnlyHint": True, "x-hint": "custom"}, t
    assert t["_meta"] == {"example.com/meta": "kept"}, t


def _check_lossless_call(reply: dict[str, Any]) -> None:
    assert "result" in reply, reply
    r = reply["result"]
    assert r["content"] == [
        {"type": "text", "text": "ok", "x-c": 1, "annotations": {"audience": ["user"], "x-a": True}}
    ], r
    assert r["structuredContent"] == {"n": 1.5, "big": "123456789012345678901234567890"}, r
    assert r["x-r"] == {"deep": [1, 2, {"k": None}]}, r
    assert r["_meta"] == {"example.com/x": True}, r


def test_lossless_round_trip_http(shared_http_relay: Any, logs: LogRegistry) -> None:
    logs.add("relay stderr (http, shared)", shared_http_relay.log)
    with RawHttp(shared_http_relay.url) as raw:
        raw.initialize()
        reply, _ = raw.rpc("tools/list", {})
        _check_lossless_listing(reply["result"]["tools"])
        reply, _ = raw.rpc("tools/call", {"name": "ex__lossless", "arguments": {}, "x-extra": 1})
        _check_lossless_call(reply)


def test_lossless_round_trip_stdio(stdio_workdir: Path, logs: LogRegistry) -> None:
    with example_over_raw_stdio(stdio_workdir, logs) as raw:
        reply, _ = raw.rpc("tools/list", {})
        _check_lossless_listing(reply["result"]["tools"])
        reply, _ = raw.rpc("tools/call", {"name": "ex__lossless", "arguments": {}})
        _check_lossless_call(reply)


# =============================================================================== bad input (raw wire)


def test_http_malformed_json_is_400_parse_error(shared_http_relay: Any, logs: LogRegistry) -> None:
    logs.add("relay stderr (http, shared)", shared_http_relay.log)
    with RawHttp(shared_http_relay.url) as raw:
        raw.initialize()
        r = raw.post(b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", ')
        assert r.status_code == 400, (r.status_code, r.text)
        body = r.json()
        assert body["error"]["code"] == -32700, body
        assert body["id"] is None, body
        # The session survives a bad message.
        reply, _ = raw.rpc("tools/list", {})
        assert reply["result"]["tools"], reply


def test_http_unknown_tool_is_32602_naming_it(shared_http_relay: Any, logs: LogRegistry) -> None:
    logs.add("relay stderr (http, shared)", shared_http_relay.log)
    with RawHttp(shared_http_relay.url) as raw:
        raw.initialize()
        reply, _ = raw.rpc("tools/call", {"name": "nope__no_such_tool", "arguments": {}})
        assert reply["error"]["code"] == -32602, reply
        assert "nope__no_such_tool" in reply["error"]["message"], reply


def test_http_missing_session_id_is_400(shared_http_relay: Any, logs: LogRegistry) -> None:
    logs.add("relay stderr (http, shared)", shared_http_relay.log)
    with RawHttp(shared_http_relay.url) as raw:
        r = raw.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, session=False)
        assert r.status_code == 400, (r.status_code, r.text)
        assert "error" in r.json(), r.text


def test_http_delete_then_reuse_is_404(shared_http_relay: Any, logs: LogRegistry) -> None:
    logs.add("relay stderr (http, shared)", shared_http_relay.log)
    with RawHttp(shared_http_relay.url) as raw:
        raw.initialize()
        reply, _ = raw.rpc("tools/list", {})
        assert reply["result"]["tools"]
        d = raw.delete()
        assert d.status_code in (200, 202, 204), (d.status_code, d.text)
        r = raw.post({"jsonrpc": "2.0", "id": 99, "method": "tools/list"})
        assert r.status_code == 404, (r.status_code, r.text)
        d2 = raw.delete()
        assert d2.status_code == 404, (d2.status_code, d2.text)


def test_http_bad_protocol_version_is_400(shared_http_relay: Any, logs: LogRegistry) -> None:
    logs.add("relay stderr (http, shared)", shared_http_relay.log)
    with RawHttp(shared_http_relay.url) as raw:
        raw.initialize()
        r = raw.post({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}, extra={"MCP-Protocol-Version": "1999-01-01"})
        assert r.status_code == 400, (r.status_code, r.text)
        assert "1999-01-01" in r.text, r.text
        # The right version still works on the same session.
        reply, _ = raw.rpc("tools/list", {})
        assert reply["result"]["tools"]


def test_http_foreign_origin_is_403(shared_http_relay: Any, logs: LogRegistry) -> None:
    logs.add("relay stderr (http, shared)", shared_http_relay.log)
    with RawHttp(shared_http_relay.url) as raw:
        raw.initialize()
        r = raw.post({"jsonrpc": "2.0", "id": 6, "method": "tools/list"}, extra={"Origin": "http://evil.example"})
        assert r.status_code == 403, (r.status_code, r.text)
        init = raw.post(
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "x", "version": "0"}},
            },
            extra={"Origin": "https://attacker.example:8443"},
            session=False,
        )
        assert init.status_code == 403, (init.status_code, init.text)
        # A loopback origin is fine.
        ok = raw.post({"jsonrpc": "2.0", "id": 8, "method": "tools/list"}, extra={"Origin": "http://localhost:3000"})
        assert ok.status_code == 200, (ok.status_code, ok.text)


def test_http_oversized_body_is_413(tmp_path: Path, logs: LogRegistry) -> None:
    config = write_config(
        tmp_path, {"ex": {"command": str(EXAMPLE), "args": ["--name", "ex"]}}, maxMessageBytes=16384
    )
    with http_relay(config, logs) as relay:
        relay.wait_for_tools(["ex"])
        with RawHttp(relay.url) as raw:
            raw.initialize()
            big = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "ex__echo", "arguments": {"message": "x" * 32768}}}
            r = raw.post(big)
            assert r.status_code == 413, (r.status_code, r.text)
            assert r.json()["error"]["code"] == -32003, r.text
            # Small messages still pass on the same session.
            reply, _ = raw.rpc("tools/call", {"name": "ex__echo", "arguments": {"message": "small"}})
            assert reply["result"]["content"][0]["text"] == "Echo: small", reply


def test_stdio_malformed_json_and_unknown_tool(stdio_workdir: Path, logs: LogRegistry) -> None:
    with example_over_raw_stdio(stdio_workdir, logs) as raw:
        raw.send_line(b'{"jsonrpc": "2.0", "id": 41, "method": ')
        err = raw.read()
        assert err["error"]["code"] == -32700 and err["id"] is None, err
        reply, _ = raw.rpc("tools/call", {"name": "nope__absent", "arguments": {}})
        assert reply["error"]["code"] == -32602 and "nope__absent" in reply["error"]["message"], reply
        reply, _ = raw.rpc("tools/call", {"name": "ex__echo", "arguments": {"message": "after"}})
        assert reply["result"]["content"][0]["text"] == "Echo: after", reply


def test_stdio_oversized_line_is_refused(stdio_workdir: Path, logs: LogRegistry) -> None:
    with example_over_raw_stdio(stdio_workdir, logs, maxMessageBytes=16384) as raw:
        raw.send({"jsonrpc": "2.0", "id": 50, "method": "tools/call", "params": {"name": "ex__echo", "arguments": {"message": "x" * 32768}}})
        err = raw.read()
        assert err["error"]["code"] == -32003, err
        # The refusal carries the id of the refused request.
        assert err["id"] == 50, err
        assert "maxMessageBytes" in err["error"]["message"], err
        reply, _ = raw.rpc("tools/call", {"name": "ex__echo", "arguments": {"message": "small"}})
        assert reply["result"]["content"][0]["text"] == "Echo: small", reply


# =============================================================================== failing backend


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_backend_that_cannot_start_does_not_block_others(
    transport: str, tmp_path: Path, logs: LogRegistry, everything_http: str
) -> None:
    servers = server_entries(tmp_path, None)
    servers = {"broken": {"command": str(tmp_path / "no-such-server-binary"), "args": []}, "ex": servers["ex"], "memory": servers["memory"]}
    config = write_config(tmp_path, servers)

    async def check(c: Any) -> None:
        names = {t.name for t in (await c.list_tools()).tools}
        assert "ex__echo" in names and "memory__read_graph" in names, sorted(names)
        assert not any(n.startswith("broken__") for n in names), sorted(names)
        assert text_of(await c.call_tool("ex__echo", {"message": "alive"})) == "Echo: alive"
        assert text_of(await c.call_tool("ex__add", {"a": 1, "b": 1})) == "2"
        with pytest.raises(MCPError) as err:
            await c.call_tool("broken__anything", {})
        assert err.value.code == -32602 and "broken__anything" in err.value.message, err.value.error

    with anyio.fail_after(3 * CALL_TIMEOUT_S):
        if transport == "stdio":
            log = tmp_path / "relay-stdio.log"
            log.touch()
            logs.add("relay stderr (stdio)", log)
            async with stdio_relay_client(config, log) as c:
                await check(c)
        else:
            with http_relay(config, logs) as relay:
                async with http_relay_client(relay.url) as c:
                    await check(c)
    text = next(p for label, p, _ in logs.entries).read_text()
    assert "no-such-server-binary" in text, "the relay should log why `broken` failed"
