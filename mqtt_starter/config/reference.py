"""The configuration reference, generated from the config model so that it cannot drift.

`python -m mqtt_starter.config.reference docs/configuration.md` rewrites the part of that page
between the markers; a test fails when the page and the model disagree.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from mqtt_starter.config import SECRET_KEYS, WEBHOOK_SECRET_KEYS, Settings

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        if typing.get_origin(candidate) is list:
            inner = typing.get_args(candidate)[0]
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _default(value: Any, annotation: Any) -> str:
    if value is PydanticUndefined:
        return "(required)"
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, Path):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {
            "str": "text",
            "int": "integer",
            "float": "number",
            "bool": "true/false",
            "Path": "path",
            "SecretStr": "secret text",
        }.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _nested_model(field.annotation)
        if nested is not None and typing.get_origin(field.annotation) is list:
            rows.append(f"| `{key}` | list | `[]` | {field.description} |")
            rows += _rows(nested, f"{key}[].")
        elif nested is not None:
            rows.append(f"| `{key}` | section | | {field.description} |")
            rows += _rows(nested, f"{key}.")
        else:
            description = (field.description or "").replace("<", "&lt;")
            if tuple(key.split(".")) in SECRET_KEYS or (
                key.startswith("alerts.webhooks[].") and name in WEBHOOK_SECRET_KEYS
            ):
                description += f"; or `{name}_file`: a file that holds it"
            rows.append(
                f"| `{key}` | {_type_name(field.annotation)} |"
                f" {_default(field.default, field.annotation)} | {description} |"
            )
    return rows


def reference() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(lines + _rows(Settings, ""))


def rewrite(text: str) -> str:
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    return f"{before}{START}\n{reference()}\n{END}{after}"


def main(argv: list[str]) -> int:
    """Rewrite the reference in the page named by the one argument."""
    if len(argv) != 1:
        print(
            "usage: python -m mqtt_starter.config.reference docs/configuration.md",
            file=sys.stderr,
        )
        return 2
    path = Path(argv[0])
    path.write_text(rewrite(path.read_text("utf-8")), "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
