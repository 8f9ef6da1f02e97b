// Data: the datasets in the store with their splits (GET datasets), the upload of a file to a
// split (PUT datasets/{name}/{split}/files/{filename}, admin) and epoch coverage (GET data/...).

import { api, upload } from "../api.js";
import { empty, failure, fmt, h, replace, table, toast } from "../ui.js";

const SPLITS = ["train", "valid", "annotated"];
const FILENAME = /^[A-Za-z0-9][A-Za-z0-9._\- ]{0,199}$/;

/** One cell per shard of an epoch: completed, held (leased now), duplicate, or still to do. */
export function coverageCells(epoch) {
  const completed = new Set((epoch.ledger || []).map((entry) => entry.shard));
  const held = new Set((epoch.held || []).map((entry) => entry.shard));
  const duplicates = new Set(epoch.duplicates || []);
  return Array.from({ length: epoch.shards }, (_, shard) =>
    duplicates.has(shard) ? "duplicate" : completed.has(shard) ? "completed" : held.has(shard) ? "held" : "missing");
}

function splitsOf(dataset) {
  return (dataset.splits || []).map((s) =>
    `${s.name}: ${fmt.number(s.documents)} docs, ${fmt.bytes(s.bytes)}${s.tokens != null ? `, ${fmt.compact(s.tokens)} tokens in ${s.shards} shard${s.shards === 1 ? "" : "s"}` : ", not tokenized yet"}`);
}

export default {
  title: "Data",
  mount(root, ctx) {
    const notice = h("div");
    const datasetsBox = h("div", {}, "loading…");
    const statusBox = h("div", { testid: "data-status" }, "loading…");
    const epochSelect = h("select", { testid: "epoch-select", "aria-label": "epoch" });
    const coverageBox = h("div", { testid: "epoch-coverage" });
    let epochShown = null;

    replace(root,
      h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Data"),
        h("div", { class: "muted" }, "What the run trains on, and how far through it each epoch is."))),
      notice,
      h("div", { class: "grid" },
        h("div", { class: "panel" }, h("h2", {}, "Training data now"), statusBox,
          h("div", { class: "row", style: "margin:12px 0 8px" }, h("h3", { style: "margin:0" }, "Epoch coverage"), epochSelect),
          coverageBox),
        h("div", { class: "panel" }, h("h2", {}, "Upload a file (admin)"), uploadForm())),
      h("div", { class: "panel" }, h("h2", {}, "Datasets"), datasetsBox));

    epochSelect.addEventListener("change", () => {
      epochShown = Number(epochSelect.value);
      loadEpoch();
    });

    async function loadDatasets() {
      const datasets = await api("datasets");
      replace(datasetsBox, datasets.length
        ? table("datasets-table", [
          ["dataset", (d) => h("strong", {}, d.name)],
          ["splits", (d) => h("div", {}, splitsOf(d).map((line) => h("div", {}, line)))],
          ["created", (d) => fmt.time(d.created_at)],
        ], datasets, (d) => d.name)
        : empty("datasets-empty", "No datasets in the store",
          "Import files with the form above, or on the server machine; the server tokenizes them at its next start.",
          "crowdtrain data import notes train ./my-texts/ --data-dir DATA_DIR"));
    }

    async function loadStatus() {
      const status = await api("data/status");
      replace(statusBox, h("div", { class: "stats", style: "margin:0" },
        [["dataset", [h("span", { class: "part" }, `${status.dataset}/`), h("span", { class: "part" }, status.split)]], ["shards", fmt.number(status.shards)], ["tokens", fmt.compact(status.tokens)],
          ["epoch", fmt.number(status.epoch)], ["done this epoch", `${status.epoch_completed_shards} / ${status.shards}`],
          ["leases held", fmt.number(status.active_leases)]].map(([label, value]) =>
          h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: Array.isArray(value) ? "value text" : "value" }, value)))));
      const epochs = Array.from({ length: status.epoch + 1 }, (_, i) => status.epoch - i);
      if (epochSelect.options.length !== epochs.length) {
        replace(epochSelect, epochs.map((n) => h("option", { value: String(n) }, `epoch ${n}`)));
        if (epochShown === null || epochShown > status.epoch) epochShown = status.epoch;
      }
      epochSelect.value = String(epochShown);
    }

    async function loadEpoch() {
      if (epochShown === null) return;
      try {
        const epoch = await api(`data/epochs/${epochShown}`);
        const cells = coverageCells(epoch);
        replace(coverageBox,
          h("p", { class: "muted" }, `${epoch.completed} of ${epoch.shards} shards completed`,
            epoch.completed_at ? ` (done ${fmt.time(epoch.completed_at)})` : "",
            epoch.duplicates?.length ? `, ${epoch.duplicates.length} trained twice` : ""),
          h("div", { class: "shards", role: "img", "aria-label": `epoch ${epoch.epoch}: ${epoch.completed} of ${epoch.shards} shards completed` },
            cells.map((state, shard) => h("span", { class: state, title: `shard ${shard}: ${state}` }))),
          h("p", { class: "muted" }, "green: completed · amber: being trained now · red: trained twice · grey: to do"));
      } catch (error) {
        if (error.code === "unknown_epoch") {
          replace(coverageBox, empty("epoch-empty", "This epoch has not started", "Epochs start when a node leases their first shard."));
        } else {
          throw error;
        }
      }
    }

    ctx.every(4000, async () => {
      try {
        await Promise.all([loadStatus().then(loadEpoch), loadDatasets()]);
        replace(notice);
      } catch (error) {
        replace(notice, failure(error));
        throw error;
      }
    });

    function uploadForm() {
      const dataset = h("input", { testid: "upload-dataset", placeholder: "notes", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}" });
      const split = h("select", { testid: "upload-split" }, SPLITS.map((s) => h("option", { value: s }, s)));
      const file = h("input", { type: "file", testid: "upload-file", required: true, accept: ".txt,.md,.jsonl,.json,.csv,.parquet,.zst,.gz" });
      const field = h("input", { testid: "upload-field", value: "text", placeholder: "text" });
      const paragraphs = h("input", { type: "checkbox", testid: "upload-paragraphs" });
      const submit = h("button", { type: "submit", class: "primary", testid: "upload-submit" }, "Upload");
      const progress = h("progress", { testid: "upload-progress", max: 1, value: 0, hidden: true });
      const result = h("div", { testid: "upload-result", "aria-live": "polite" });
      const form = h("form", { class: "stack" },
        h("p", { class: "muted" }, "Text (.txt, .md), JSON lines, CSV or Parquet. The server imports it all or nothing and drops duplicates; a running server trains on the new documents after its next start."),
        h("div", { class: "form-grid" },
          h("label", {}, "dataset", dataset), h("label", {}, "split", split), h("label", {}, "file", file),
          h("label", {}, "text field (JSON, CSV)", field), h("label", { class: "inline" }, paragraphs, "one document per paragraph (.txt, .md)")),
        h("div", { class: "row" }, submit), progress, result);
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        const chosen = file.files[0];
        if (!chosen) return;
        if (!FILENAME.test(chosen.name)) {
          replace(result, h("p", { class: "error" }, `The file name "${chosen.name}" is not accepted: rename it to letters, digits, . _ - and spaces, starting with a letter or digit.`));
          return;
        }
        submit.disabled = true;
        progress.hidden = false;
        progress.value = 0;
        replace(result, h("p", { class: "muted" }, `uploading ${chosen.name} (${fmt.bytes(chosen.size)})…`));
        try {
          const answer = await upload(`datasets/${encodeURIComponent(dataset.value)}/${split.value}/files/${encodeURIComponent(chosen.name)}`, {
            file: chosen, query: { field: field.value || "text", paragraphs: paragraphs.checked ? "true" : undefined },
            onProgress: (fraction) => (progress.value = fraction),
          });
          replace(result, h("p", { class: answer.changed ? "good" : "muted" }, answer.summary));
          toast("upload done");
          loadDatasets();
        } catch (error) {
          replace(result, failure(error, "upload-error"));
        } finally {
          submit.disabled = false;
          progress.hidden = true;
        }
      });
      return form;
    }
  },
};
