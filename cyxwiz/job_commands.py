"""The CLI's job commands: submit, status, watch, cancel, jobs, download, logs and sample."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, TextIO

from cyxwiz.client import ApiClient, ApiError, CliError, client_from_args
from cyxwiz.inputs import check_id, spec_with_overrides
from cyxwiz.output import end_text, job_rows, job_summary, print_json, printable, progress_line, waiting_text

TERMINAL = ("completed", "failed", "cancelled")


def watch_job(client: ApiClient, job_id: str, interval_s: float = 0.5, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Redraw a progress bar (with why the job waits, while it is queued) until the job ends; return the
    final job. Not on a terminal, a line is printed only when it changes."""
    tty = out.isatty()
    last = ""
    while True:
        job: dict[str, Any] = client.request("GET", f"/v1/jobs/{job_id}")
        width = shutil.get_terminal_size().columns - 1 if tty else None
        line = progress_line(job, width)
        if tty:
            out.write("\r" + line + "\033[K")
        elif line != last:
            out.write(line + "\n")
        last = line
        out.flush()
        if job["status"] in TERMINAL:
            if tty:
                out.write("\n")
            return job
        time.sleep(interval_s if tty else max(interval_s, 2.0))


def cmd_submit(args: argparse.Namespace) -> int:
    spec = spec_with_overrides(args.file, args.set or [])
    client = client_from_args(args)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    answer = client.request("POST", "/v1/jobs", spec, headers=headers)
    job_id = answer["job_id"]
    out = sys.stderr if args.json else sys.stdout  # --json: stdout holds only the JSON
    if args.json:
        print_json(answer)
    elif args.quiet:
        print(job_id)
    elif answer["status"] == "queued":
        job = client.request("GET", f"/v1/jobs/{job_id}")
        reason = waiting_text(job)
        print(f"submitted job {job_id}: queued" + (f" ({reason})" if reason else ""))
    else:
        print(f"submitted job {job_id}: {printable(answer['status'])} to node {printable(answer.get('node_id'))}")
    if not args.watch:
        if not (args.json or args.quiet):
            print(f"follow it with: cyxwiz watch {job_id}")
        return 0
    job = watch_job(client, job_id, out=out)
    print(end_text(job), file=out)
    return 0 if job["status"] == "completed" else 1


def cmd_status(args: argparse.Namespace) -> int:
    job = client_from_args(args).request("GET", f"/v1/jobs/{check_id('job', args.job)}")
    if args.json:
        print_json(job)
    else:
        print(job_summary(job))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    job = watch_job(client_from_args(args), check_id("job", args.job))
    print(end_text(job))
    return 0 if job["status"] == "completed" else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel each job; one line per job, and exit 1 if any could not be cancelled."""
    job_ids = [check_id("job", job_id) for job_id in args.jobs]
    client = client_from_args(args)
    cancelled, failed = [], 0
    for job_id in job_ids:
        try:
            job = client.request("POST", f"/v1/jobs/{job_id}/cancel")
        except ApiError as exc:
            if exc.status == 0:
                raise
            print(f"cyxwiz: cannot cancel {job_id}: {printable(exc.explain())}", file=sys.stderr)
            failed += 1
            continue
        cancelled.append(job)
        if not args.json:
            print(f"cancelled {job_id}")
    if args.json:
        print_json(cancelled)
    return 1 if failed else 0


def cmd_jobs(args: argparse.Namespace) -> int:
    query = {"limit": args.limit, "status": args.status, "tenant": args.tenant, "cursor": args.cursor}
    path = "/v1/jobs?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    page = client_from_args(args).request("GET", path)
    if args.json:
        print_json(page)
        return 0
    jobs = page["jobs"]
    filters = ", ".join(f"{name} {printable(value)}" for name, value in (("status", args.status),
                                                                          ("tenant", args.tenant)) if value)
    if not jobs:
        print("no jobs" + (f" ({filters})" if filters else ""))
        return 0
    print(job_rows(jobs, with_tenant=len({job.get("tenant") for job in jobs}) > 1))
    if page.get("next_cursor"):
        print(f"more: cyxwiz jobs --cursor {printable(page['next_cursor'])}"
              + "".join(f" --{name} {printable(value)}" for name, value in (("status", args.status),
                                                                           ("tenant", args.tenant)) if value))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    job_id = check_id("job", args.job)
    default = f"{job_id}.safetensors" if args.name == "model.safetensors" else f"{job_id}-{args.name}"
    target = Path(args.output or default)
    data = client_from_args(args).request("GET", f"/v1/jobs/{job_id}/artifacts/{urllib.parse.quote(args.name)}",
                                          raw=True)
    try:
        target.write_bytes(data)
    except OSError as exc:
        raise CliError(f"cannot write {printable(target)}: {exc.strerror or exc}") from None
    print(f"wrote {len(data)} bytes to {printable(target)}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """A job's log lines (``<time> <line>``): the current attempt's unless ``--attempt``."""
    job_id = check_id("job", args.job)
    if args.follow and args.json:
        raise CliError("--json and -f do not go together: --json prints the lines at once, -f follows the text")
    client = client_from_args(args)
    query = {"attempt": args.attempt, "tail": args.tail, "follow": 1 if args.follow else None,
             "format": "json" if args.json else None}
    path = f"/v1/jobs/{job_id}/logs?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    try:
        if args.json:
            print_json(client.request("GET", path))
        elif args.follow:
            with client.open("GET", path, timeout_s=None) as resp:
                shown = 0
                for raw in resp:
                    print(printable(raw.decode(errors="replace").rstrip("\r\n")), flush=True)
                    shown += 1
            if not shown:
                print("no logs yet; the job has ended")
        else:
            lines = client.request("GET", path, raw=True).decode(errors="replace").splitlines()
            for line in lines:
                print(printable(line))
            if not lines:
                print("no logs yet")
    except ApiError as exc:
        if exc.status != 404:
            raise
        client.request("GET", f"/v1/jobs/{job_id}")  # an unknown job is its own 404, said as such
        if args.json:
            print_json({"job_id": job_id, "attempt": args.attempt, "lines": []})
        else:
            print("no logs yet")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Generate text with a trained language model: its weights come into memory, never to disk."""
    job_id = check_id("job", args.job)
    if args.tokens < 1:
        raise CliError("--tokens must be at least 1")
    client = client_from_args(args)
    job = client.request("GET", f"/v1/jobs/{job_id}")
    if "model.safetensors" not in (job.get("artifacts") or []):
        raise CliError(f"job {job_id} has no model yet (it is {printable(job['status'])}); sample once it "
                       "has completed")
    weights = client.request("GET", f"/v1/jobs/{job_id}/artifacts/model.safetensors", raw=True)
    try:
        from node_runtime.training.generate import generate  # torch loads here, and only here
    except ImportError as exc:
        raise CliError(f"sampling needs the node runtime's packages (torch): pip install -e '.[node]' "
                       f"({exc})") from None
    top_k = args.top_k or None  # 0: every token
    try:
        text = generate(weights, args.prompt, tokens=args.tokens, temperature=args.temperature, top_k=top_k,
                        seed=args.seed)
    except ValueError as exc:
        raise CliError(f"cannot sample from job {job_id}: {printable(exc)}") from None
    print(printable(text, multiline=True))
    return 0
