"""Both protocol eras through one relay with the official Python SDK (`mcp` 2.3.0): a
client in mode="2026-07-28" (stateless, `_meta` on every request) and one in
mode="legacy" (initialize handshake) at the same time, on the HTTP and the stdio front;
and mode="auto", which must pick the stateless era now that the relay answers
`server/discover`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from conftest import (
    EXAMPLE,
    LogRegistry,
    RelayUnderTest,
    everything_listening,
    http_relay,
    http_relay_client,
    write_config,
)

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
                assert fx["state"] == "ready", fx
                if era == "modern":
                    assert fx["protocolVersion"] == MODERN, fx
                    assert fx["eras"] == ["stateless"], fx
                else:
                    # The fixture also accepts initialize: each client is served in its era.
                    assert fx["protocolVersion"] == "2025-11-25", fx
                    assert fx["eras"] == ["handshake", "stateless"], fx
                for c in (legacy, modern):
                    names = [t.name for t in (await c.list_tools()).tools]
                    assert "fx__test_simple_text" in names, names
                    r = await c.call_tool("fx__test_simple_text", {})
                    assert text_of(r) == "This is a simple text response for testing.", r
                if era == "modern":
                    # The era has no resources/subscribe, and this server no listen stream.
                    with pytest.raises(MCPError) as e:
                        await legacy.subscribe_resource("test://static-text")
                    assert e.value.error.code == -32601, e.value
                    assert "offers no resource subscriptions" in e.value.error.message, e.value
                else:
                    await legacy.subscribe_resource("test://watched-resource")
                    # A stateless listen stream's resource subscription goes through the
                    # server's handshake session (the stateless era has no subscribe).
                    async with modern.listen(resource_subscriptions=["test://static-text"]) as sub:
                        assert list(sub.honored.resource_subscriptions or []) == ["test://static-text"], sub.honored


# --------------------------------------------------------------------------- bridges (MRTR)


def sampled(tag: str) -> Any:
    async def sampling(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=f"model answer {tag}"),
            model="test-model",
            stop_reason="endTurn",
        )

    return sampling


async def test_a_modern_client_answers_a_legacy_servers_requests(relay: RelayUnderTest) -> None:
    """A 2026-07-28 client has no server requests: the elicitation, sampling and roots
    requests of handshake-era servers (the relay's example server and server-everything)
    reach it as input_required, the SDK answers them and retries, and each call completes
    with the answer the server got."""
    tag = uuid.uuid4().hex[:8]
    asked: list[str] = []

    async def elicit(ctx: Any, params: Any) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": f"Ada {tag}"})

    async def roots(ctx: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=f"file:///root-{tag}", name="r")])

    async with relay.client(
        mode=MODERN, elicitation_callback=elicit, sampling_callback=sampled(tag), list_roots_callback=roots
    ) as c:
        assert c.session.protocol_version == MODERN
        text = text_of(await c.call_tool("ex__elicit", {}))
        assert json.loads(text.removeprefix("elicited: ")) == {"action": "accept", "content": {"name": f"Ada {tag}"}}, text
        assert "Your name?" in asked, asked
        assert text_of(await c.call_tool("ex__sample", {"prompt": f"q {tag}"})) == f"sampled: model answer {tag}"
        text = text_of(await c.call_tool("ex__roots", {}))
        assert json.loads(text.removeprefix("roots: "))["roots"] == [{"uri": f"file:///root-{tag}", "name": "r"}], text
        # server-everything (TypeScript SDK) over stdio: its sampling and elicitation tools.
        text = text_of(await c.call_tool("everything__trigger-sampling-request", {"prompt": f"p {tag}"}))
        assert f"model answer {tag}" in text, text
        text = text_of(await c.call_tool("everything__trigger-elicitation-request", {}))
        assert "User provided the requested information" in text and f"Ada {tag}" in text, text
        # Several calls at once, each with its own parked backend request. (On a shared
        # stdio server, requests of concurrent sessions cannot be told apart, and are
        # refused; over HTTP each comes on its call's stream: server-everything over HTTP.)
        async with anyio.create_task_group() as tg:
            for i in range(4):

                async def one(i: int = i) -> None:
                    r = await c.call_tool("evh__trigger-sampling-request", {"prompt": f"q{i} {tag}"})
                    assert f"model answer {tag}" in text_of(r), r

                tg.start_soon(one)


async def test_the_relays_request_state_is_sealed_and_single_use(tmp_path: Path, logs: LogRegistry) -> None:
    """Driven by hand: the relay's requestState is refused when altered, replayed or sent
    for another tool, and a retry that never comes expires (the backend call is cancelled,
    the parked call released)."""
    config = write_config(
        tmp_path, {"ex": {"command": str(EXAMPLE), "args": ["--name", "ex"]}}, requestTimeoutMs=3000
    )
    with http_relay(config, logs) as relay:
        relay.wait_for_tools(["ex"])

        async def elicit(ctx: Any, params: Any) -> types.ElicitResult:
            return types.ElicitResult(action="accept", content={"name": "Ada"})

        async with http_relay_client(relay.url, mode=MODERN, elicitation_callback=elicit) as c:
            first = await c.session.call_tool("ex__elicit", {}, allow_input_required=True)
            assert isinstance(first, types.InputRequiredResult), first
            assert first.request_state and first.request_state.startswith("mcp-relay/1."), first
            ((key, req),) = first.input_requests.items()
            assert req.method == "elicitation/create" and req.params.message == "Your name?", req
            answer = {key: types.ElicitResult(action="accept", content={"name": "Ada"})}
            for bad_state, bad_tool in [
                (first.request_state + "x", "ex__elicit"),  # altered
                (first.request_state, "ex__sample"),  # another tool
            ]:
                with pytest.raises(MCPError) as e:
                    await c.session.call_tool(
                        bad_tool, {}, input_responses=answer, request_state=bad_state, allow_input_required=True
                    )
                assert e.value.error.code == -32602, e.value
            done = await c.session.call_tool(
                "ex__elicit", {}, input_responses=answer, request_state=first.request_state, allow_input_required=True
            )
            assert isinstance(done, types.CallToolResult), done
            assert json.loads(text_of(done).removeprefix("elicited: "))["content"] == {"name": "Ada"}, done
            with pytest.raises(MCPError) as e:  # replayed
                await c.session.call_tool(
                    "ex__elicit", {}, input_responses=answer, request_state=first.request_state, allow_input_required=True
                )
            assert e.value.error.code == -32602 and "already used" in e.value.error.message, e.value

            # A retry that never comes: parked, then released when the server stops waiting.
            again = await c.session.call_tool("ex__elicit", {}, allow_input_required=True)
            assert isinstance(again, types.InputRequiredResult), again
            assert waiting(relay.url) == 1
            with anyio.fail_after(30):
                while waiting(relay.url) != 0:
                    await anyio.sleep(0.1)
            with pytest.raises(MCPError) as e:
                await c.session.call_tool(
                    "ex__elicit",
                    {},
                    input_responses={k: answer[key] for k in again.input_requests},
                    request_state=again.request_state,
                    allow_input_required=True,
                )
            assert e.value.error.code == -32602, e.value
            # The relay serves on.
            assert text_of(await c.call_tool("ex__echo", {"message": "after"})) == "Echo: after"


def waiting(url: str) -> int:
    """The relay's `mcp_relay_input_required_waiting` gauge."""
    body = httpx.get(url.removesuffix("/mcp") + "/metrics", timeout=30).text
    line = next(l for l in body.splitlines() if l.startswith("mcp_relay_input_required_waiting "))
    return int(float(line.split()[1]))


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_a_legacy_client_answers_a_modern_servers_input_required(
    tmp_path: Path, logs: LogRegistry, transport: str
) -> None:
    """A server of the stateless era only (`era: modern`) answers input_required; a
    handshake-era client gets real elicitation, sampling and roots requests, and the relay
    retries the call with the answers (several rounds, several requests at once)."""
    tag = uuid.uuid4().hex[:8]
    asked: list[str] = []

    async def elicit(ctx: Any, params: Any) -> types.ElicitResult:
        asked.append(params.message)
        field = next(iter(params.requested_schema["properties"]))
        return types.ElicitResult(action="accept", content={field: f"{field}-{tag}"})

    async def roots(ctx: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=f"file:///root-{tag}", name="r")])

    with contextlib.ExitStack() as stack:
        if transport == "http":
            entry: dict[str, Any] = {"type": "http", "url": stack.enter_context(dual_era_server()), "era": "modern"}
        else:
            entry = {"command": sys.executable, "args": [str(FIXTURE), "stdio"], "era": "auto"}
        relay = stack.enter_context(http_relay(write_config(tmp_path, {"fx": entry}), logs))
        relay.wait_for_tools(["fx"])
        async with http_relay_client(
            relay.url, elicitation_callback=elicit, sampling_callback=sampled(tag), list_roots_callback=roots
        ) as c:
            assert c.session.protocol_version != MODERN
            # The relay, not the SDK, runs the rounds: even a session that would accept
            # input_required gets the complete result (its client answered a real request).
            r = await c.session.call_tool("fx__test_input_required_result_elicitation", {}, allow_input_required=True)
            assert isinstance(r, types.CallToolResult), r
            assert text_of(r) == f"Hello, name-{tag}!", r
            assert asked == ["What is your name?"], asked
            r = await c.call_tool("fx__test_input_required_result_multi_round", {})
            assert text_of(r) == f"Multi-round complete: favorite color color-{tag}", r
            r = await c.call_tool("fx__test_input_required_result_multiple_inputs", {})
            assert text_of(r) == f"All inputs received: name-{tag}, model answer {tag}, 1 roots", r
            r = await c.call_tool("fx__test_input_required_result_list_roots", {})
            assert text_of(r) == f"Roots: file:///root-{tag}", r
            prompt = await c.get_prompt("fx__test_input_required_result_prompt", {})
            assert prompt.messages[0].content.text == f"Prompt with context: context-{tag}", prompt
        # A client without the capabilities: the server is told none, so it asks for nothing.
        async with http_relay_client(relay.url) as bare:
            r = await bare.call_tool("fx__test_input_required_result_capabilities", {})
            assert text_of(r) == "The client declared none of elicitation, sampling and roots", r


# --------------------------------------------------------------------------- legacy HTTP+SSE fallback


async def test_a_url_serving_legacy_sse_is_reached_through_it(tmp_path: Path, logs: LogRegistry) -> None:
    """`type: http` (era auto) at a URL that serves the 2024-11-05 HTTP+SSE transport
    (server-everything in `sse` mode): the POSTs are refused, so the relay falls back to
    GET + `endpoint` there, as the spec tells clients to."""
    with everything_listening(tmp_path, "sse") as port:
        url = f"http://127.0.0.1:{port}/sse"
        config = write_config(tmp_path, {"old": {"type": "http", "url": url}})
        with http_relay(config, logs) as relay:
            relay.wait_for_tools(["old"])
            async with http_relay_client(relay.url) as c:
                status = await c.call_tool("relay__status", {})
                old = next(s for s in status.structured_content["servers"] if s["name"] == "old")
                assert old["transport"] == "sse" and old["state"] == "ready", old
                r = await c.call_tool("old__echo", {"message": "over sse"})
                assert "over sse" in text_of(r), r
