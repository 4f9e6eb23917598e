"""MkDocs hook: the settings reference page, rendered from the settings' JSON Schema.

At every build, ``reference/settings.md`` is generated from ``tracklog schema``'s
schema (``tracklog.cli.settings_schema``): one section per model, starting at
``LoggerSettings``, with every field's type, default, limits and description. A field
added to the code appears in the docs without anyone editing them, and
``tests/test_docs.py`` checks that every field of every model is on the page.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tracklog import settings as settings_module
from tracklog.cli import settings_schema

sys.path.insert(0, str(Path(__file__).parent))
from griffe_roles import plain_roles  # a sibling file, found via the line above

PAGE = "reference/settings.md"
Schema = Mapping[str, Any]

_INTRO = """\
# Settings reference

Every field `build_logger` accepts, generated from the settings' JSON Schema (the one
`tracklog schema` prints) when this site was built. The [settings guide](../settings.md)
explains how settings are loaded and overridden; a field not listed here is an error.

Defaults marked † are computed when the settings are loaded; they are shown as computed
with no `MLFLOW_*`, `WANDB_*` or `TRACKLOG_*` environment variable set (the model's
text says which variables change them).
"""


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated page to the site (MkDocs' ``on_files`` event)."""
    files.append(File.generated(config, PAGE, content=render(settings_schema())))
    return files


def render(schema: Schema) -> str:
    """The Markdown of the settings reference for ``schema`` (LoggerSettings' JSON Schema)."""
    definitions: Mapping[str, Schema] = schema.get("$defs", {})
    models = {"LoggerSettings": schema, **definitions}
    order, used_in = _walk(models)
    sections = [_INTRO]
    sections.extend(_section(name, models[name], used_in.get(name, [])) for name in order)
    return "\n".join(sections)


def _refs(schema: object) -> Iterator[str]:
    """The model names ``schema`` refers to, in order of appearance."""
    if isinstance(schema, Mapping):
        ref = schema.get("$ref")
        if isinstance(ref, str):
            yield ref.rsplit("/", 1)[-1]
        for key, value in schema.items():
            if key != "discriminator":  # its mapping repeats the oneOf refs
                yield from _refs(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _refs(item)


def _walk(models: Mapping[str, Schema]) -> tuple[list[str], dict[str, list[str]]]:
    """Models in reading order (each after the field that uses it) and where each is used."""
    order: list[str] = []
    used_in: dict[str, list[str]] = {}
    pending = ["LoggerSettings"]
    while pending:
        name = pending.pop(0)
        if name in order:
            continue
        order.append(name)
        for field, field_schema in models[name].get("properties", {}).items():
            for target in _refs(field_schema):
                used_in.setdefault(target, []).append(f"{name}.{field}")
                pending.append(target)
    order.extend(sorted(set(models) - set(order)))  # none today; never drop a model
    return order, used_in


def _anchor(name: str) -> str:
    return name.lower()


def _section(name: str, schema: Schema, used_in: list[str]) -> str:
    lines = [f"## {name} {{#{_anchor(name)}}}", ""]
    kind = schema.get("properties", {}).get("type", {}).get("const")
    if kind is not None:
        lines += [f"An entry of `outputs` with `type: {kind}`.", ""]
    elif used_in:
        lines += ["Used in " + ", ".join(f"`{place}`" for place in used_in) + ".", ""]
    if "description" in schema:
        lines += [_prose(schema["description"]), ""]
    lines += [
        "| field | type | default | limits | description |",
        "|---|---|---|---|---|",
    ]
    required = set(schema.get("required", ()))
    model = _model(name)
    for field, field_schema in schema.get("properties", {}).items():
        default = "required" if field in required else _default(field_schema, model, field)
        lines.append(
            "| "
            + " | ".join(
                _cell(text)
                for text in (
                    f"`{field}`",
                    _type(field_schema),
                    default,
                    _limits(field_schema),
                    _prose(field_schema.get("description", "")),
                )
            )
            + " |"
        )
    lines.append("")
    prefix = _env_prefix(model)
    if prefix:
        variables = ", ".join(f"`{prefix}{field.upper()}`" for field in schema["properties"])
        lines += [
            f"Environment variables override these fields: {variables}. A list or a nested "
            f"value is given as JSON; any other `{prefix}*` variable is an error.",
            "",
        ]
    return "\n".join(lines)


_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)


def _prose(text: str) -> str:
    """Docstring text as Markdown: roles as code, ``<run_dir>`` outside code kept visible."""
    text = plain_roles(text)
    parts, end = [], 0
    for span in _CODE_SPAN.finditer(text):
        parts += [html.escape(text[end : span.start()], quote=False), span.group(0)]
        end = span.end()
    parts.append(html.escape(text[end:], quote=False))
    return "".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "–"


def _model(name: str) -> type[BaseModel] | None:
    candidate = getattr(settings_module, name, None)
    if isinstance(candidate, type) and issubclass(candidate, BaseModel):
        return candidate
    return None


def _env_prefix(model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    prefix = model.model_config.get("env_prefix")
    return prefix if isinstance(prefix, str) else ""


# Types -------------------------------------------------------------------------------

_NAMES = {
    "string": "string",
    "integer": "integer",
    "number": "number",
    "boolean": "boolean",
    "null": "`null`",
}


def _type(schema: Schema) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{_anchor(name)})"
    if "const" in schema:
        return f"`{_plain(schema['const'])}`"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{_plain(value)}`" for value in schema["enum"])
    if "oneOf" in schema or "anyOf" in schema:
        return " or ".join(_type(option) for option in schema.get("oneOf", schema.get("anyOf")))
    kind = schema.get("type")
    if kind == "array":
        return "list of " + _type(schema.get("items", {}))
    if kind == "object":
        values = schema.get("additionalProperties", True)
        inner = _type(values) if isinstance(values, Mapping) and values else "any value"
        return f"mapping of string to {inner}"
    if kind == "string" and schema.get("format") == "password":
        return "secret string (never shown)"
    if kind == "string" and schema.get("format") == "path":
        return "path"
    if isinstance(kind, str):
        return _NAMES.get(kind, kind)
    return "any value"


def _limits(schema: Schema) -> str:
    parts: list[str] = []
    for option in [schema, *schema.get("anyOf", ())]:
        parts += _own_limits(option)
    return ", ".join(parts)


def _own_limits(schema: Schema) -> list[str]:
    parts = []
    for key, symbol in (
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("exclusiveMaximum", "<"),
    ):
        if key in schema:
            parts.append(f"{symbol} {_number(schema[key])}")
    if "minLength" in schema or "maxLength" in schema:
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        parts.append(f"{low} to {high} characters" if high else f"at least {low} characters")
    if "pattern" in schema:
        parts.append(f"matches `{schema['pattern']}`")
    return parts


def _number(value: float) -> str:
    return f"{value:,}".replace(",", " ") if isinstance(value, int) else f"{value:g}"


# Defaults ----------------------------------------------------------------------------


def _plain(value: object) -> str:
    """A JSON value as it is written in a YAML settings file."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _default(schema: Schema, model: type[BaseModel] | None, field: str) -> str:
    if "default" in schema:
        return f"`{_plain(schema['default'])}`"
    info = model.model_fields.get(field) if model is not None else None
    if info is None or info.default_factory is None:
        return "–"
    value = _computed(info)
    ref = schema.get("$ref")
    if isinstance(ref, str) and isinstance(value, Mapping):
        name = ref.rsplit("/", 1)[-1]
        return f"[its defaults](#{_anchor(name)})"
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        kinds = [item.get("type") for item in value]
        if all(isinstance(kind, str) for kind in kinds):
            return ", ".join(f"`{kind}`" for kind in kinds) + " †"
    if value in ({}, []):
        return f"`{_plain(value)}`"
    return f"`{_plain(value)}` †"


_ENVIRONMENT_PREFIXES = ("MLFLOW_", "WANDB_", "TRACKLOG_")


@contextmanager
def _clean_environment() -> Iterator[None]:
    """No variable a default factory reads (``MLFLOW_TRACKING_URI`` could hold a password)."""
    saved = {
        name: value for name, value in os.environ.items() if name.startswith(_ENVIRONMENT_PREFIXES)
    }
    for name in saved:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(saved)


def _computed(info: FieldInfo) -> object:
    with _clean_environment():
        value = info.get_default(call_default_factory=True, validated_data={})
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [
            item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in value
        ]
    return value
