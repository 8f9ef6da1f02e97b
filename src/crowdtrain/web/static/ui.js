// Small DOM and formatting helpers shared by the pages, and the ECharts wrapper.

/** h("div", {class: "x", dataset: {testid: "y"}, onclick}, child, ...): an element. */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "testid") node.dataset.testid = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

export const fmt = {
  number(value, digits = 0) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
  },
  compact(value) {
    if (value === null || value === undefined) return "–";
    return Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 }).format(value);
  },
  bytes(value) {
    if (value === null || value === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let index = 0;
    let scaled = Math.abs(value);
    while (scaled >= 1000 && index < units.length - 1) {
      scaled /= 1000;
      index += 1;
    }
    return `${(Math.sign(value) * scaled).toFixed(index && scaled < 10 ? 1 : 0)} ${units[index]}`;
  },
  rate(value) {
    return value === null || value === undefined ? "–" : `${fmt.bytes(value)}/s`;
  },
  loss(value) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(3);
  },
  percent(value) {
    return value === null || value === undefined ? "–" : `${(100 * value).toFixed(value < 0.1 ? 1 : 0)}%`;
  },
  seconds(value) {
    if (value === null || value === undefined) return "–";
    return value < 1 ? `${(value * 1000).toFixed(0)} ms` : `${value.toFixed(1)} s`;
  },
  time(unix) {
    return unix ? new Date(unix * 1000).toLocaleString() : "–";
  },
  clock(unix) {
    return unix ? new Date(unix * 1000).toLocaleTimeString() : "–";
  },
  ago(unix) {
    if (!unix) return "never";
    const seconds = Math.max(0, Date.now() / 1000 - unix);
    if (seconds < 60) return `${seconds.toFixed(0)} s ago`;
    if (seconds < 3600) return `${(seconds / 60).toFixed(0)} min ago`;
    if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h ago`;
    return `${(seconds / 86400).toFixed(1)} d ago`;
  },
};

/** The "nothing here yet" panel: a title, what to do, and optionally a command to run. */
export function empty(testid, title, text, command) {
  return h("div", { class: "empty", testid }, h("h3", {}, title), h("p", {}, text), command ? h("pre", {}, command) : null);
}

/** What a failed call means for this page: admin-only (403), sign in (401), or the message. */
export function failure(error, testid = "error") {
  if (error?.status === 403 && error.code === "forbidden") {
    return h("div", { class: "notice bad", testid: "admin-only" },
      h("strong", {}, "Admin only. "),
      "Your token is a viewer's: this page needs an admin token (",
      h("code", {}, "crowdtrain tokens create --role admin"), "). Use the Token button to change it.");
  }
  if (error?.status === 401) {
    return h("div", { class: "notice bad", testid: "login-needed" },
      h("strong", {}, "Sign in needed. "), error.message || "this server needs a token", " Use the Token button.");
  }
  if (error?.status === 404 && error.code === "not_found") {
    return h("div", { class: "notice bad", testid }, h("strong", {}, "Not on this server. "),
      "This server does not offer this route yet; upgrade crowdtrain on the server.");
  }
  return h("div", { class: "notice bad", testid }, h("strong", {}, `${error?.code || "error"}: `), error?.message || String(error));
}

export function badge(text, kind = text) {
  return h("span", { class: `badge ${String(kind).split(" ")[0]}` }, text);
}

export function toast(message) {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), 3500);
}

export function isDark() {
  const forced = document.documentElement.dataset.theme;
  if (forced) return forced === "dark";
  return window.matchMedia("(prefers-color-scheme: dark)").matches;
}

/** An ECharts chart in `container` that follows the theme and its container's size. */
export function chart(container, label) {
  container.setAttribute("role", "img");
  container.setAttribute("aria-label", label);
  const instance = window.echarts.init(container, isDark() ? "dark" : null, { renderer: "canvas" });
  const observer = new ResizeObserver(() => instance.resize());
  observer.observe(container);
  return {
    instance,
    set(option, replaceAll = false) {
      instance.setOption({ backgroundColor: "transparent", animation: false, ...option }, replaceAll);
    },
    dispose() {
      observer.disconnect();
      instance.dispose();
    },
  };
}

/** A table from rows and [header, cell(row), className?] columns; `key` gives each row a test id. */
export function table(testid, columns, rows, key) {
  return h("div", { class: "table-wrap" },
    h("table", { testid },
      h("thead", {}, h("tr", {}, columns.map(([header, , cls]) => h("th", { class: cls }, header)))),
      h("tbody", {}, rows.map((row) => h("tr", { dataset: key ? { key: key(row) } : {} },
        columns.map(([, cell, cls]) => h("td", { class: cls }, cell(row))))))));
}

export async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    toast("copied");
  } catch {
    window.prompt("Copy this:", text);
  }
}
