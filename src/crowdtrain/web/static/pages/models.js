// Models: every model the server can serve (GET models) with a bundle download each, and the
// import of a local bundle (POST models/import, admin) for the chat page.

import { api, download, upload } from "../api.js";
import { empty, failure, fmt, h, replace, table, toast } from "../ui.js";

export function modelLabel(model) {
  if (model.id === "current") return `current (version ${model.version ?? "?"})`;
  if (model.kind === "imported") return `${model.name || model.id.replace(/^imported:/, "")} (imported)`;
  return model.version != null ? `version ${model.version}` : model.id;
}

/** The bundle import form (name + file + progress); `prefix` makes its test ids. */
export function importForm({ prefix = "import", onImported } = {}) {
  const name = h("input", { testid: `${prefix}-name`, placeholder: "my-model", pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}", required: true });
  const file = h("input", { type: "file", testid: `${prefix}-file`, accept: ".zip,application/zip", required: true });
  const submit = h("button", { type: "submit", class: "primary", testid: `${prefix}-submit` }, "Import");
  const progress = h("progress", { testid: `${prefix}-progress`, max: 1, value: 0, hidden: true });
  const result = h("div", { testid: `${prefix}-result`, "aria-live": "polite" });
  file.addEventListener("change", () => {
    if (!name.value && file.files[0]) name.value = file.files[0].name.replace(/\.zip$/i, "").replace(/[^A-Za-z0-9._-]/g, "-").slice(0, 64);
  });
  const form = h("form", { class: "stack" },
    h("p", { class: "muted" }, "A bundle is the zip a download gives: model.safetensors, config.json and tokenizer.json."),
    h("div", { class: "form-grid" }, h("label", {}, "name", name), h("label", {}, "bundle (.zip)", file), submit),
    progress, result);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!file.files[0]) return;
    submit.disabled = true;
    progress.hidden = false;
    progress.value = 0;
    replace(result);
    try {
      const answer = await upload("models/import", {
        method: "POST", query: { name: name.value }, file: file.files[0], contentType: "application/zip",
        onProgress: (fraction) => (progress.value = fraction),
      });
      replace(result, h("p", { class: "good" }, `imported as ${answer?.id || `imported:${name.value}`}`));
      toast("model imported");
      onImported?.(answer);
    } catch (error) {
      replace(result, failure(error, `${prefix}-error`));
    } finally {
      submit.disabled = false;
      progress.hidden = true;
    }
  });
  return form;
}

/** An imported bundle's file size; otherwise its fp32 weights (4 bytes a parameter). */
function size(model) {
  if (model.bytes) return fmt.bytes(model.bytes);
  if (!model.parameters) return "–";
  return h("span", { title: "fp32 weights: parameters × 4 bytes" }, `≈ ${fmt.bytes(4 * model.parameters)}`);
}

export default {
  title: "Models",
  mount(root, ctx) {
    const notice = h("div");
    const list = h("div", {}, "loading…");
    replace(root,
      h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Models"),
        h("div", { class: "muted" }, "Download a bundle (weights as safetensors, config, tokenizer) to run it anywhere, or import one to chat with it here."))),
      notice,
      h("div", { class: "panel", style: "margin-bottom:16px" }, h("h2", {}, "On this server"), list),
      h("div", { class: "panel" }, h("h2", {}, "Import a bundle (admin)"), importForm({ onImported: () => load() })));

    let shown = null; // the list drawn last: redrawn only when it changes, so buttons stay put
    async function load(rethrow = false) {
      try {
        const { models } = await api("models");
        replace(notice);
        const signature = JSON.stringify(models);
        if (signature === shown) return;
        shown = signature;
        if (!models.length) {
          replace(list, empty("models-empty", "No models yet", "The server has not published a version yet; it does once it starts."));
          return;
        }
        replace(list, table("models-table", [
          ["model", (m) => h("strong", {}, modelLabel(m))],
          ["kind", (m) => m.kind],
          ["version", (m) => m.version ?? "–", "num"],
          ["size", size, "num"],
          ["parameters", (m) => fmt.compact(m.parameters), "num"],
          ["saved", (m) => fmt.time(m.created_at || m.imported_at)],
          ["", (m) => h("div", { class: "row" },
            h("button", { type: "button", testid: `model-download-${m.id}`, onclick: (event) => save(m, event.target) }, "Download"),
            m.kind === "imported" ? h("button", { type: "button", class: "danger", testid: `model-remove-${m.id}`, onclick: () => remove(m) }, "Remove") : null), "actions"],
        ], models, (m) => m.id));
      } catch (error) {
        replace(notice, failure(error));
        if (rethrow) throw error;
      }
    }

    async function remove(model) {
      if (!window.confirm(`Remove ${modelLabel(model)} from the server?`)) return;
      try {
        await api(`models/${encodeURIComponent(model.id)}`, { method: "DELETE" });
        toast("model removed");
        await load();
      } catch (error) {
        replace(notice, failure(error));
      }
    }

    async function save(model, button) {
      button.disabled = true;
      button.textContent = "Downloading…";
      try {
        const { name, size } = await download(`models/${encodeURIComponent(model.id)}/bundle`, `crowdtrain-${model.id.replace(/[^A-Za-z0-9._-]/g, "-")}.zip`);
        toast(`saved ${name} (${fmt.bytes(size)})`);
      } catch (error) {
        replace(notice, failure(error));
      } finally {
        button.disabled = false;
        button.textContent = "Download";
      }
    }
    ctx.every(15_000, () => load(true));
  },
};
