// The API and the page's few DOM helpers, shared by the overview (dashboard.js) and a job's page (job.js).
//
// Everything shown comes from strangers (job names, node names, errors, log lines): it is written with
// textContent (el, cell, facts below) or as SVG attributes computed from numbers, never parsed as HTML.
// The API key lives in sessionStorage (this tab only) and goes with every call as "Authorization: Bearer".

export const KEY_STORAGE = "cyxwiz.api_key";
export const JOB_ID = /^j-[0-9a-f]{20}$/;
export const TERMINAL = new Set(["completed", "failed", "cancelled"]);
export const nodeNames = new Map(); // node_id -> name, from the latest nodes poll

export const $ = (id) => document.getElementById(id);

export function signedIn() {
  return Boolean(sessionStorage.getItem(KEY_STORAGE));
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  headers.set("Authorization", "Bearer " + sessionStorage.getItem(KEY_STORAGE));
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let code = "http_" + response.status;
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error) {
      code = String(body.error.code || code);
      message = String(body.error.message || message);
    }
  } catch (_) { /* not the contract's JSON error: keep the status line */ }
  return new ApiError(response.status, code, message);
}

export async function apiJson(path, options) {
  return (await api(path, options)).json();
}

// --- small DOM helpers (text only) ----------------------------------------------------------------

export function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

export function cell(content, className) {
  const td = el("td", null, className);
  if (content instanceof Node) td.append(content);
  else td.textContent = content === undefined || content === null ? "" : String(content);
  if (typeof content === "string" && content) td.title = content;
  return td;
}

export function statusCell(status) {
  return cell(status, "status-" + String(status).replace(/[^a-z_]/g, ""));
}

export function fixed(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "";
}

export function number(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return String(value);
  return Number.isInteger(value) ? String(value) : value.toPrecision(5);
}

export function facts(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([name, value]) => {
    const dd = el("dd", value === null || value === undefined || value === "" ? "—" : value);
    dd.dataset.field = name;
    return [el("dt", name), dd];
  }));
}

export function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

export function nodeLabel(nodeId, fallback) {
  if (!nodeId) return "—";
  return nodeNames.get(nodeId) || fallback || nodeId;
}

