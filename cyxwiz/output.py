"""What the CLI prints: tables with headers, a job's summary, its progress line, and JSON.

Every string that comes from the server (a name, an error, a log line) goes through :func:`printable`
before it reaches the terminal.
"""

from __future__ import annotations

import json
from typing import Any

# Why a queued job waits, in words (docs/api.md, "Job object and statuses").
PENDING_REASONS = {
    "no_node_fits": "no live node can ever hold it (GPU, labels or memory); it is placed when one that fits "
                    "registers",
    "waiting_for_capacity": "a node fits it, none has a free slot yet",
    "tenant_limit": "its tenant already holds its max_running_jobs slots (cyxwiz tenants show TENANT)",
    "priority": "higher-priority jobs are waiting for the same kind of node",
    "gang": "it needs several nodes free at once",
}
METRICS_SHOWN = ("loss", "accuracy", "val_loss", "val_accuracy")


def printable(text: object, *, multiline: bool = False) -> str:
    """``text`` safe to print on a terminal: every character that is not printable (C0 and C1 controls
    such as ESC, CR and DEL, line and paragraph separators, format characters) becomes a visible escape
    like ``\\x1b``, so a name or an error from the server cannot move the cursor, recolour or clear the
    screen, or forge lines. ``multiline`` keeps newlines and tabs, for output meant to span lines."""
    out = []
    for char in str(text):
        if char.isprintable() or (multiline and char in "\n\t"):
            out.append(char)
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def print_json(obj: Any) -> None:
    """The API's object as indented JSON (``--json``): parseable, and safe on a terminal."""
    # json.dumps escapes C0 controls and (ensure_ascii) everything beyond ASCII; DEL is the one
    # control character it leaves raw
    print(json.dumps(obj, indent=2).replace("\x7f", "\\u007f"))


def table(headers: list[str], rows: list[list[object]]) -> str:
    """Left-aligned columns under upper-case headers, two spaces apart; ``-`` for a missing value."""
    cells = [[printable("-" if value is None or value == "" else value) for value in row] for row in rows]
    widths = [max([len(header), *(len(row[i]) for row in cells)]) for i, header in enumerate(headers)]
    lines = [[header.upper() for header in headers], *cells]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _fraction(job: dict[str, Any]) -> float | None:
    progress = job.get("progress") or {}
    total, step = progress.get("total_steps") or 0, progress.get("step") or 0
    if job.get("status") == "completed":
        return 1.0
    return min(1.0, step / total) if total else None


def _epochs(job: dict[str, Any]) -> object:
    """The spec's epochs; None for a job whose length is a step budget (training.max_steps) alone."""
    return ((job.get("spec") or {}).get("training") or {}).get("epochs", "?")


def _where(job: dict[str, Any], short: bool = False) -> str:
    """``epoch 3/10`` (``e3/10``), or ``step 840/2000`` (``s840/2000``) for a step budget."""
    progress = job.get("progress") or {}
    epochs = _epochs(job)
    if epochs is None:
        step, total = printable(progress.get("step", 0)), printable(progress.get("total_steps", "?"))
        return f"{'s' if short else 'step '}{step}/{total}"
    return f"{'e' if short else 'epoch '}{printable(progress.get('epoch', 0))}/{printable(epochs)}"


def progress_cell(job: dict[str, Any]) -> str:
    """``42% e3/10`` for the jobs table, or '-' before the first report."""
    done = _fraction(job)
    if done is None:
        return "-"
    return f"{done * 100:.0f}% {_where(job, short=True)}"


def _metrics(metrics: dict[str, Any], names: tuple[str, ...] | None = None) -> list[str]:
    shown = []
    for name in names or tuple(metrics):
        value = metrics.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            shown.append(f"{printable(name)} {value:.4f}" if isinstance(value, float) else f"{printable(name)} {value}")
    return shown


def progress_line(job: dict[str, Any], width: int | None = None) -> str:
    """One line: a bar over steps, the status (with why it waits), epoch, loss and accuracy."""
    progress = job.get("progress") or {}
    done = _fraction(job) or 0.0
    bar = "#" * int(done * 30) + "-" * (30 - int(done * 30))
    status = job["status"] + (f" ({job['pending_reason']})" if job.get("pending_reason") else "")
    parts = [f"[{bar}] {done * 100:5.1f}%", f"{printable(status):<9}", _where(job)]
    parts += _metrics(progress.get("metrics") or {}, METRICS_SHOWN)
    line = "  ".join(parts)
    return line[:width] if width else line


def needs(spec: dict[str, Any]) -> str:
    """What a job asks of a node, in words ('' when it runs anywhere)."""
    req = spec.get("requirements") or {}
    wants = []
    if req.get("gpu"):
        memory = req.get("min_gpu_memory_mb") or 0
        wants.append(f"a GPU with {memory} MB" if memory else "a GPU")
    if req.get("min_ram_mb"):
        wants.append(f"{req['min_ram_mb']} MB of RAM")
    if req.get("labels"):
        wants.append("labels " + ", ".join(f"{k}={v}" for k, v in sorted(req["labels"].items())))
    if (req.get("nodes") or 1) > 1:
        wants.append(f"{req['nodes']} nodes at once")
    return printable(", ".join(wants))


def waiting_text(job: dict[str, Any]) -> str:
    """Why a queued job waits, in words, with what it needs when no node fits."""
    reason = job.get("pending_reason")
    if not reason:
        return ""
    text = f"{printable(reason)}: {PENDING_REASONS.get(reason, 'waiting')}"
    wanted = needs(job.get("spec") or {}) if reason == "no_node_fits" else ""
    return text + (f"; it needs {wanted}" if wanted else "")


def job_rows(jobs: list[dict[str, Any]], with_tenant: bool) -> str:
    headers = ["job", *(["tenant"] if with_tenant else []), "name", "status", "node", "progress", "pending",
               "verified"]
    rows = [[job["job_id"], *([job.get("tenant")] if with_tenant else []), job.get("name"), job["status"],
             job.get("node_id"), progress_cell(job), job.get("pending_reason"),
             (job.get("verification") or {}).get("status")] for job in jobs]
    return table(headers, rows)


def node_rows(nodes: list[dict[str, Any]]) -> str:
    flagged = any(node.get("flag") for node in nodes)
    headers = ["node", "name", "status", "jobs", "score", "device", "trust", "audits", *(["flag"] if flagged else [])]
    rows = [[node["node_id"], node.get("name"), node["status"], f"{node.get('running_jobs', 0)}/{node.get('slots', 0)}",
             f"{float(node.get('score') or 0):.3f}", node.get("device_kind"),
             "probation" if node.get("probation") else "trusted",
             f"{node.get('audits_passed', 0)} passed, {node.get('audits_failed', 0)} failed",
             *([node.get("flag")] if flagged else [])] for node in nodes]
    return table(headers, rows)


def job_summary(job: dict[str, Any]) -> str:
    """``cyxwiz status``: the few lines a person wants, not the whole object (``--json`` has that)."""
    lines: list[tuple[str, str]] = [
        ("job", f"{printable(job['job_id'])}  {printable(job.get('name'))}  (tenant {printable(job.get('tenant'))}, "
                f"priority {printable(job.get('priority'))})")]
    status = printable(job["status"])
    if job.get("pending_reason"):
        status += f": {waiting_text(job)}"
    lines.append(("status", status))
    attempts = job.get("attempts") or []
    names = {a["node_id"]: a.get("node") for a in attempts}
    if job.get("ranks"):  # a multi-node job: every rank's node and throughput
        lines.append(("nodes", "  ".join(
            f"rank {printable(r['rank'])} {printable(r['node_id'])}"
            + (f" {float(r['samples_per_s']):,.0f} samples/s" if r.get("samples_per_s") is not None else "")
            for r in job["ranks"])))
    elif job.get("node_id"):
        name = names.get(job["node_id"])
        lines.append(("node", printable(job["node_id"]) + (f" ({printable(name)})" if name else "")))
    where = ", ".join(f"{a['attempt']} on {printable(a['node_id'])}" + (f" ({printable(a['node'])})" if a.get("node")
                                                                         else "") for a in attempts)
    lines.append(("attempt", f"{job.get('attempt')} of {job.get('max_attempts')}" + (f": {where}" if where else "")))
    progress = job.get("progress") or {}
    if progress:
        done = _fraction(job) or 0.0
        total = progress.get("total_steps") or "?"
        epochs = _epochs(job)
        lines.append(("progress", f"{done * 100:.1f}%  step {printable(progress.get('step', 0))}/{printable(total)}  "
                                  f"epoch {printable(progress.get('epoch', 0))}/{printable(epochs or '-')}"))
        shown = _metrics(progress.get("metrics") or {})
        if shown:
            lines.append(("metrics", "  ".join(shown)))
    if job.get("error"):
        lines.append(("error", printable(job["error"], multiline=True).replace("\n", "\n" + " " * 14)))
    verification = job.get("verification")
    if verification:
        segment = verification.get("segment") or []
        parts = [printable(verification.get("status"))]
        if segment:
            parts.append("segment " + "-".join(printable(k) for k in segment))
        if verification.get("verifier"):
            parts.append(f"verifier {printable(verification['verifier'])}")
        if verification.get("distance") is not None:
            parts.append(f"distance {verification['distance']:.3g}")
        if verification.get("note"):
            parts.append(f"({printable(verification['note'])})")
        lines.append(("verification", "  ".join(parts)))
    times = [f"{label} {printable(job[key])}" for label, key in (("created", "created_at"), ("started", "started_at"),
                                                                  ("finished", "finished_at")) if job.get(key)]
    lines.append(("times", "  ".join(times)))
    if job.get("artifacts"):
        lines.append(("artifacts", ", ".join(printable(name) for name in job["artifacts"])))
    return "\n".join(f"{label:<13} {value}" for label, value in lines)


def end_text(job: dict[str, Any]) -> str:
    """The line after a watched job ends: its result, or why it did not complete."""
    job_id, status = printable(job["job_id"]), job["status"]
    if status == "completed":
        shown = _metrics((job.get("progress") or {}).get("metrics") or {}, METRICS_SHOWN)
        return (f"job {job_id} completed" + (f": {'  '.join(shown)}" if shown else "")
                + f"\nweights: cyxwiz download {job_id} -o model.safetensors")
    if status == "failed":
        return f"job {job_id} failed: {printable(job.get('error') or 'no error given', multiline=True)}"
    error = job.get("error") or ""
    said = f": {printable(error, multiline=True)}" if error and "cancel" not in error.lower() else ""
    return f"job {job_id} was {printable(status)}{said}"
