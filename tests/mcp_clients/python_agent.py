"""An AI agent's side of tests/mcp.rs, with the official Python SDK (PyPI `mcp`, revision 2026-07-28).

Usage: python_agent.py URL SCENARIO [ARG]. The API key, if any, comes from STEPFLOW_API_KEY and is
sent in `Authorization` only. Each scenario prints one JSON object per line on stdout; the Rust test
reads them and decides what is right.
"""

import asyncio
import json
import os
import sys
import time

import httpx2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ResourceUpdated, ToolsListChanged


def say(**fields):
    print(json.dumps(fields), flush=True)


def client(url):
    key = os.environ.get("STEPFLOW_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    http = httpx2.AsyncClient(headers=headers, timeout=30)
    # No response cache: every list must reach the gateway (the tests count what it answers).
    return Client(streamable_http_client(url, http_client=http), cache=None)


def result_of(r):
    text = "\n".join(c.text for c in r.content if getattr(c, "text", None) is not None)
    return {"isError": bool(r.is_error), "structured": r.structured_content, "text": text}


async def tour(url, device):
    async with client(url) as c:
        say(step="connected", protocol=c.protocol_version)
        tools = await c.list_tools()
        say(step="tools", tools=[{"name": t.name, "inputSchema": t.input_schema,
                                  "outputSchema": t.output_schema, "description": t.description}
                                 for t in tools.tools])
        resources = await c.list_resources()
        say(step="resources", uris=[str(r.uri) for r in resources.resources])
        templates = await c.list_resource_templates()
        say(step="templates", uris=[t.uri_template for t in templates.resource_templates])
        r = await c.call_tool("publish_iot_commands", {"deviceId": device, "payload": {"action": "reboot"}})
        say(step="publish", **result_of(r))
        r = await c.call_tool("publish_iot_commands", {"deviceId": device, "payload": {"action": "explode"}})
        say(step="publish_invalid", **result_of(r))
        r = await c.call_tool("call_device-registry_getDevice", {"path": {"deviceId": device}})
        say(step="call", **result_of(r))
        r = await c.call_tool("call_device-registry_getDevice", {"path": {"deviceId": "NOT VALID"}})
        say(step="call_invalid", **result_of(r))
        r = await c.call_tool("read_messages", {"channel": "iot.telemetry", "last": 10})
        say(step="read", **result_of(r))
        r = await c.call_tool("describe_channel", {"channel": "iot.telemetry"})
        say(step="describe", **result_of(r))
        read = await c.read_resource("stepflow://channels/iot.telemetry")
        say(step="resource", text=read.contents[0].text)
        read = await c.read_resource(f"stepflow://channels/iot.telemetry/{device}")
        say(step="resource_template", text=read.contents[0].text)


async def scoped(url, _arg):
    async with client(url) as c:
        tools = await c.list_tools()
        say(step="tools", names=[t.name for t in tools.tools])
        r = await c.call_tool("publish_iot_commands", {"deviceId": "d1", "payload": {"action": "reboot"}})
        say(step="publish", **result_of(r))
        r = await c.call_tool("call_device-registry_getDevice", {"path": {"deviceId": "d1"}})
        say(step="call", **result_of(r))
        r = await c.call_tool("read_messages", {"channel": "iot.telemetry", "last": 1})
        say(step="read", **result_of(r))


async def publish(url, device):
    async with client(url) as c:
        r = await c.call_tool("publish_iot_commands", {"deviceId": device, "payload": {"action": "reboot"}})
        say(step="publish", **result_of(r))


async def listen(url, uri):
    """Listens for updates of `uri` and for tool list changes; prints each event as it comes."""
    async with client(url) as c:
        async with c.listen(tools_list_changed=True, resource_subscriptions=[uri]) as sub:
            say(step="ready")
            async for event in sub:
                if isinstance(event, ResourceUpdated):
                    say(step="event", kind="resource_updated", uri=str(event.uri), at=time.time())
                elif isinstance(event, ToolsListChanged):
                    tools = await c.list_tools()
                    say(step="event", kind="tools_list_changed", at=time.time(),
                        names=[t.name for t in tools.tools])


async def publish_many(url, count):
    """Publishes `count` commands one after another (the bench's MCP side): prints the time."""
    async with client(url) as c:
        started = time.perf_counter()
        for i in range(int(count)):
            r = await c.call_tool("publish_iot_commands", {"deviceId": "bench", "payload": {"action": "identify"}})
            if r.is_error:
                say(step="error", text=result_of(r)["text"])
                return
        say(step="done", seconds=time.perf_counter() - started)


SCENARIOS = {"tour": tour, "publish": publish, "scoped": scoped, "listen": listen, "publish_many": publish_many}

if __name__ == "__main__":
    url, scenario = sys.argv[1], sys.argv[2]
    arg = sys.argv[3] if len(sys.argv) > 3 else ""
    asyncio.run(SCENARIOS[scenario](url, arg))
