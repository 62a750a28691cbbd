// CyxWiz dashboard: jobs, nodes and the queue, refreshed every two seconds over the public API; a job's
// own page is job.js. The page's Content-Security-Policy allows scripts and styles only from these files.

import { $, ApiError, JOB_ID, KEY_STORAGE, api, apiJson, cell, el, fixed, nodeLabel, nodeNames, showError, signedIn,
  statusCell } from "./api.js";
import { cancelJob, closeJob, downloadWeights, refreshJob, route } from "./job.js";

const POLL_MS = 2000;
const state = { timer: null, refreshing: false };

// --- the overview: jobs, queue, nodes -------------------------------------------------------------

function progressCell(progress) {
  if (!progress || !(progress.total_steps > 0)) return cell("");
  const bar = el("progress");
  bar.max = progress.total_steps;
  bar.value = Math.min(progress.step || 0, progress.total_steps);
  const wrapper = el("span");
  wrapper.append(bar, ` ${progress.step || 0}/${progress.total_steps}`);
  return cell(wrapper);
}

function renderJobs(jobs) {
  const rows = jobs.map((job) => {
    const tr = el("tr", null, "clickable");
    const link = el("a", job.job_id);
    if (JOB_ID.test(job.job_id)) link.href = "#job=" + job.job_id;
    tr.dataset.jobId = job.job_id;
    const lastAttempt = (job.attempts || []).find((a) => a.node_id === job.node_id);
    tr.append(cell(link, "mono"), cell(job.name, "name"), cell(job.tenant), statusCell(job.status),
      cell(nodeLabel(job.node_id, lastAttempt && lastAttempt.node), "name"), progressCell(job.progress),
      cell(job.pending_reason || ""), cell(job.verification ? job.verification.status : ""));
    tr.addEventListener("click", (event) => {
      if (event.target === link) return; // the link itself changes the hash
      if (JOB_ID.test(job.job_id)) location.hash = "job=" + job.job_id;
    });
    return tr;
  });
  $("jobs-body").replaceChildren(...rows);
  $("jobs-empty").hidden = jobs.length > 0;
}

function renderQueue(answer) {
  const classes = [...new Set(answer.queue.map((row) => row.class))];
  $("queue-body").replaceChildren(...classes.map((jobClass) => {
    const tr = el("tr");
    tr.dataset.class = jobClass;
    tr.append(cell(jobClass));
    for (const priority of ["high", "normal", "low"]) {
      const row = answer.queue.find((r) => r.class === jobClass && r.priority === priority);
      const td = cell(row ? row.jobs : 0);
      td.dataset.priority = priority;
      tr.append(td);
    }
    return tr;
  }));
  $("queue-parked").textContent = String(answer.parked);
}

function heartbeatAge(stamp) {
  if (!stamp) return "—";
  const seconds = Math.max(0, (Date.now() - Date.parse(stamp)) / 1000);
  return Number.isFinite(seconds) ? seconds.toFixed(1) + " s" : "—";
}

function renderNodes(nodes) {
  nodeNames.clear();
  nodes.forEach((node) => nodeNames.set(node.node_id, node.name));
  $("nodes-body").replaceChildren(...nodes.map((node) => {
    const tr = el("tr");
    tr.dataset.nodeId = node.node_id;
    tr.append(cell(node.name, "name"), statusCell(node.status), cell(`${node.running_jobs}/${node.slots}`),
      cell(fixed(node.score)), cell(fixed(node.reputation)), cell(fixed(node.availability)),
      cell(fixed(node.capability)), cell(fixed(node.uptime)), cell(heartbeatAge(node.last_heartbeat)),
      cell(node.probation ? "yes" : "no"), cell(node.audits_passed));
    return tr;
  }));
  $("nodes-empty").hidden = nodes.length > 0;
}

async function refresh() {
  if (state.refreshing || !signedIn()) return;
  state.refreshing = true;
  try {
    const [jobs, nodes, queue] = await Promise.all(
      [apiJson("v1/jobs?limit=50"), apiJson("v1/nodes"), apiJson("v1/queue")]);
    renderNodes(nodes.nodes);
    renderJobs(jobs.jobs);
    renderQueue(queue);
    await refreshJob();
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    showError("");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) signOut(error.message);
    else showError(error.message);
  } finally {
    state.refreshing = false;
  }
}

// --- signing in and out ---------------------------------------------------------------------------

function start() {
  $("sign-in").hidden = true;
  $("dashboard").hidden = false;
  $("sign-out").hidden = false;
  $("who").textContent = "signed in";
  clearInterval(state.timer);
  state.timer = setInterval(refresh, POLL_MS);
  route();
  refresh();
}

function signOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  clearInterval(state.timer);
  state.timer = null;
  closeJob();
  for (const id of ["jobs-body", "nodes-body", "queue-body"]) $(id).replaceChildren();
  $("dashboard").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("who").textContent = "";
  $("updated").textContent = "";
  showError(message || "");
}

async function signIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  try {
    await api("v1/jobs?limit=1");
  } catch (error) {
    sessionStorage.removeItem(KEY_STORAGE);
    showError(error.message);
    return;
  }
  $("api-key").value = "";
  showError("");
  start();
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(""));
  $("cancel-button").addEventListener("click", cancelJob);
  $("download-button").addEventListener("click", downloadWeights);
  window.addEventListener("hashchange", route);
  if (signedIn()) start();
});

