"""The CyxWiz node runtime: registers a host as a node, heartbeats, trains the jobs placed on it in
child processes and hands back trained weights.

``cyxwiz node`` (or ``python -m node_runtime``) runs it. Modules, by concern: ``settings`` (flags and
environment), ``device`` (capabilities), ``api`` (HTTP with retries), ``assignments`` (the Redis
stream), ``agent`` (registration, heartbeats, consuming, draining), ``supervisor`` and ``executor``
(job processes), ``job_process`` and ``progress_sender`` (inside a job process), ``training``
(models, data and the training loop).
"""
