"""The warm-up of the node runtime's forkserver: importing this module *is* the warm-up.

With warm processes (the default, see executor.py) every job process is forked from a multiprocessing
forkserver that preloads this module once. The forkserver takes only module names to preload, so the
work happens at import; the runtime itself never imports this module (it must register without torch).

What it spares each job: ``import torch`` (1-2 s), the training package, safetensors, httpx's transport and
TLS context (0.1 s), and the first optimizer's construction (1-2 s: torch imports torch._dynamo then).

What it must not do, for the forks to work:
- run a parallel op. OpenMP's thread pool does not survive a fork; a child would hang or crash in its
  first parallel op. The one tensor made here has a single element, below any parallel grain, so the
  pool is never started. The server's only other thread is OpenBLAS's pool (numpy starts it at import),
  which OpenBLAS itself stops before every fork (pthread_atfork): a job starts with one thread.
- use CUDA. Nothing here asks torch about devices, so torch.cuda stays uninitialized and the CUDA
  driver unloaded; the forked jobs initialize CUDA themselves (a driver used before a fork is unusable
  after it).
- keep a socket, a client or a file open: every job would share it.

It ignores SIGTERM and SIGINT, first of all: ``systemctl stop`` signals every process of the unit and
Ctrl-C every process of the terminal's group, a forkserver killed by either would take the exit codes of
the running jobs with it, and the drain is the runtime's. (multiprocessing's forkserver ignores SIGINT
too, but only once its preload is done.) Forked jobs inherit this. The server exits by itself once the
runtime and its job processes are gone (the end of multiprocessing's "alive" pipe: the runtime holds its
write end and hands it to every job; jobs exit as soon as the runtime is gone, job_process.py).

A preload that fails is only a slower start: the server logs it and forks as it is, since a server that
died of it would fail every job start and be started again, to fail again, for each job.
"""

from __future__ import annotations

import logging
import os
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)

# The forkserver's pid, as the job processes forked from it see it: they die with it (job_process.py).
SERVER_PID = os.getpid()


def _preload() -> None:
    import safetensors.torch  # noqa: F401
    import torch

    import node_runtime.job_process  # noqa: F401
    import node_runtime.replay  # noqa: F401
    import node_runtime.training  # noqa: F401
    from node_runtime.api import JobApi

    JobApi("http://127.0.0.1", "", "", 0).close()  # imports httpx's transport and builds the TLS context
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


try:
    _preload()
except Exception:  # noqa: BLE001 - only an optimisation: jobs import what is missing themselves
    logging.getLogger("cyxwiz.node.warm").warning("preloading the job processes' code failed; each job "
                                                   "imports what is missing itself", exc_info=True)
