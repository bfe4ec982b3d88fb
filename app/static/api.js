/* The server as the page calls it: API URLs, the API key (kept in this browser), and readable messages
 * from error answers. */
import { el } from "./state.js";

const KEY_STORE = "sedd-serve.apiKey";
// API paths relative to this module (served from <base>/static/api.js), so the page also works behind
// a reverse proxy that mounts the server under a sub-path.
const API_BASE = new URL("..", import.meta.url);
export const api = (path) => new URL(path, API_BASE).toString();

export const keyStorage = {
  get() {
    try { return localStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
  },
  set(value) {
    try {
      if (value) localStorage.setItem(KEY_STORE, value);
      else localStorage.removeItem(KEY_STORE);
    } catch (_) { /* storage disabled: the key lives in the field only */ }
  },
};

/** Request headers: a JSON answer or an event stream, with the key from the API key field if any. */
export function headers(json) {
  const h = { Accept: json ? "application/json" : "text/event-stream" };
  if (!json) h["Content-Type"] = "application/json";
  const key = el.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** A readable line from FastAPI's {"detail": ...}: a string, or a list of validation errors. */
export function describeDetail(detail) {
  if (detail == null) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((item) => {
        if (!item || typeof item !== "object") return String(item);
        const loc = Array.isArray(item.loc) ? item.loc.filter((p) => p !== "body").join(".") : "";
        const msg = item.msg || item.message || JSON.stringify(item);
        return loc ? `${loc}: ${msg}` : msg;
      })
      .join("; ");
  }
  if (typeof detail === "object") return detail.message || detail.error || JSON.stringify(detail);
  return String(detail);
}

export async function describeHttpError(response) {
  let message = "";
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    message = describeDetail(body.detail !== undefined ? body.detail : body.error !== undefined ? body.error : body);
  } catch (_) {
    message = text.trim().slice(0, 300);
  }
  if (!message) message = response.statusText || "request failed";
  const code = `HTTP ${response.status}`;
  if (response.status === 503) {
    const retry = response.headers.get("Retry-After");
    const wait = retry && /^\d+$/.test(retry.trim()) ? ` Try again in ${retry.trim()} s.` : " Try again shortly.";
    return `Server busy (${code}): ${message}.${wait}`.replace(/\.\./g, ".");
  }
  if (response.status === 401 || response.status === 403) {
    return `${message} (${code}). Enter the server's key under “API key”.`;
  }
  return `${message} (${code})`;
}
