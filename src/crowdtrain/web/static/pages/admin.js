// Admin: enrollment and API tokens (GET/POST/DELETE tokens), registered nodes and bans
// (GET/DELETE nodes), and the audit log (GET audit, newest first, paged with ?before=).

import { api } from "../api.js";
import { badge, copy, empty, failure, fmt, h, replace, table, toast } from "../ui.js";

const AUDIT_PAGE = 50;
const ACTIONS = ["", "token.create", "token.revoke", "node.register", "node.revoke", "data.upload",
  "update.refused", "auth.refused", "register.refused", "refresh.refused", "model.import", "model.remove"];

export default {
  title: "Admin",
  mount(root) {
    const notice = h("div");
    const tokensBox = h("div", {}, "loading…");
    const secretBox = h("div");
    const nodesBox = h("div", {}, "loading…");
    const auditBox = h("div", {}, "loading…");
    const auditAction = h("select", { testid: "audit-action", "aria-label": "audit action" }, ACTIONS.map((a) => h("option", { value: a }, a || "every action")));
    const older = h("button", { type: "button", testid: "audit-older" }, "Older");
    const newest = h("button", { type: "button", class: "ghost", testid: "audit-newest" }, "Newest");
    let auditBefore = null; // the id paged back from; null: newest

    replace(root,
      h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Admin"),
        h("div", { class: "muted" }, "Tokens, node identities and the audit log. Every action here is recorded in the audit log."))),
      notice,
      h("div", { class: "panel stack", style: "margin-bottom:16px" }, h("h2", {}, "Tokens"), createForm(), secretBox, tokensBox),
      h("div", { class: "panel", style: "margin-bottom:16px" }, h("h2", {}, "Registered nodes"), nodesBox),
      h("div", { class: "panel stack" }, h("div", { class: "row" }, h("h2", { style: "margin:0;flex:1" }, "Audit log"), auditAction, newest, older), auditBox));

    auditAction.addEventListener("change", () => { auditBefore = null; loadAudit(); });
    newest.addEventListener("click", () => { auditBefore = null; loadAudit(); });
    older.addEventListener("click", () => loadAudit(true));

    function guard(fn) {
      return fn().catch((error) => {
        replace(notice, failure(error));
      });
    }

    async function loadTokens() {
      const tokens = await api("tokens");
      replace(tokensBox, tokens.length ? table("tokens-table", [
        ["id", (t) => t.id, "num"],
        ["prefix", (t) => h("code", {}, `${t.prefix}…`)],
        ["role", (t) => (t.kind === "enroll" ? "node (enrollment)" : t.role)],
        ["label", (t) => t.label || "–"],
        ["uses", (t) => (t.max_uses != null ? `${t.uses} / ${t.max_uses}` : String(t.uses)), "num"],
        ["state", (t) => badge(t.state)],
        ["expires", (t) => (t.expires_at ? fmt.time(t.expires_at) : "never")],
        ["last used", (t) => fmt.ago(t.last_used_at)],
        ["created", (t) => h("div", {}, fmt.time(t.created_at), h("div", { class: "muted small" }, `by ${t.created_by}`))],
        ["", (t) => (t.state === "revoked" ? "" : h("button", { type: "button", class: "danger", testid: `token-revoke-${t.id}`, onclick: () => revoke(t) }, "Revoke")), "actions"],
      ], tokens, (t) => String(t.id)) : empty("tokens-empty", "No tokens", "Create an enrollment token above and give it to the people who run nodes."));
    }

    async function revoke(t) {
      if (!window.confirm(`Revoke token ${t.prefix}… (${t.role}${t.label ? `, ${t.label}` : ""})? It stops working at its next use.`)) return;
      await guard(async () => {
        await api(`tokens/${t.id}`, { method: "DELETE" });
        toast("token revoked");
        await Promise.all([loadTokens(), loadAudit()]);
      });
    }

    function createForm() {
      const role = h("select", { testid: "token-role" }, ["node", "viewer", "admin"].map((r) => h("option", { value: r }, r === "node" ? "node (enrollment)" : r)));
      const uses = h("input", { type: "number", min: 1, testid: "token-uses", placeholder: "unlimited" });
      const expires = h("input", { testid: "token-expires", placeholder: "7d, 12h, 30m (blank: never)" });
      const label = h("input", { testid: "token-label", placeholder: "lab machines", maxlength: 200 });
      const submit = h("button", { type: "submit", class: "primary", testid: "token-create" }, "Create token");
      role.addEventListener("change", () => { uses.disabled = role.value !== "node"; });
      const form = h("form", { class: "form-grid" },
        h("label", {}, "role", role), h("label", {}, "uses (node tokens)", uses), h("label", {}, "expires", expires),
        h("label", {}, "label", label), submit);
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        guard(async () => {
          const body = { role: role.value, label: label.value };
          if (role.value === "node" && uses.value) body.uses = Number(uses.value);
          if (expires.value.trim()) body.expires = expires.value.trim();
          const created = await api("tokens", { method: "POST", json: body });
          showSecret(created);
          replace(notice);
          await Promise.all([loadTokens(), loadAudit()]);
        });
      });
      return form;
    }

    function showSecret(created) {
      const how = created.role === "node" || created.kind === "enroll"
        ? `crowdtrain node --server ${location.origin}${location.pathname.replace(/\/ui\/.*$/, "")} --token ${created.token}`
        : "Paste it into the Token dialog of this UI, or send it as Authorization: Bearer.";
      replace(secretBox, h("div", { class: "notice" },
        h("strong", {}, `New ${created.role} token: shown only now, copy it.`),
        h("div", { class: "secret" }, h("code", { testid: "token-secret" }, created.token),
          h("button", { type: "button", testid: "token-copy", onclick: () => copy(created.token) }, "Copy")),
        h("p", { class: "muted" }, how)));
    }

    async function loadNodes() {
      const nodes = await api("nodes");
      replace(nodesBox, nodes.length ? table("registered-table", [
        ["node", (n) => h("strong", {}, n.node_id)],
        ["name", (n) => n.name],
        ["token", (n) => n.token_id ?? "–", "num"],
        ["registered", (n) => fmt.time(n.created_at)],
        ["last seen", (n) => fmt.ago(n.last_seen_at)],
        ["state", (n) => (n.revoked_at ? badge(`banned: ${n.revoked_reason || "no reason"}`, "banned") : badge("active"))],
        ["", (n) => (n.revoked_at ? "" : h("button", { type: "button", class: "danger", testid: `node-ban-${n.node_id}`, onclick: () => ban(n) }, "Ban")), "actions"],
      ], nodes, (n) => n.node_id) : empty("registered-empty", "No registered nodes",
        "Nodes register with an enrollment token: create one above, then on the node's machine run the command it shows."));
    }

    async function ban(node) {
      const reason = window.prompt(`Ban node ${node.node_id}? Its requests are refused at once and its enrollment token is revoked. Reason:`, "");
      if (reason === null) return;
      await guard(async () => {
        await api(`nodes/${encodeURIComponent(node.node_id)}`, { method: "DELETE", query: { reason } });
        toast(`${node.node_id} banned`);
        await Promise.all([loadNodes(), loadTokens(), loadAudit()]);
      });
    }

    let lastEvents = [];
    async function loadAudit(back = false) {
      const before = back ? lastEvents.at(-1)?.id : auditBefore;
      const { events } = await api("audit", { query: { limit: AUDIT_PAGE, before: before ?? undefined, action: auditAction.value || undefined } });
      if (back && !events.length) {
        toast("no older events");
        return;
      }
      auditBefore = before ?? null;
      lastEvents = events;
      older.disabled = events.length < AUDIT_PAGE;
      newest.disabled = auditBefore === null;
      replace(auditBox, events.length ? table("audit-table", [
        ["id", (e) => e.id, "num"],
        ["time", (e) => fmt.time(e.time)],
        ["actor", (e) => e.actor],
        ["action", (e) => h("code", {}, e.action)],
        ["target", (e) => e.target ?? "–"],
        ["detail", (e) => (typeof e.detail === "string" ? e.detail : JSON.stringify(e.detail ?? "")), "detail"],
        ["address", (e) => e.address ?? "–"],
      ], events, (e) => String(e.id)) : empty("audit-empty", "Nothing logged yet", "Token changes, registrations, bans, uploads and refusals appear here."));
    }

    Promise.all([loadTokens(), loadNodes(), loadAudit()]).then(() => replace(notice), (error) => {
      replace(notice, failure(error));
      [tokensBox, nodesBox, auditBox].forEach((box) => replace(box));
    });
  },
};
