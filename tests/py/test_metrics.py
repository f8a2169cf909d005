"""`/metrics` read by the Prometheus project's own OpenMetrics parser after known traffic from
the official SDK: request counts by method and outcome, the tools/call latency histogram of
each server, backend gauges, build info."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conftest import EXAMPLE, LogRegistry, http_relay, http_relay_client

pytestmark = pytest.mark.anyio


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    base = url.removesuffix("/mcp")
    r = httpx.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/openmetrics-text"), r.headers
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(r.text):
        assert family.name.startswith("mcp_relay_"), family.name
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    found = [v for (l, v) in samples.get(name, []) if all(l.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


async def test_metrics_after_known_traffic(tmp_path: Path, logs: LogRegistry) -> None:
    config = tmp_path / "relay-metrics.json"
    config.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "a": {"command": str(EXAMPLE), "args": ["--name", "a"]},
                    "b": {"command": str(EXAMPLE), "args": ["--name", "b"]},
                },
                "relay": {"requestTimeoutMs": 30000, "startupWaitMs": 30000},
            }
        )
    )
    with http_relay(config, logs, "relay stderr (metrics)") as relay:
        relay.wait_for_tools(["a", "b"])
        before = scrape(relay.url)
        async with http_relay_client(relay.url) as c:
            for i in range(3):
                r = await c.call_tool("a__echo", {"text": f"hello {i}"})
                assert not r.is_error, r
            r = await c.call_tool("b__add", {"a": 2, "b": 3})
            assert not r.is_error, r
            with pytest.raises(Exception):
                await c.call_tool("nope__missing", {})
        after = scrape(relay.url)

    def delta(name: str, **labels: str) -> float:
        old = [v for (l, v) in before.get(name, []) if all(l.get(k) == x for k, x in labels.items())]
        return value(after, name, **labels) - (old[0] if old else 0.0)

    assert delta("mcp_relay_requests_total", method="tools/call", outcome="ok") == 4
    assert delta("mcp_relay_requests_total", method="tools/call", outcome="error") == 1
    assert delta("mcp_relay_tool_call_duration_seconds_count", server="a") == 3
    assert delta("mcp_relay_tool_call_duration_seconds_count", server="b") == 1
    # Buckets are cumulative and end at +Inf with the count; the sum is a sane latency.
    buckets = sorted(
        ((float(l["le"]), v) for (l, v) in after["mcp_relay_tool_call_duration_seconds_bucket"] if l["server"] == "a"),
    )
    assert buckets[0][0] == 0.0001 and buckets[-1][0] == float("inf"), buckets
    assert all(x[1] <= y[1] for x, y in zip(buckets, buckets[1:])), buckets
    assert buckets[-1][1] == value(after, "mcp_relay_tool_call_duration_seconds_count", server="a")
    assert 0 < value(after, "mcp_relay_tool_call_duration_seconds_sum", server="a") < 30
    for server in ("a", "b"):
        assert value(after, "mcp_relay_backend_up", server=server) == 1
        assert value(after, "mcp_relay_backend_state", server=server, state="ready") == 1
        assert value(after, "mcp_relay_backend_state", server=server, state="failed") == 0
        assert value(after, "mcp_relay_backend_tools", server=server) >= 10
        assert value(after, "mcp_relay_backend_in_flight", server=server) == 0
    assert value(after, "mcp_relay_build_info")  == 1
    assert any(l.get("version") for (l, _) in after["mcp_relay_build_info"])
    # The SDK session ended; the scrape's own connection is the only one open.
    assert value(after, "mcp_relay_sessions_active", front="http") <= 1
    assert value(after, "mcp_relay_http_connections_active") >= 1
    # No session ids or arguments in any label.
    for name, samples in after.items():
        for labels, _ in samples:
            for v in labels.values():
                assert "hello" not in v and len(v) < 64, (name, labels)
