#!/usr/bin/env python3
"""Client-mode conformance driver: makes mcp-relay the "client under test".

The conformance CLI (`client --command "<python> client_driver.py" --scenario X`) starts a
scenario server, appends its URL as the last argv and sets MCP_CONFORMANCE_SCENARIO. This
driver then:

1. writes a relay config whose only backend is that URL (type http, prefix ""), so the
   relay's *backend HTTP client* is what the scenario server observes;
2. starts `mcp-relay stdio --config <that file>` as a stdio MCP server through the official
   Python `mcp` SDK (`stdio_client` + `ClientSession`), acting as the downstream client;
3. acts per scenario:
   * initialize: initialize, list tools;
   * tools_call: list tools, call `add_numbers` {a: 2, b: 3} (expects "The sum of 2 and 3 is 5");
   * elicitation-sep1034-client-defaults: call `test_client_elicitation_defaults`; the
     elicitation callback accepts with every schema default filled in;
   * sse-retry: list tools, call `test_reconnection` (the scenario closes the POST SSE stream
     after a priming event with `retry: 500`; the relay must reconnect with GET +
     Last-Event-ID after ~500 ms and pick the answer up from that stream).
   2026 suite (0.2.x):
   * sep-2322-client-request-state: a stateless-only server answers input_required; the
     relay bridges it for this handshake-era client (real elicitation requests) and retries;
   * request-metadata, http-standard-headers, http-custom-headers, http-invalid-tool-headers:
     the relay speaks only the stateless era to the scenario server (`era: modern`); the
     driver calls what the scenario's MCP_CONFORMANCE_CONTEXT names (else every tool).

Exit 0 when the downstream side saw what it expected, 1 otherwise (the CLI counts a
non-zero exit as a failure of the scenario). Diagnostics go to stderr (the CLI saves them as
stderr.txt); the relay's own stderr goes there too (set RUST_LOG=debug for JSON logs).

Env: MCP_RELAY_BIN (default <repo>/target/debug/mcp-relay); DRIVER_TIMEOUT (seconds, default 25;
keep it under the CLI's --timeout, 30 s by default); DRIVER_WORKDIR (write the relay config
under this dir and keep it; default: a temp dir removed at exit).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp.client.session import ClientRequestContext, ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

warnings.filterwarnings("ignore", category=DeprecationWarning)

ROOT = Path(__file__).resolve().parents[2]
RELAY = os.environ.get("MCP_RELAY_BIN") or str(ROOT / "target" / "debug" / "mcp-relay")
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[driver +{time.monotonic() - T0:6.3f}s] {msg}", file=sys.stderr, flush=True)


def text_of(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def elicit_with_defaults(
    context: ClientRequestContext, params: types.ElicitRequestParams
) -> types.ElicitResult | types.ErrorData:
    """Accept, answering every property that has a schema default with that default."""
    if not isinstance(params, types.ElicitRequestFormParams):
        log(f"elicitation in mode {params.mode!r}: declining")
        return types.ElicitResult(action="decline")
    props: dict[str, Any] = (params.requested_schema or {}).get("properties", {}) or {}
    content = {k: v["default"] for k, v in props.items() if isinstance(v, dict) and "default" in v}
    log(f"elicitation {params.message!r}: accepting with defaults {json.dumps(content)}")
    return types.ElicitResult(action="accept", content=content)


class Failure(Exception):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise Failure(what)
    log(f"ok: {what}")


async def list_tool_names(session: ClientSession) -> list[str]:
    tools = await session.list_tools()
    names = [t.name for t in tools.tools]
    log(f"tools/list -> {names}")
    return names


async def call(session: ClientSession, name: str, args: dict[str, Any]) -> types.CallToolResult:
    log(f"tools/call {name} {json.dumps(args)}")
    result = await session.call_tool(name, args)
    assert isinstance(result, types.CallToolResult)
    log(f"tools/call {name} -> isError={result.is_error} text={text_of(result)!r}")
    return result


async def scenario(session: ClientSession, name: str) -> None:
    if name == "initialize":
        await list_tool_names(session)
    elif name == "tools_call":
        names = await list_tool_names(session)
        expect("add_numbers" in names, "add_numbers is listed")
        r = await call(session, "add_numbers", {"a": 2, "b": 3})
        expect(not r.is_error and "The sum of 2 and 3 is 5" in text_of(r), "add_numbers returned the sum")
    elif name == "elicitation-sep1034-client-defaults":
        names = await list_tool_names(session)
        expect("test_client_elicitation_defaults" in names, "test_client_elicitation_defaults is listed")
        r = await call(session, "test_client_elicitation_defaults", {})
        expect(not r.is_error and text_of(r).startswith("Elicitation completed"), "elicitation completed")
    elif name == "sse-retry":
        names = await list_tool_names(session)
        expect("test_reconnection" in names, "test_reconnection is listed")
        t = time.monotonic()
        r = await call(session, "test_reconnection", {})
        log(f"test_reconnection took {time.monotonic() - t:.3f}s")
        expect(
            not r.is_error and "Reconnection test completed successfully" in text_of(r),
            "test_reconnection answered after the reconnection",
        )
    elif name == "sep-2322-client-request-state":
        # A server of the stateless era only: its input_required results reach this
        # handshake-era client as real elicitation requests (the relay's bridge), and the
        # scenario server checks how the relay retries.
        names = await list_tool_names(session)
        for tool, want in [
            ("test_mrtr_echo_state", "echo-state-ok"),
            ("test_mrtr_unrelated", "unrelated-ok"),
            ("test_mrtr_no_state", None),
            ("test_mrtr_no_result_type", "no-result-type-test-ok"),
        ]:
            expect(tool in names, f"{tool} is listed")
            r = await call(session, tool, {})
            expect(not r.is_error and (want is None or want in text_of(r)), f"{tool} completed")
    elif name in GENERIC:
        # The scenario server checks what reaches it (headers, _meta): list, then call the
        # calls the scenario's context names (else every tool), read every resource and get
        # every prompt it offers.
        context = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
        names = await list_tool_names(session)
        calls = context.get("toolCalls") or [{"name": t, "arguments": {}} for t in names]
        for c in calls:
            expect(c["name"] in names, f"{c['name']} is listed")
            await call(session, c["name"], c.get("arguments") or {})
        for r in (await session.list_resources()).resources:
            await session.read_resource(r.uri)
        for p in (await session.list_prompts()).prompts:
            await session.get_prompt(p.name, {})
    else:
        raise Failure(f"unknown scenario {name!r}")


GENERIC = {
    "request-metadata",
    "http-standard-headers",
    "http-custom-headers",
    "http-invalid-tool-headers",
}
# Scenario servers that check every POST for the stateless era's _meta and headers: the
# relay is told to speak only that era to them (`auto` would also offer initialize).
ERA: dict[str, dict[str, str]] = {n: {"era": "modern"} for n in GENERIC}


async def run(url: str, name: str) -> None:
    workdir = os.environ.get("DRIVER_WORKDIR")
    if workdir:  # kept: the harness collects it with the results
        Path(workdir).mkdir(parents=True, exist_ok=True)
        await run_in(Path(tempfile.mkdtemp(prefix=f"{name}.", dir=workdir)), url, name)
    else:
        with tempfile.TemporaryDirectory(prefix="mcp-relay-client-driver.") as tmp:
            await run_in(Path(tmp), url, name)


async def run_in(tmp: Path, url: str, name: str) -> None:
    cfg = tmp / "relay.json"
    cfg.write_text(
        json.dumps(
            {
                "mcpServers": {"scenario": {"type": "http", "url": url, "prefix": "", **ERA.get(name, {})}},
                "relay": {"startupWaitMs": 10000},
            }
        )
    )
    log(f"scenario {name}; relay {RELAY} stdio --config {cfg} (backend {url})")
    params = StdioServerParameters(command=RELAY, args=["stdio", "--config", str(cfg)], env=dict(os.environ))
    async with stdio_client(params, errlog=sys.stderr) as (read, write):
        async with ClientSession(
            read,
            write,
            elicitation_callback=elicit_with_defaults,
            client_info=types.Implementation(name="mcp-relay-conformance-driver", version="1.0.0"),
        ) as session:
            init = await session.initialize()
            log(f"initialize -> {init.protocol_version} {init.server_info.name} {init.server_info.version}")
            await scenario(session, name)


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


async def _main_async(url: str, name: str, timeout: float) -> int:
    try:
        with anyio.fail_after(timeout):
            await run(url, name)
    except TimeoutError:
        log(f"FAIL: scenario {name} did not finish within {timeout:.0f}s")
        return 1
    except Failure as e:
        log(f"FAIL: {e}")
        return 1
    except BaseExceptionGroup as eg:  # task groups wrap what failed inside them
        leaves = _leaves(eg)
        if len(leaves) == 1 and isinstance(leaves[0], TimeoutError):
            log(f"FAIL: scenario {name} did not finish within {timeout:.0f}s")
        for e in leaves:
            log(f"FAIL: {type(e).__name__}: {e}")
        return 1
    except BaseException as e:  # noqa: BLE001 - report anything (incl. exception groups)
        log(f"FAIL: {type(e).__name__}: {e!r}")
        return 1
    log(f"PASS: scenario {name}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: client_driver.py <scenario server URL> (MCP_CONFORMANCE_SCENARIO set)", file=sys.stderr)
        sys.exit(2)
    sys.exit(
        anyio.run(
            _main_async,
            sys.argv[-1],
            os.environ.get("MCP_CONFORMANCE_SCENARIO", ""),
            float(os.environ.get("DRIVER_TIMEOUT", "25")),
        )
    )
