// crowdtrain web UI: hash router, login dialog, theme, and the polling that pages share.
//
// Stable test ids (data-testid), for tests/browser/ and docs/ui.md:
//   shell      nav, nav-brand, nav-{dashboard,nodes,chat,models,data,admin}, page, live-status,
//              theme-toggle, login-open, login-dialog, login-form, login-reason, login-token,
//              login-submit, login-forget, login-cancel, login-error, toast, admin-only,
//              login-needed, error
//   dashboard  page-dashboard, range-5m, range-1h, range-all, stat-version, stat-lr,
//              stat-train-loss, stat-valid-loss, stat-tokens-per-s, stat-nodes, stat-tokens,
//              chart-loss, chart-throughput, chart-updates, chart-round-time, chart-bytes,
//              chart-traffic, dashboard-empty, run-summary
//   nodes      page-nodes, nodes-table (rows: data-key=node_id), nodes-empty, node-map,
//              node-graph, server-resources
//   chat       page-chat, chat-model, chat-temperature, chat-top-k, chat-top-p,
//              chat-max-tokens, chat-clear, chat-log, chat-input, chat-send, chat-stop,
//              chat-message (each message; data-role=user|assistant), chat-upload-file,
//              chat-upload-name, chat-upload-submit, chat-upload-progress,
//              chat-upload-result, chat-unavailable, chat-empty, chat-error,
//              chat-model-info
//   models     page-models, models-table (rows: data-key=id), model-download-{id},
//              model-remove-{id} (imported ones; id as the API names it: current, v12,
//              imported:NAME), models-empty, import-name, import-file, import-submit,
//              import-progress, import-result, import-error
//   data       page-data, datasets-table, datasets-empty, upload-dataset, upload-split,
//              upload-file, upload-field, upload-paragraphs, upload-submit,
//              upload-progress, upload-result, upload-error, data-status, epoch-select,
//              epoch-coverage, epoch-empty
//   admin      page-admin, tokens-table, tokens-empty, token-role, token-uses, token-expires,
//              token-label, token-create, token-secret, token-copy, token-revoke-{id},
//              registered-table, registered-empty, node-ban-{node_id}, audit-table,
//              audit-empty, audit-action,
//              audit-older, audit-newest
// Charts carry role="img" and an aria-label naming what they plot.

import { API_BASE, api, token } from "./api.js";
import { h, replace } from "./ui.js";

const PAGES = {
  dashboard: () => import("./pages/dashboard.js"),
  nodes: () => import("./pages/nodes.js"),
  chat: () => import("./pages/chat.js"),
  models: () => import("./pages/models.js"),
  data: () => import("./pages/data.js"),
  admin: () => import("./pages/admin.js"),
};
const THEME_KEY = "crowdtrain.theme";
const root = document.getElementById("page");
let current = null; // {name, cleanups: [], generation}
let generation = 0;

/** What a page gets: timers and clean-ups that end when the user leaves it. */
function pageContext(name) {
  const state = { name, cleanups: [], generation: ++generation };
  const ctx = {
    get alive() {
      return current === state;
    },
    /** Run fn now and every `ms` while the page is shown and the tab visible; errors pass to onError. */
    every(ms, fn) {
      let timer = null;
      let running = false;
      const tick = async () => {
        if (!ctx.alive || running) return;
        running = true;
        let again = true;
        try {
          if (!document.hidden) await fn();
          setLive(true);
        } catch (error) {
          if (error?.status === 0) setLive(false);
          // each refused token counts towards the server's failed-login limit for this
          // address: stop until a new token re-mounts the page
          if (error?.status === 401) again = false;
        } finally {
          running = false;
          if (ctx.alive && again) timer = setTimeout(tick, ms);
        }
      };
      tick();
      state.cleanups.push(() => clearTimeout(timer));
    },
    onCleanup(fn) {
      state.cleanups.push(fn);
    },
    rerender: () => route(true),
  };
  state.ctx = ctx;
  return state;
}

function setLive(ok) {
  const dot = document.querySelector("[data-testid=live-status]");
  dot.classList.toggle("ok", ok);
  dot.classList.toggle("down", !ok);
  dot.title = ok ? "connected to the server" : "the server does not answer";
}

const HEALTH_MS = 10_000;

/** Keep the dot true on every page, polling ones or not: any answer from the public /health
 * (a 503 included) means the server is reachable; only a failed request means it is not. */
async function watchHealth() {
  if (!document.hidden) {
    try {
      await fetch(new URL("health", API_BASE), { cache: "no-store" });
      setLive(true);
    } catch {
      setLive(false);
    }
  }
  setTimeout(watchHealth, HEALTH_MS);
}

async function route(force = false) {
  const name = (location.hash.replace(/^#\/?/, "").split(/[/?]/)[0] || "dashboard").toLowerCase();
  if (!PAGES[name]) {
    location.hash = "#/dashboard";
    return;
  }
  if (!force && current?.name === name) return;
  for (const fn of current?.cleanups || []) fn();
  const state = pageContext(name);
  current = state;
  for (const link of document.querySelectorAll(".tabs a")) {
    link.toggleAttribute("aria-current", link.getAttribute("href") === `#/${name}`);
    if (link.hasAttribute("aria-current")) link.setAttribute("aria-current", "page");
  }
  const role = token.role();
  document.querySelector("[data-testid=login-open]").textContent =
    role === "none" ? "Sign in" : role === "other" ? "Token" : `Token: ${role}`;
  const module = await PAGES[name]();
  if (current !== state) return; // the user moved on while the module loaded
  document.title = `${module.default.title} · crowdtrain`;
  const container = h("section", { testid: `page-${name}`, "aria-label": module.default.title });
  replace(root, container);
  module.default.mount(container, state.ctx);
}

// ---- login ---------------------------------------------------------------------------------

const dialog = document.getElementById("login");
let dismissedAt = 0;

function openLogin(reason = "") {
  if (dialog.open) return;
  dialog.querySelector("[data-testid=login-reason]").textContent = reason;
  dialog.querySelector("[data-testid=login-error]").hidden = true;
  const input = dialog.querySelector("[data-testid=login-token]");
  input.value = token.get();
  dialog.showModal();
  input.focus();
}

dialog.addEventListener("close", async () => {
  const action = dialog.returnValue;
  if (action === "forget") token.clear();
  if (action === "save") {
    const value = dialog.querySelector("[data-testid=login-token]").value.trim();
    if (!value) return;
    token.set(value);
    try {
      await api("info");
    } catch (error) {
      if (error.status === 401 || error.status === 403) {
        openLogin("");
        const box = dialog.querySelector("[data-testid=login-error]");
        box.textContent = `The server refused this token: ${error.message}`;
        box.hidden = false;
        return;
      }
    }
  }
  if (action === "cancel") dismissedAt = Date.now();
  route(true);
});

window.addEventListener("crowdtrain:unauthorized", (event) => {
  // a cancelled dialog stays closed for a minute, so that polling does not reopen it at once
  if (Date.now() - dismissedAt < 60_000) return;
  const had = token.get();
  openLogin(had
    ? `The server refused the saved token (${event.detail.message}). Enter another one.`
    : "This server asks for a token: its dashboard is not public (public_dashboard is off), or this page needs an admin.");
});

document.querySelector("[data-testid=login-open]").addEventListener("click", () => openLogin(""));

// ---- theme ---------------------------------------------------------------------------------

function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
}
applyTheme(localStorage.getItem(THEME_KEY));
document.querySelector("[data-testid=theme-toggle]").addEventListener("click", () => {
  const dark = document.documentElement.dataset.theme
    ? document.documentElement.dataset.theme === "dark"
    : window.matchMedia("(prefers-color-scheme: dark)").matches;
  const next = dark ? "light" : "dark";
  localStorage.setItem(THEME_KEY, next);
  applyTheme(next);
  route(true); // charts take their theme when they are made
});
window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
  if (!localStorage.getItem(THEME_KEY)) route(true);
});

window.addEventListener("hashchange", () => route());
// the vendored scripts are `defer`: they have run before this module does
route(true);
watchHealth();
