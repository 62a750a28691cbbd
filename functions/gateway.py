"""The gateway: every function in one ASGI app, for ``cyxwiz serve`` and local use.

Each function stays runnable alone; this only joins their route lists (paths never overlap, so order
does not matter) around one store per process.
"""

from __future__ import annotations

from functions.heartbeat.app import routes as heartbeat_routes
from functions.progress.app import routes as progress_routes
from functions.register.app import routes as register_routes
from functions.submit.app import routes as submit_routes
from functions.ui.app import routes as ui_routes
from shared.http import make_app

app = make_app([*register_routes, *heartbeat_routes, *submit_routes, *progress_routes, *ui_routes])
