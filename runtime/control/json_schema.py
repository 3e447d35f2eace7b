"""The control plane's JSON Schema, generated from the typed definitions.

One JSON Schema (draft 2020-12) per message, the whole message each time:

* ``request-<command>.json``: a request (``id``, ``command``, ``params``);
* ``reply-<command>.json``: its success reply (``id``, ``ok: true``, ``result``);
* ``reply-error.json``: the error reply of every command;
* ``event-<name>.json``: an event body (``seq``, ``event``, ``time``, ``data``; the first frame,
  the ZeroMQ topic, is the event name).

The models are :mod:`runtime.control.protocol` (params), :mod:`runtime.control.replies` (results,
error reply) and :mod:`runtime.control.events` (event payloads). The committed copy is
``runtime/control/schema/``; after changing a model, regenerate it::

    python -m runtime.control.json_schema          # writes runtime/control/schema/
    python -m runtime.control.json_schema --check  # exit 1 if the committed copy is out of date

Some rules are checked by code rather than by the models' field types (an ``output_name`` must
not climb out of the data root, a ``recording`` has no NUL): the schema carries them as
patterns, and the parser's own messages stay the clearer ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from runtime.control.events import EVENTS
from runtime.control.protocol import COMMANDS, EVENT_NAMES, WireRequestId
from runtime.control.replies import RESULTS, ErrorReply

SCHEMA_DIR: Final = Path(__file__).resolve().parent / "schema"
"""Where the committed schema lives (package data)."""

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

_ENVELOPE = ConfigDict(extra="forbid", frozen=True)


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _const(value: str) -> Any:
    # Literal[...] of a value known only at run time (the command or event name).
    literal: Any = Literal
    return literal[value]


def request_model(command: str) -> type[BaseModel]:
    """The whole request of ``command`` as a model (for the schema; the server parses by hand)."""
    params = COMMANDS[command]
    return create_model(
        f"{_camel(command)}Request",
        __config__=_ENVELOPE,
        __doc__=f"A {command} request. 'params' may be omitted when every parameter is.",
        id=(WireRequestId, Field(description="chosen by the client, echoed in the reply")),
        command=(_const(command), ...),
        params=(params, Field(default_factory=params)),
    )


def reply_model(command: str) -> type[BaseModel]:
    """The success reply of ``command`` as a model."""
    return create_model(
        f"{_camel(command)}Reply",
        __config__=_ENVELOPE,
        __doc__=f"The reply to a successful {command} request.",
        id=(WireRequestId, Field(description="the request's id")),
        ok=(Literal[True], ...),
        result=(RESULTS[command], ...),
    )


def event_model(name: str) -> type[BaseModel]:
    """The body frame of event ``name`` as a model."""
    return create_model(
        f"{_camel(name)}EventBody",
        __config__=_ENVELOPE,
        __doc__=f"The body of a {name} event (the first frame, its ZeroMQ topic, is {name!r}).",
        seq=(int, Field(ge=1, description="one more than the daemon's previous event; restarts at 1 with it")),
        event=(_const(name), ...),
        time=(float, Field(description="when it was published: seconds since the Unix epoch")),
        data=(EVENTS[name], ...),
    )


def _document(model: type[BaseModel], mode: Literal["validation", "serialization"]) -> dict[str, Any]:
    return {"$schema": DIALECT, **model.model_json_schema(mode=mode)}


def generate() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema document, for every request, reply and event."""
    if set(RESULTS) != set(COMMANDS) or tuple(EVENTS) != EVENT_NAMES:
        raise RuntimeError("the command or event models do not match COMMANDS / EVENT_NAMES")
    docs: dict[str, dict[str, Any]] = {}
    for command in COMMANDS:
        docs[f"request-{command}.json"] = _document(request_model(command), "validation")
        docs[f"reply-{command}.json"] = _document(reply_model(command), "serialization")
    docs["reply-error.json"] = _document(ErrorReply, "serialization")
    for name in EVENTS:
        docs[f"event-{name}.json"] = _document(event_model(name), "serialization")
    return docs


def render(doc: Mapping[str, Any]) -> str:
    """A schema document as committed: indented JSON, one trailing newline."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def differences(out: Path) -> list[str]:
    """File names in ``out`` that differ from the generated schema (missing, changed or stale)."""
    expected = {name: render(doc) for name, doc in generate().items()}
    present = {p.name for p in out.glob("*.json")} if out.is_dir() else set()
    changed = [n for n, text in expected.items() if n not in present or (out / n).read_text("utf-8") != text]
    return sorted(changed + sorted(present - set(expected)))


def write(out: Path) -> list[str]:
    """Write the schema into ``out`` (and remove schema files no longer generated); return what changed."""
    changed = differences(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = generate()
    for name in changed:
        if name in docs:
            (out / name).write_text(render(docs[name]), encoding="utf-8")
        else:
            (out / name).unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.control.json_schema",
        description="Write the control plane's JSON Schema (one file per request, reply and event), "
        "generated from the typed definitions.",
    )
    parser.add_argument("--out", type=Path, default=SCHEMA_DIR, help=f"folder to write (default: {SCHEMA_DIR})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the folder is out of date")
    args = parser.parse_args(argv)
    out: Path = args.out
    if args.check:
        stale = differences(out)
        for name in stale:
            print(f"out of date: {out / name}", file=sys.stderr)
        if stale:
            print("regenerate with: python -m runtime.control.json_schema", file=sys.stderr)
        return 1 if stale else 0
    changed = write(out)
    print(f"{out}: {len(changed)} file(s) changed" + (f": {', '.join(changed)}" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
