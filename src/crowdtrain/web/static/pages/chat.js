// Chat: talk to the server's current model, a saved version or an imported bundle; the answer
// streams from POST chat (text/event-stream read with fetch, since EventSource cannot POST).

import { api, stream, token } from "../api.js";
import { failure, fmt, h, replace, toast } from "../ui.js";
import { importForm, modelLabel } from "./models.js";

const SETTINGS_KEY = "crowdtrain.chat";
const DEFAULTS = { model: "current", temperature: 0.8, top_k: 40, top_p: 0.95, max_tokens: 200 };
// the server's bounds (POST chat): top_k >= 1 or none, 0 < top_p <= 1, max_tokens <= 1024
const MAX_TOKENS = 1024;

function numberField(testid, label, value, attrs) {
  const input = h("input", { type: "number", testid, value: String(value), ...attrs });
  return { input, node: h("label", {}, label, input) };
}

export default {
  title: "Chat",
  mount(root, ctx) {
    const saved = { ...DEFAULTS, ...JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") };
    const messages = []; // {role, content}
    let controller = null;

    const modelSelect = h("select", { testid: "chat-model", "aria-label": "model" });
    const temperature = numberField("chat-temperature", "temperature", saved.temperature, { min: 0, max: 2, step: 0.05 });
    const topK = numberField("chat-top-k", "top-k (0: off)", saved.top_k, { min: 0, max: 1000, step: 1 });
    const topP = numberField("chat-top-p", "top-p", saved.top_p, { min: 0.01, max: 1, step: 0.01 });
    const maxTokens = numberField("chat-max-tokens", "max tokens", saved.max_tokens, { min: 1, max: MAX_TOKENS, step: 1 });
    const log = h("div", { class: "chat-log", testid: "chat-log", role: "log", "aria-live": "polite" });
    const input = h("textarea", { testid: "chat-input", rows: 2, placeholder: "Write a message; Enter sends, Shift+Enter breaks the line", "aria-label": "message" });
    const send = h("button", { type: "submit", class: "primary", testid: "chat-send" }, "Send");
    const stop = h("button", { type: "button", testid: "chat-stop", hidden: true, onclick: () => controller?.abort() }, "Stop");
    const clear = h("button", { type: "button", class: "ghost", testid: "chat-clear", onclick: clearChat }, "Clear conversation");
    const notice = h("div");
    const modelInfo = h("p", { class: "muted", testid: "chat-model-info" });
    const importBox = h("details", {}, h("summary", {}, "Chat with your own bundle (admin)"),
      importForm({ prefix: "chat-upload", onImported: (result) => loadModels(result?.id) }));

    replace(root,
      h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Chat"),
        h("div", { class: "muted" }, "Inference runs beside training on the server and does not hold it up."))),
      notice,
      h("div", { class: "chat" },
        h("aside", { class: "panel stack" },
          h("label", {}, "model", modelSelect), modelInfo,
          h("div", { class: "form-grid" }, temperature.node, topK.node, topP.node, maxTokens.node),
          clear, importBox),
        h("div", { class: "panel" }, log,
          h("form", { class: "chat-input", onsubmit: (event) => { event.preventDefault(); ask(); } }, input, send, stop))));

    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        ask();
      }
    });
    ctx.onCleanup(() => controller?.abort());
    showEmpty();
    loadModels();

    async function loadModels(select) {
      try {
        const { models } = await api("models");
        replace(modelSelect, models.map((m) => h("option", { value: m.id }, modelLabel(m))));
        const wanted = select || saved.model;
        modelSelect.value = models.some((m) => m.id === wanted) ? wanted : models[0]?.id ?? "";
        modelSelect.onchange = () => describe(models);
        describe(models);
        replace(notice);
      } catch (error) {
        if (error.status === 404 && error.code === "not_found") {
          replace(notice, h("div", { class: "notice bad", testid: "chat-unavailable" },
            "This server has no chat routes (GET api/v1/models): upgrade crowdtrain on the server."));
        } else {
          replace(notice, failure(error));
        }
      }
    }

    function describe(models) {
      const model = models.find((m) => m.id === modelSelect.value);
      modelInfo.textContent = model
        ? [model.kind, model.version != null ? `version ${model.version}` : null, model.parameters ? `${fmt.compact(model.parameters)} parameters` : null, model.preset].filter(Boolean).join(" · ")
        : "";
    }

    function settings() {
      const value = {
        model: modelSelect.value || "current",
        temperature: Number(temperature.input.value),
        top_k: Number(topK.input.value) >= 1 ? Math.round(Number(topK.input.value)) : null,
        top_p: Number(topP.input.value) > 0 && Number(topP.input.value) < 1 ? Number(topP.input.value) : null,
        max_tokens: Math.min(MAX_TOKENS, Math.max(1, Math.round(Number(maxTokens.input.value) || DEFAULTS.max_tokens))),
      };
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(value));
      return value;
    }

    function bubble(role, text) {
      const node = h("div", { class: `msg ${role}`, testid: "chat-message", dataset: { role } }, text);
      if (log.querySelector(".empty")) log.replaceChildren();
      log.append(node);
      log.scrollTop = log.scrollHeight;
      return node;
    }

    function showEmpty() {
      replace(log, h("div", { class: "empty", testid: "chat-empty" },
        h("h3", {}, "Say something to the model"),
        h("p", {}, "A small model early in training answers with fragments of its training text; the loss on the dashboard tells how far it has come.")));
    }

    function clearChat() {
      controller?.abort();
      messages.length = 0;
      showEmpty();
      input.focus();
    }

    async function ask() {
      const content = input.value.trim();
      if (!content || controller) return;
      if (!token.get()) toast("chat may need a token: use the Token button");
      input.value = "";
      messages.push({ role: "user", content });
      bubble("user", content);
      const answer = bubble("assistant", "");
      answer.classList.add("streaming");
      controller = new AbortController();
      send.disabled = true;
      stop.hidden = false;
      let text = "";
      try {
        await stream("chat", { ...settings(), messages }, (event) => {
          if (event.error) throw new Error(event.detail || event.error);
          if (event.text) {
            text += event.text;
            answer.textContent = text;
            log.scrollTop = log.scrollHeight;
          }
          if (event.done) answer.title = [event.tokens != null ? `${event.tokens} tokens` : null, event.finish ? `finish: ${event.finish}` : null, event.seconds != null ? `${event.seconds.toFixed(1)} s` : null].filter(Boolean).join(", ");
        }, controller.signal);
        messages.push({ role: "assistant", content: text });
      } catch (error) {
        if (error.name === "AbortError") {
          messages.push({ role: "assistant", content: text });
        } else {
          messages.pop(); // the question was not answered: it is not part of the conversation
          answer.replaceWith(failure(error, "chat-error"));
        }
      } finally {
        answer.classList.remove("streaming");
        controller = null;
        send.disabled = false;
        stop.hidden = true;
      }
    }
  },
};
