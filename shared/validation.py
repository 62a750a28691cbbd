"""Decoding request bodies with msgspec, and turning its errors into the contract's 400/422."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from shared import errors

T = TypeVar("T")

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"unknown field `(?P<name>[^`]+)`")
_MISSING = re.compile(r"missing required field `(?P<name>[^`]+)`")


def dotted_path(raw: str) -> str:
    """msgspec's ``$.model.layers[2].type`` as the contract's ``model.layers.2.type``."""
    raw = raw.replace("[...]", "")  # a dict value: msgspec does not say which key; name the dict
    return re.sub(r"\[(\d+)\]", r".\1", raw).lstrip(".")


def field_error(exc: msgspec.ValidationError) -> errors.InvalidField:
    """One msgspec validation error as a 422 that names the field."""
    text = str(exc)
    match = _PATH.search(text)
    path = dotted_path(match.group("path")) if match else ""
    message = _PATH.sub("", text)
    for pattern, wording in ((_UNKNOWN, "unknown field"), (_MISSING, "missing required field")):
        found = pattern.search(message)
        if found:
            path = f"{path}.{found.group('name')}" if path else found.group("name")
            message = f"{wording} {found.group('name')!r}"
    return errors.InvalidField(message, field=path or None)


def convert(data: Any, into: type[T]) -> T:
    """Validate already-decoded JSON into a msgspec Struct; 400 for a non-object, 422 for a bad field."""
    if not isinstance(data, dict):
        raise errors.MalformedBody("the body must be a JSON object")
    try:
        return msgspec.convert(data, into, strict=True)
    except msgspec.ValidationError as exc:
        raise field_error(exc) from None


def is_number(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also accepts '²', which ``int`` refuses)."""
    return text.isascii() and text.isdigit()
