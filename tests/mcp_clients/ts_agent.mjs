// An AI agent's side of tests/mcp.rs, with the official TypeScript SDK (npm
// @modelcontextprotocol/sdk, revision 2025-11-25: a session, resources/subscribe).
//
// Usage: node ts_agent.mjs URL SCENARIO [ARG]. The API key, if any, comes from STEPFLOW_API_KEY and
// is sent in `Authorization` only. Each scenario prints one JSON object per line on stdout.

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import {
  ResourceUpdatedNotificationSchema,
  ToolListChangedNotificationSchema,
} from "@modelcontextprotocol/sdk/types.js";

const say = (fields) => process.stdout.write(JSON.stringify(fields) + "\n");

async function connect(url) {
  const key = process.env.STEPFLOW_API_KEY;
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
  const client = new Client({ name: "stepflow-test-agent", version: "1.0.0" });
  await client.connect(transport);
  return { client, transport };
}

const resultOf = (r) => ({
  isError: Boolean(r.isError),
  structured: r.structuredContent ?? null,
  text: (r.content ?? []).filter((c) => c.type === "text").map((c) => c.text).join("\n"),
});

async function tour(url, device) {
  const { client, transport } = await connect(url);
  say({ step: "connected", protocol: transport.protocolVersion ?? null, session: transport.sessionId ?? null });
  const tools = await client.listTools();
  say({ step: "tools", names: tools.tools.map((t) => t.name) });
  const resources = await client.listResources();
  say({ step: "resources", uris: resources.resources.map((r) => r.uri) });
  let r = await client.callTool({
    name: "publish_iot_commands",
    arguments: { deviceId: device, payload: { action: "identify" } },
  });
  say({ step: "publish", ...resultOf(r) });
  r = await client.callTool({ name: "call_device-registry_getDevice", arguments: { path: { deviceId: device } } });
  say({ step: "call", ...resultOf(r) });
  r = await client.callTool({ name: "read_messages", arguments: { channel: "iot.telemetry", last: 10 } });
  say({ step: "read", ...resultOf(r) });
  await client.close();
}

async function subscribe(url, uri) {
  const { client } = await connect(url);
  client.setNotificationHandler(ResourceUpdatedNotificationSchema, (n) =>
    say({ step: "event", kind: "resource_updated", uri: n.params.uri, at: Date.now() / 1000 }),
  );
  client.setNotificationHandler(ToolListChangedNotificationSchema, async () => {
    const tools = await client.listTools();
    say({ step: "event", kind: "tools_list_changed", at: Date.now() / 1000, names: tools.tools.map((t) => t.name) });
  });
  await client.subscribeResource({ uri });
  say({ step: "ready" });
  // Runs until the test kills it.
  await new Promise(() => {});
}

const scenarios = { tour, subscribe };
const [url, scenario, arg] = process.argv.slice(2);
scenarios[scenario](url, arg ?? "").catch((e) => {
  say({ step: "failed", error: String(e?.stack ?? e) });
  process.exit(1);
});
