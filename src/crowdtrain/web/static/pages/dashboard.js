// Dashboard: the run's figures and charts, from GET history (rounds, evals) and GET info, live.

import { api } from "../api.js";
import { chart, empty, failure, fmt, h, replace } from "../ui.js";

const POLL_MS = 3000;
const RANGES = { "5m": ["last 5 min", 300], "1h": ["last hour", 3600], all: ["all", Infinity] };
const RATE_WINDOW = 8; // rounds averaged for tokens/s and samples/s

/** Tokens/s and samples/s at each round: what the last RATE_WINDOW rounds trained per second. */
export function throughput(rounds) {
  return rounds.map((round, index) => {
    const first = rounds[Math.max(0, index - RATE_WINDOW)];
    const span = round.time - first.time;
    const window = rounds.slice(Math.max(0, index - RATE_WINDOW) + 1, index + 1);
    const tokens = window.reduce((sum, r) => sum + (r.tokens || 0), 0);
    const samples = window.reduce((sum, r) => sum + (r.samples || 0), 0);
    return span > 0 ? [round.version, tokens / span, samples / span] : [round.version, null, null];
  });
}

function stat(testid, label) {
  const value = h("div", { class: "value" }, "–");
  return { node: h("div", { class: "stat", testid }, h("div", { class: "label" }, label), value), value };
}

// units are in the panel titles, so that axis names never collide with the legend
const axis = () => ({ type: "value", scale: true });
const versionAxis = { type: "value", name: "version", min: "dataMin", max: "dataMax", minInterval: 1, nameLocation: "middle", nameGap: 24, axisLabel: { hideOverlap: true } };
const base = { grid: { left: 56, right: 16, top: 32, bottom: 40 }, tooltip: { trigger: "axis" }, legend: { top: 0 } };

export default {
  title: "Dashboard",
  mount(root, ctx) {
    let range = localStorage.getItem("crowdtrain.range") || "1h";
    const rounds = new Map(); // version -> round record
    const evals = new Map();
    let info = null;
    const stats = {
      version: stat("stat-version", "version"),
      lr: stat("stat-lr", "learning rate"),
      train: stat("stat-train-loss", "train loss"),
      valid: stat("stat-valid-loss", "valid loss"),
      speed: stat("stat-tokens-per-s", "tokens/s"),
      nodes: stat("stat-nodes", "nodes online"),
      tokens: stat("stat-tokens", "tokens trained"),
    };
    const buttons = Object.entries(RANGES).map(([key, [label]]) =>
      h("button", { type: "button", testid: `range-${key}`, "aria-pressed": String(key === range), onclick: () => setRange(key) }, label));
    const notice = h("div");
    const body = h("div");
    replace(root,
      h("div", { class: "page-head" },
        h("div", {}, h("h1", {}, "Training"), h("div", { class: "muted", testid: "run-summary" }, "loading…")),
        h("div", { class: "segmented", role: "group", "aria-label": "time range" }, buttons)),
      notice,
      h("div", { class: "stats" }, Object.values(stats).map((s) => s.node)),
      body);

    const panels = {};
    const charts = {};
    const specs = [
      ["loss", "chart-loss", "Loss", "training and validation loss by version"],
      ["throughput", "chart-throughput", "Tokens/s and samples/s", "tokens per second and samples per second by version"],
      ["updates", "chart-updates", "Updates per round", "updates and distinct nodes in each round, by version"],
      ["roundTime", "chart-round-time", "Round duration (s)", "round duration and apply-thread timings in seconds, by version"],
      ["bytes", "chart-bytes", "Update bytes per round", "bytes of updates received per round over the wire, by version"],
      ["traffic", "chart-traffic", "Traffic since start: wire vs raw", "bytes in and out by kind, over the wire and before compression"],
    ];
    const grid = h("div", { class: "grid" });
    for (const [key, testid, title] of specs) {
      const box = h("div", { class: "chart", testid });
      panels[key] = h("div", { class: "panel" }, h("h2", {}, title), box);
      grid.append(panels[key]);
    }
    const emptyState = empty("dashboard-empty", "No training rounds yet",
      "The server is waiting for trainer nodes. Make an enrollment token and start a node; each update it sends closes a round and the charts fill in.",
      "crowdtrain tokens create --role node\ncrowdtrain node --server URL --token ct_enroll_...");
    for (const [key, testid, , label] of specs) {
      charts[key] = chart(panels[key].querySelector(`[data-testid=${testid}]`), label);
    }
    ctx.onCleanup(() => Object.values(charts).forEach((c) => c.dispose()));

    function setRange(key) {
      range = key;
      localStorage.setItem("crowdtrain.range", key);
      buttons.forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.testid === `range-${key}`)));
      draw();
    }

    async function poll() {
      // evals arrive after their round: ask again from the last eval's version, dedupe by version
      const lastEval = Math.max(-1, ...evals.keys());
      const lastRound = Math.max(-1, ...rounds.keys());
      const since = lastEval >= 0 ? Math.min(lastRound, lastEval) : Math.max(-1, lastRound - 50);
      const [history, infoNow] = await Promise.all([
        api("history", { query: { since: rounds.size ? since : -1, limit: 10000 } }),
        api("info"),
      ]);
      if (!ctx.alive) return;
      if (info && infoNow.lineage !== info.lineage) {
        rounds.clear();
        evals.clear();
      }
      for (const r of history.rounds) rounds.set(r.version, r);
      for (const e of history.evals) evals.set(e.version, e);
      info = infoNow;
      replace(notice);
      draw();
    }
    ctx.every(POLL_MS, () => poll().catch((error) => {
      replace(notice, failure(error));
      throw error;
    }));

    function draw() {
      if (!info) return;
      const horizon = Date.now() / 1000 - RANGES[range][1];
      const all = [...rounds.values()].sort((a, b) => a.version - b.version);
      const shown = all.filter((r) => r.time >= horizon);
      const shownEvals = [...evals.values()].sort((a, b) => a.version - b.version).filter((e) => e.time >= horizon);
      const last = all.at(-1);
      const lastEval = [...evals.values()].sort((a, b) => a.version - b.version).at(-1);
      const rates = throughput(all);
      const online = (info.nodes || []).filter((n) => n.connected).length;
      stats.version.value.textContent = fmt.number(info.version);
      stats.lr.value.textContent = last ? Number(last.lr).toExponential(2) : fmt.number(info.training?.lr, 4);
      stats.train.value.textContent = fmt.loss(last?.train_loss);
      stats.valid.value.textContent = fmt.loss(lastEval?.valid_loss);
      stats.speed.value.textContent = fmt.compact(rates.at(-1)?.[1]);
      stats.nodes.value.textContent = `${online} / ${(info.nodes || []).length}`;
      stats.tokens.value.textContent = fmt.compact(info.totals?.tokens);
      root.querySelector("[data-testid=run-summary]").textContent =
        `${info.model?.preset} model, ${fmt.compact(info.model?.parameters)} parameters · ${info.training?.algorithm} · data ${info.data?.dataset ?? info.corpus}/${info.data?.split ?? "train"} · epoch ${info.data?.epoch ?? "–"}`;

      if (!all.length) {
        replace(body, h("div", { class: "panel" }, emptyState));
        return;
      }
      if (!grid.isConnected) {
        replace(body, grid);
        Object.values(charts).forEach((c) => c.instance.resize());
      }
      const since = new Set(shown.map((r) => r.version));
      charts.loss.set({
        ...base, xAxis: versionAxis, yAxis: axis(),
        series: [
          { name: "train", type: "line", showSymbol: false, data: shown.map((r) => [r.version, r.train_loss]) },
          { name: "valid", type: "line", symbolSize: 4, data: shownEvals.map((e) => [e.version, e.valid_loss]) },
        ],
      });
      const rateShown = rates.filter(([version]) => since.has(version));
      charts.throughput.set({
        ...base, xAxis: versionAxis, yAxis: [axis(), { ...axis(), splitLine: { show: false } }],
        grid: { ...base.grid, right: 56 },
        series: [
          { name: "tokens/s", type: "line", showSymbol: false, data: rateShown.map(([v, t]) => [v, t]) },
          { name: "samples/s", type: "line", showSymbol: false, yAxisIndex: 1, lineStyle: { type: "dashed", width: 1 }, data: rateShown.map(([v, , s]) => [v, s]) },
        ],
      });
      charts.updates.set({
        ...base, xAxis: versionAxis, yAxis: { ...axis(), minInterval: 1 },
        series: [
          { name: "updates", type: "bar", data: shown.map((r) => [r.version, r.updates]) },
          { name: "nodes", type: "line", showSymbol: false, step: "middle", data: shown.map((r) => [r.version, r.nodes]) },
        ],
      });
      charts.roundTime.set({
        ...base, xAxis: versionAxis, yAxis: axis(),
        series: ["round_s", "optimizer_s", "aggregate_s", "publish_s"].map((key) => ({
          name: key.replace("_s", ""), type: "line", showSymbol: false, data: shown.map((r) => [r.version, r[key]]),
        })),
      });
      charts.bytes.set({
        ...base, xAxis: versionAxis, yAxis: { ...axis(), axisLabel: { formatter: fmt.bytes } },
        tooltip: { trigger: "axis", valueFormatter: fmt.bytes },
        series: [{ name: "update bytes in (wire)", type: "bar", data: shown.map((r) => [r.version, r.wire_bytes]) }],
      });
      const kinds = Object.keys(info.traffic || {});
      charts.traffic.set({
        ...base, tooltip: { trigger: "axis", valueFormatter: fmt.bytes },
        xAxis: { type: "category", axisLabel: { interval: 0 }, data: kinds.map((k) => (k === "update" ? "update in" : `${k} out`)) },
        yAxis: { ...axis(), axisLabel: { formatter: fmt.bytes } },
        series: [
          { name: "wire", type: "bar", data: kinds.map((k) => info.traffic[k].wire) },
          { name: "raw", type: "bar", data: kinds.map((k) => info.traffic[k].raw) },
        ],
      });
    }
  },
};
