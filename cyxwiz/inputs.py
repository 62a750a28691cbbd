"""What the user types, checked before anything is sent: ids, the job spec file (or stdin) and its
``--set`` overrides. Each mistake is a :class:`CliError` with one line that says what to do."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from cyxwiz.client import CliError
from cyxwiz.output import printable

# The API's id forms (shared/http.py's convertors, shared/auth.py's key ids), with an example each.
ID_FORMS = {
    "job": (re.compile(r"j-[0-9a-f]{20}"), "j-0123456789abcdef0123"),
    "node": (re.compile(r"n-[0-9a-f]{16}"), "n-0123456789abcdef"),
    "key": (re.compile(r"k-[0-9a-f]{16}"), "k-0123456789abcdef"),
}


def check_id(kind: str, value: str) -> str:
    """``value`` if it is a well-formed id of ``kind`` (job, node, key), else a CliError."""
    pattern, example = ID_FORMS[kind]
    if not pattern.fullmatch(value):
        raise CliError(f"'{printable(value)}' is not a {kind} id (they look like {example})")
    return value


def load_spec(source: str) -> dict[str, Any]:
    """The job spec in the file ``source`` (``-``: standard input) as a JSON object."""
    name = "standard input" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"no such file: {printable(source)}") from None
    except IsADirectoryError:
        raise CliError(f"{printable(source)} is a directory, not a job spec file") from None
    except UnicodeDecodeError:
        raise CliError(f"{printable(name)} is not UTF-8 text (a job spec is JSON)") from None
    except OSError as exc:
        raise CliError(f"cannot read {printable(source)}: {exc.strerror or exc}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{printable(name)} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                       f"column {exc.colno}") from None
    if not isinstance(spec, dict):
        raise CliError(f"{printable(name)} must hold a JSON object (a job spec, see examples/digits-mlp.json)")
    return spec


def parse_value(raw: str) -> Any:
    """A ``--set`` value: JSON when it parses (``5``, ``true``, ``[64, 32]``, ``"5"``), else the text."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def apply_override(spec: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set path=value`` to ``spec`` in place. The path is dotted (``training.epochs``); a
    number steps into a list (``model.layers.0.out``); missing objects on the way are created."""
    path, sep, raw = assignment.partition("=")
    parts = path.split(".")
    if not sep or not all(parts):
        raise CliError(f"--set takes PATH=VALUE, like training.epochs=5 (got '{printable(assignment)}')")
    node: Any = spec
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the spec"
        if isinstance(node, dict):
            if last:
                node[part] = parse_value(raw)
            else:
                node = node.setdefault(part, {})
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise CliError(f"--set {printable(path)}: {printable(where)} is a list of {len(node)}; "
                               f"'{printable(part)}' is not an index in it")
            if last:
                node[int(part)] = parse_value(raw)
            else:
                node = node[int(part)]
        else:
            shown = printable(json.dumps(node))[:40]
            raise CliError(f"--set {printable(path)}: {printable(where)} is {shown}, not an object")


def spec_with_overrides(source: str, assignments: list[str]) -> dict[str, Any]:
    """The spec from ``source`` with every ``--set`` applied in order."""
    spec = load_spec(source)
    for assignment in assignments:
        apply_override(spec, assignment)
    return spec
