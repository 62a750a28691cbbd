// One job's page: its facts, live curves (history, then the event stream), logs, Cancel and Download.
//
// The event stream is read with fetch() because EventSource cannot send the Authorization header.

import { $, ApiError, TERMINAL, api, apiJson, cell, el, facts, nodeLabel, number, showError, signedIn } from "./api.js";
import { SERIES, drawCharts } from "./chart.js";

const RECONNECT_MS = 2000;
let current = null; // the open job: { id, controller, series, status, drawPending }

/** Open the job the address names (`#job=<id>`), or close the job page. */
export function route() {
  const match = /^#job=(j-[0-9a-f]{20})$/.exec(location.hash);
  if (match && signedIn()) openJob(match[1]);
  else closeJob();
}

/** Read the open job again (the overview's poll). */
export async function refreshJob() {
  if (current) await Promise.all([loadJob(current), loadLogs(current)]);
}

function openJob(jobId) {
  if (current && current.id === jobId) return;
  closeJob();
  const job = { id: jobId, controller: new AbortController(), series: new Map(SERIES.map((s) => [s, new Map()])),
                status: null, artifacts: [], drawPending: false };
  current = job;
  $("job-title").textContent = jobId;
  $("job-status").textContent = "";
  $("job-action").textContent = "";
  $("job-logs").textContent = "no logs yet";
  for (const id of ["job-facts", "job-metrics", "job-verification", "attempts-body"]) $(id).replaceChildren();
  drawCharts(job.series);
  $("job-page").hidden = false;
  Promise.all([loadJob(job), loadLogs(job)]).catch((error) => showError(error.message));
  followJob(job);
}

export function closeJob() {
  if (!current) return;
  current.controller.abort();
  current = null;
  $("job-page").hidden = true;
}

async function loadJob(job) {
  let data;
  try {
    data = await apiJson(`v1/jobs/${job.id}`, { signal: job.controller.signal });
  } catch (error) {
    if (error.name === "AbortError") return;
    throw error;
  }
  if (current !== job) return;
  setStatus(job, data.status);
  job.artifacts = data.artifacts || [];
  $("download-button").disabled = !job.artifacts.includes("model.safetensors");
  const progress = data.progress || {};
  facts($("job-facts"), [
    ["name", data.name], ["tenant", data.tenant], ["status", data.status], ["priority", data.priority],
    ["node", data.node_id ? `${nodeLabel(data.node_id)} (${data.node_id})` : null],
    ["attempt", `${data.attempt} of ${data.max_attempts}`],
    ["progress", progress.total_steps ? `epoch ${progress.epoch}, step ${progress.step}/${progress.total_steps}` : null],
    ["pending reason", data.pending_reason], ["created", data.created_at], ["started", data.started_at],
    ["finished", data.finished_at], ["estimated memory", data.resources ? `${data.resources.estimated_memory_mb} MB` : null],
    ["artifacts", (data.artifacts || []).join(", ")], ["error", data.error],
  ]);
  facts($("job-metrics"), Object.entries(progress.metrics || {}).map(([name, value]) => [name, number(value)]));
  const verification = data.verification;
  facts($("job-verification"), verification ? [
    ["status", verification.status], ["segment", verification.segment ? verification.segment.join(" – ") : null],
    ["steps", verification.steps ? verification.steps.join(" – ") : null],
    ["verifier", verification.verifier ? nodeLabel(verification.verifier) : null],
    ["distance", verification.distance === null ? null : number(verification.distance)],
    ["round", verification.round], ["note", verification.note],
  ] : [["status", "none yet"]]);
  $("attempts-body").replaceChildren(...(data.attempts || []).map((attempt) => {
    const tr = el("tr");
    tr.append(cell(attempt.attempt), cell(attempt.node || nodeLabel(attempt.node_id), "name"),
      cell(attempt.node_id, "mono"), cell(attempt.started_from || "initial weights"));
    return tr;
  }));
}

function setStatus(job, status) {
  job.status = status;
  const badge = $("job-status");
  badge.textContent = status;
  badge.className = "status-" + String(status).replace(/[^a-z_]/g, "");
  $("cancel-button").disabled = TERMINAL.has(status);
}

async function loadLogs(job) {
  let text = "";
  try {
    text = await (await api(`v1/jobs/${job.id}/logs?tail=200`, { signal: job.controller.signal })).text();
  } catch (_) {
    text = ""; // no logs endpoint on this server, or none for this job yet
  }
  if (current !== job) return;
  const logs = $("job-logs");
  const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
  logs.textContent = text.trim() ? text : "no logs yet";
  if (atBottom) logs.scrollTop = logs.scrollHeight;
}

// The history first (paged), then the live stream; a step seen twice (a replayed stream, an attempt
// resumed from a checkpoint) keeps its newest values.
async function followJob(job) {
  const signal = job.controller.signal;
  try {
    let after = null;
    do {
      const query = "limit=2000" + (after ? "&after=" + encodeURIComponent(after) : "");
      const page = await apiJson(`v1/jobs/${job.id}/progress?${query}`, { signal });
      page.events.forEach((event) => addPoint(job, event));
      after = page.next_cursor;
    } while (after);
    drawCharts(job.series);
    while (!signal.aborted) {
      $("stream-state").textContent = "(live)";
      await readEvents(job);
      if (TERMINAL.has(job.status)) break;
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
    }
  } catch (error) {
    if (error.name === "AbortError") return;
    if (current === job) $("stream-state").textContent = `(stream stopped: ${error.message})`;
    return;
  }
  if (current === job) $("stream-state").textContent = TERMINAL.has(job.status) ? "(finished)" : "";
}

async function readEvents(job) {
  let response;
  try {
    response = await api(`v1/jobs/${job.id}/events`, { signal: job.controller.signal,
                                                      headers: { Accept: "text/event-stream" } });
  } catch (error) {
    if (error instanceof ApiError && error.status === 429) return; // too many streams: retry shortly
    throw error;
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      handleFrame(job, buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
    }
  }
}

function handleFrame(job, frame) {
  let event = "message";
  const data = [];
  for (const line of frame.split("\n")) {
    if (!line || line.startsWith(":")) continue; // a keep-alive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length || current !== job) return;
  const payload = JSON.parse(data.join("\n"));
  if (event === "progress") {
    addPoint(job, payload);
    scheduleDraw(job);
  } else if (event === "status") {
    setStatus(job, payload.status);
    loadJob(job).catch(() => {}); // its facts change with its status; the next poll retries
  }
}

function addPoint(job, event) {
  const metrics = event.metrics || {};
  if (typeof event.step !== "number") return;
  for (const name of SERIES) {
    const value = metrics[name];
    if (typeof value === "number" && Number.isFinite(value)) job.series.get(name).set(event.step, value);
  }
}

function scheduleDraw(job) {
  if (job.drawPending) return;
  job.drawPending = true;
  setTimeout(() => {
    job.drawPending = false;
    if (current === job) drawCharts(job.series);
  }, 100);
}

export async function cancelJob() {
  const job = current;
  if (!job) return;
  $("job-action").textContent = "cancelling…";
  try {
    const answer = await apiJson(`v1/jobs/${job.id}/cancel`, { method: "POST" });
    setStatus(job, answer.status);
    $("job-action").textContent = "cancelled";
  } catch (error) {
    $("job-action").textContent = error.message;
  }
  loadJob(job).catch(() => {}); // the next poll retries
}

export async function downloadWeights() {
  const job = current;
  if (!job) return;
  $("job-action").textContent = "downloading…";
  try {
    const blob = await (await api(`v1/jobs/${job.id}/artifacts/model.safetensors`)).blob();
    const url = URL.createObjectURL(blob);
    const link = el("a");
    link.href = url;
    link.download = `${job.id}.safetensors`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    $("job-action").textContent = `saved ${job.id}.safetensors (${blob.size} bytes)`;
  } catch (error) {
    $("job-action").textContent = error.message;
  }
}
