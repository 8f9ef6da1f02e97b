// Nodes: every node the server has seen (GET info `nodes`), a world map of those that report a
// "lat,lon" location, and a graph around the server of the others; live.

import { api } from "../api.js";
import { badge, chart, empty, failure, fmt, h, replace, table } from "../ui.js";

const POLL_MS = 3000;
let worldMap = null; // the registered ECharts map, loaded once per page load

/** [lon, lat] from a location such as "48.85,2.35" or "48.85, 2.35"; null for anything else. */
export function parseLocation(text) {
  const match = /^\s*(-?\d+(?:\.\d+)?)\s*[,;]\s*(-?\d+(?:\.\d+)?)\s*$/.exec(text || "");
  if (!match) return null;
  const [lat, lon] = [Number(match[1]), Number(match[2])];
  return Math.abs(lat) <= 90 && Math.abs(lon) <= 180 ? [lon, lat] : null;
}

async function loadWorld() {
  if (!worldMap) {
    worldMap = fetch("vendor/countries-110m.json").then((r) => r.json()).then((topology) => {
      window.echarts.registerMap("world", foldAntimeridian(window.topojson.feature(topology, topology.objects.countries)));
      return "world";
    });
  }
  return worldMap;
}

const STATE_COLOURS = { online: "#2f9e63", http: "#d69e2e", gone: "#c53030" };

function nodeState(node) {
  if (node.state === "gone") return "gone";
  return node.connected ? (node.state === "online" ? "online" : "http") : "gone";
}

function device(node) {
  const caps = node.capabilities || {};
  const parts = [caps.device, caps.device_name].filter(Boolean);
  if (caps.memory_bytes) parts.push(fmt.bytes(caps.memory_bytes));
  if (caps.cpu_count) parts.push(`${caps.cpu_count} CPU`);
  return parts.join(" · ") || "–";
}

/** "used / total" or just one of them, as far as they are known. */
function ofTotal(used, total) {
  if (used == null) return null;
  return total ? `${fmt.bytes(used)} / ${fmt.bytes(total)}` : fmt.bytes(used);
}

/** Heartbeat figures the node sends when it can measure them (CPU, memory, GPU via NVML). */
export function resources(node) {
  const parts = [];
  if (node.cpu_percent != null) parts.push(`CPU ${fmt.number(node.cpu_percent)}%`);
  const memory = ofTotal(node.memory_used_bytes, node.memory_total_bytes);
  if (memory) parts.push(`mem ${memory}`);
  if (node.rss_bytes != null) parts.push(`RSS ${fmt.bytes(node.rss_bytes)}`);
  if (node.gpu_utilization_percent != null) parts.push(`GPU ${fmt.number(node.gpu_utilization_percent)}%`);
  const gpuMemory = ofTotal(node.gpu_memory_used_bytes ?? node.gpu_memory_bytes, node.gpu_memory_total_bytes);
  if (gpuMemory) parts.push(`GPU mem ${gpuMemory}`);
  return parts.join(" · ") || "–";
}

/** The server's own figures (GET info `server`, from psutil) in one line. */
function serverLine(server) {
  const parts = [];
  if (server.cpu_percent != null) parts.push(`CPU ${fmt.number(server.cpu_percent)}% of its process`);
  if (server.system_cpu_percent != null) parts.push(`machine ${fmt.number(server.system_cpu_percent)}%`);
  if (server.rss_bytes != null) parts.push(`RSS ${fmt.bytes(server.rss_bytes)}`);
  if (server.memory_available_bytes != null) parts.push(`memory free ${fmt.bytes(server.memory_available_bytes)} of ${fmt.bytes(server.memory_total_bytes)}`);
  if (server.disk_free_bytes != null) parts.push(`disk free ${fmt.bytes(server.disk_free_bytes)}`);
  if (Array.isArray(server.load_average)) parts.push(`load ${server.load_average.map((v) => v.toFixed(2)).join(" ")}`);
  if (server.started_at) parts.push(`up since ${fmt.time(server.started_at)}`);
  return `server: ${parts.join(" · ")}`;
}

/** Rings that cross the antimeridian would be drawn as lines across the whole map: fold the
 * stray side onto the edge (a sliver of Chukotka and Fiji moves, nothing else). */
function foldAntimeridian(collection) {
  const fold = (ring) => {
    if (!ring.some((point, i) => i && Math.abs(point[0] - ring[i - 1][0]) > 180)) return ring;
    const east = ring.filter((point) => point[0] > 0).length >= ring.length / 2;
    return ring.map(([lon, lat]) => [east ? (lon < 0 ? 180 : lon) : lon > 0 ? -180 : lon, lat]);
  };
  // no node runs on Antarctica, and its ring spans every longitude: leave it out
  collection.features = collection.features.filter((feature) => feature.properties?.name !== "Antarctica");
  for (const feature of collection.features) {
    const geometry = feature.geometry;
    if (geometry?.type === "Polygon") geometry.coordinates = geometry.coordinates.map(fold);
    if (geometry?.type === "MultiPolygon") geometry.coordinates = geometry.coordinates.map((polygon) => polygon.map(fold));
  }
  return collection;
}

const COLUMNS = [
  ["node", (n) => h("strong", {}, n.node_id)],
  ["state", (n) => badge(nodeState(n) === "gone" && n.gone_reason ? `gone: ${n.gone_reason}` : nodeState(n), nodeState(n))],
  ["status", (n) => n.status || "–"],
  ["device", device, "wrap"],
  ["location", (n) => n.capabilities?.location || "–", "wrap"],
  ["tokens/s", (n) => fmt.compact(n.tokens_per_s), "num"],
  ["tokens", (n) => fmt.compact(n.tokens), "num"],
  ["accepted", (n) => fmt.number(n.updates_accepted), "num"],
  ["refused", (n) => fmt.number(n.updates_refused), "num"],
  ["density", (n) => fmt.percent(n.density), "num"],
  ["upload", (n) => fmt.rate(n.upload_bytes_per_s), "num"],
  ["rtt", (n) => fmt.seconds(n.rtt_s), "num"],
  ["loss", (n) => fmt.loss(n.last_loss), "num"],
  ["held", (n) => (n.held_version ?? n.last_version ?? "–"), "num"],
  ["in / out", (n) => `${fmt.bytes(n.bytes_in)} / ${fmt.bytes(n.bytes_out)}`, "num wrap"],
  ["resources", resources, "wrap"],
  ["last seen", (n) => fmt.ago(n.last_seen)],
];

export default {
  title: "Nodes",
  mount(root, ctx) {
    const notice = h("div");
    const summary = h("div", { class: "muted" }, "loading…");
    const tableBox = h("div", {}, "");
    const serverBox = h("div", { class: "muted", testid: "server-resources" });
    const mapBox = h("div", { class: "chart tall", testid: "node-map" });
    const graphBox = h("div", { class: "chart tall", testid: "node-graph" });
    const mapPanel = h("div", { class: "panel", hidden: true }, h("h2", {}, "Where the nodes are"), mapBox);
    const graphPanel = h("div", { class: "panel" }, h("h2", {}, "Swarm"), graphBox);
    replace(root,
      h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Nodes"), summary)),
      notice,
      h("div", { class: "panel", style: "margin-bottom:16px" }, tableBox, serverBox),
      h("div", { class: "grid" }, mapPanel, graphPanel));
    const map = chart(mapBox, "world map of the nodes that report a location");
    const graph = chart(graphBox, "graph of the nodes around the server, coloured by state");
    ctx.onCleanup(() => { map.dispose(); graph.dispose(); });

    ctx.every(POLL_MS, async () => {
      let info;
      try {
        info = await api("info");
      } catch (error) {
        replace(notice, failure(error));
        throw error;
      }
      replace(notice);
      if (!ctx.alive) return;
      const nodes = (info.nodes || []).slice().sort((a, b) => (b.last_seen || 0) - (a.last_seen || 0));
      const online = nodes.filter((n) => nodeState(n) !== "gone").length;
      summary.textContent = `${online} connected of ${nodes.length} seen since the server started · version ${info.version}`;
      replace(tableBox, nodes.length
        ? table("nodes-table", COLUMNS, nodes, (n) => n.node_id)
        : empty("nodes-empty", "No nodes yet",
          "Nobody trains on this server yet. Make an enrollment token (admin) and start a trainer node on any machine. To place it on the map, give it a location: crowdtrain node ... --location 48.85,2.35 (latitude,longitude).",
          "crowdtrain tokens create --role node\ncrowdtrain node --server URL --token ct_enroll_..."));
      replace(serverBox, info.server ? serverLine(info.server) : null);
      await drawMap(nodes);
      drawGraph(nodes.filter((n) => !parseLocation(n.capabilities?.location)), nodes.length);
    });

    async function drawMap(nodes) {
      const located = nodes.filter((n) => parseLocation(n.capabilities?.location));
      mapPanel.hidden = !located.length;
      if (!located.length) return;
      await loadWorld();
      map.instance.resize();
      map.set({
        tooltip: { trigger: "item", formatter: (p) => `${p.name}: ${p.data.state}` },
        geo: { map: "world", roam: true, itemStyle: { areaColor: "rgba(128,128,128,.18)", borderColor: "rgba(128,128,128,.5)" }, emphasis: { disabled: true } },
        series: [{
          type: "scatter", coordinateSystem: "geo", symbolSize: 12,
          data: located.map((n) => ({ name: n.node_id, state: nodeState(n), value: parseLocation(n.capabilities.location), itemStyle: { color: STATE_COLOURS[nodeState(n)] } })),
          label: { show: true, formatter: "{b}", position: "right", fontSize: 11 },
        }],
      });
    }

    function drawGraph(nodes, total) {
      graphPanel.querySelector("h2").textContent = total > nodes.length ? "Nodes without a location" : "Swarm";
      const data = [{ name: "server", symbolSize: 34, itemStyle: { color: "#2f6fed" }, label: { show: true } }];
      for (const n of nodes) {
        data.push({
          name: n.node_id, state: nodeState(n), symbolSize: 12 + Math.min(18, Math.sqrt(n.updates_accepted || 0)),
          itemStyle: { color: STATE_COLOURS[nodeState(n)] }, label: { show: true },
        });
      }
      // a force layout restarts on every setOption: redraw only when the swarm changed
      const signature = JSON.stringify(data.map((d) => [d.name, d.state]));
      if (signature === graph.signature) return;
      graph.signature = signature;
      graph.set({
        tooltip: { formatter: (p) => (p.dataType === "node" && p.data.state ? `${p.name}: ${p.data.state}` : p.name) },
        series: [{
          type: "graph", layout: "force", roam: true, force: { repulsion: 220, edgeLength: 110 },
          data, links: nodes.map((n) => ({ source: "server", target: n.node_id, lineStyle: { type: nodeState(n) === "online" ? "solid" : "dashed" } })),
          label: { position: "right", fontSize: 11 }, lineStyle: { opacity: 0.6, width: 1.5 },
        }],
      });
    }
  },
};
