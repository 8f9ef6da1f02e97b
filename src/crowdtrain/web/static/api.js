// The server's JSON API, called with relative URLs (../api/v1/...) so that a reverse-proxy
// path prefix works, and with the token from local storage as Authorization: Bearer.

const TOKEN_KEY = "crowdtrain.token";
export const API_BASE = new URL("../api/v1/", document.baseURI).href;

export const token = {
  get: () => localStorage.getItem(TOKEN_KEY) || "",
  set: (value) => localStorage.setItem(TOKEN_KEY, value.trim()),
  clear: () => localStorage.removeItem(TOKEN_KEY),
  // the token's role as its prefix says (ct_admin_, ct_view_); the server decides what it may do
  role: () => {
    const value = token.get();
    if (value.startsWith("ct_admin_")) return "admin";
    if (value.startsWith("ct_view_")) return "viewer";
    return value ? "other" : "none";
  },
};

/** A refusal from the server: HTTP status, the stable error code and its detail. */
export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
  get adminOnly() {
    return this.status === 403 && this.code === "forbidden";
  }
}

export function authHeaders(extra = {}) {
  const value = token.get();
  return value ? { ...extra, Authorization: `Bearer ${value}` } : { ...extra };
}

export function url(path, query) {
  const target = new URL(path.replace(/^\//, ""), API_BASE);
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") target.searchParams.set(key, value);
  }
  return target.href;
}

/** Announce a 401 so that the app opens the login dialog (once per burst of refusals). */
function announce(error) {
  if (error.status === 401) window.dispatchEvent(new CustomEvent("crowdtrain:unauthorized", { detail: error }));
}

export async function errorFrom(response) {
  let code = `http_${response.status}`;
  let detail = response.statusText;
  try {
    const body = await response.json();
    code = body.error || code;
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
  } catch {
    // not JSON (a proxy's page): keep the status text
  }
  return new ApiError(response.status, code, detail);
}

/** fetch() an API route; JSON in and out unless `raw` asks for the Response itself. */
export async function api(path, { method = "GET", query, json, body, headers, raw = false, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(url(path, query), init);
  } catch (failure) {
    if (failure.name === "AbortError") throw failure;
    throw new ApiError(0, "unreachable", "the server does not answer; is it running?");
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    announce(error);
    throw error;
  }
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/** Upload bytes with progress (fetch cannot report upload progress): resolves to the JSON answer. */
export function upload(path, { method = "PUT", query, file, contentType, onProgress }) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open(method, url(path, query));
    for (const [key, value] of Object.entries(authHeaders({ "Content-Type": contentType || "application/octet-stream" }))) {
      request.setRequestHeader(key, value);
    }
    request.upload.onprogress = (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded / event.total);
    };
    request.onerror = () => reject(new ApiError(0, "unreachable", "the upload was cut off: the server closed the connection or is not reachable"));
    request.onload = () => {
      let body = null;
      try {
        body = JSON.parse(request.responseText);
      } catch {
        // leave null
      }
      if (request.status >= 200 && request.status < 300) return resolve(body);
      const error = new ApiError(request.status, body?.error || `http_${request.status}`,
        typeof body?.detail === "string" ? body.detail : (body ? JSON.stringify(body.detail ?? body) : request.statusText));
      announce(error);
      reject(error);
    };
    request.send(file);
  });
}

/** Download a route's body as a file, named as Content-Disposition says (the header needs fetch). */
export async function download(path, fallbackName) {
  const response = await api(path, { raw: true });
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename\*=UTF-8''([^;]+)|filename="?([^";]+)"?/i.exec(disposition);
  const name = match ? decodeURIComponent(match[1] || match[2]) : fallbackName;
  const blob = await response.blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  return { name, size: blob.size };
}

/** POST and read a text/event-stream answer: calls onEvent with each `data:` JSON object. */
export async function stream(path, json, onEvent, signal) {
  const response = await api(path, { method: "POST", json, raw: true, signal, headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trimStart()).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}
