"""The dashboard: a static page at ``/ui`` over the public API, and ``GET /v1/queue``."""
