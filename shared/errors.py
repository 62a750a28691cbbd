"""The few named exceptions the platform raises, and their mapping to the contract's JSON error shape.

Every function raises one of these; one handler table (``functions/common.py``) turns them into
``{"error": {"code", "message", "field"?}}`` with the right status. Nothing else builds error bodies.
"""

from __future__ import annotations


class ApiError(Exception):
    """Base class: an error with an HTTP status, a snake_case code and a human message."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        """The contract's error object."""
        error = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class MalformedBody(ApiError):
    """400: the body is not JSON, or not the JSON shape the endpoint takes."""

    status = 400
    code = "malformed_body"


class Unauthorized(ApiError):
    """401: a token is missing or unknown."""

    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    """403: the token is valid but may not do this (another node's job, a non-admin key)."""

    status = 403
    code = "forbidden"


class NotFound(ApiError):
    """404: no such id (or one that belongs to another tenant)."""

    status = 404
    code = "not_found"


class Conflict(ApiError):
    """409: the request conflicts with the current state (stale attempt, terminal job)."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    """413: the body is over the endpoint's cap."""

    status = 413
    code = "payload_too_large"


class InvalidField(ApiError):
    """422: one field of a well-formed body is invalid; ``field`` names it as a dotted path."""

    status = 422
    code = "invalid_field"


class InvalidArtifact(ApiError):
    """422: an uploaded artifact (model.safetensors, checkpoint.safetensors) is malformed or is not what
    the job's spec builds; the message says what is wrong."""

    status = 422
    code = "invalid_artifact"


class RateLimited(ApiError):
    """429: too many requests; ``Retry-After`` says when to try again."""

    status = 429
    code = "rate_limited"


class QuotaExceeded(ApiError):
    """429: the tenant is at one of its limits (queued jobs); the message says which."""

    status = 429
    code = "quota_exceeded"


class InsufficientStorage(ApiError):
    """507: the state store is full (its maxmemory); nothing was written. Retry once space is freed."""

    status = 507
    code = "insufficient_storage"

    def __init__(self, message: str = "the state store is full; nothing was stored. Finished jobs expire after "
                                      "the retention period, or an operator can raise its maxmemory") -> None:
        super().__init__(message, headers={"Retry-After": "30"})


class StoreUnavailable(ApiError):
    """503: Redis is unreachable or too slow; ``Retry-After`` says when to try again."""

    status = 503
    code = "store_unavailable"

    def __init__(self, message: str = "the state store is unreachable; try again shortly",
                 retry_after_s: int = 2) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class UnsupportedMediaType(ApiError):
    """415: a body was sent with a Content-Type that is not JSON."""

    status = 415
    code = "unsupported_media_type"


class RequestTimeout(ApiError):
    """408: the request body did not arrive in time (shared/edge.py); the connection is closed."""

    status = 408
    code = "request_timeout"


class DeadlineExceeded(ApiError):
    """503 ``request_timeout``: the server could not answer within its request deadline; retry later."""

    status = 503
    code = "request_timeout"

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class Overloaded(ApiError):
    """503 ``overloaded``: too many requests in flight from this address or in all; retry later."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str = "too many requests in flight; retry shortly", retry_after_s: int = 2) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
