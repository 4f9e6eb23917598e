"""The documentation site: ``mkdocs build --strict`` as a real subprocess, pages read back.

The built HTML is parsed with the standard library's ``html.parser``. The expected
contents come from the code (the settings models, the ``LogValue`` union, each
module's ``__all__``), so a field, a value type, an output or a public name added
without its documentation fails here instead of leaving the site stale.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

import tracklog
from tracklog import callbacks, outputs, readers, settings
from tracklog.settings import LoggerSettings, OutputSettings
from tracklog.values import LogValue

ROOT = Path(__file__).resolve().parents[1]


# Building ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    root: Path
    log: str

    def page(self, name: str) -> str:
        """The HTML of the page built from ``docs/<name>.md``."""
        return (self.root / name / "index.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    target = tmp_path_factory.mktemp("docs") / "site"
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TRACKLOG_", "MLFLOW_", "WANDB_"))
    }
    env["NO_MKDOCS_2_WARNING"] = "1"  # Material's banner about MkDocs 2.0, on stderr
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(target)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    return Site(target, log)


def test_the_site_builds_strictly_with_no_warning(site: Site) -> None:
    assert "WARNING" not in site.log, site.log
    assert (site.root / "index.html").is_file()
    assert not (site.root / "hooks").exists(), "the build hooks must not be published"


def test_every_markdown_page_is_in_the_navigation(site: Site) -> None:
    pages = {
        path.relative_to(ROOT / "docs").with_suffix("").as_posix()
        for path in (ROOT / "docs").rglob("*.md")
    }
    home = site.page("")
    for page in pages:
        link = "." if page == "index" else f"{page}/"
        assert f'href="{link}"' in home, f"docs/{page}.md is not in mkdocs.yml's nav"


# Reading HTML --------------------------------------------------------------------------


@dataclass
class _Table:
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


class _Page(HTMLParser):
    """Text of each ``<h2>`` section and every table (cells as text), in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, list[str]] = {}
        self.tables: dict[str, list[_Table]] = {}
        self._section = ""
        self._in_article = False
        self._in_h2 = False
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "article":
            self._in_article = True
        elif tag == "h2" and self._in_article:
            self._section = dict(attrs).get("id") or ""
            self._in_h2 = True
        elif tag == "table":
            self.tables.setdefault(self._section, []).append(_Table())
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "article":
            self._in_article = False
        elif tag == "h2":
            self._in_h2 = False
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            table = self.tables[self._section][-1]
            if table.header:
                table.rows.append(self._row)
            else:
                table.header = self._row
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._in_article and not self._in_h2:
            self.sections.setdefault(self._section, []).append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


# The settings reference ----------------------------------------------------------------


def _models(model: type[BaseModel]) -> Iterator[type[BaseModel]]:
    """``model`` and every model its fields hold, however nested in unions and lists."""
    seen: set[type[BaseModel]] = set()
    pending = [model]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        yield current
        for info in current.model_fields.values():
            pending.extend(_inner_models(info.annotation))


def _inner_models(annotation: object) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for argument in typing.get_args(annotation):
        yield from _inner_models(argument)


def _output_models() -> list[type[BaseModel]]:
    union = typing.get_args(OutputSettings)[0]
    return list(typing.get_args(union))


def _written_default(info: FieldInfo) -> str | None:
    """The default as the settings file writes it, or None when a factory computes it."""
    if info.default_factory is not None:
        return None
    default = info.default
    if isinstance(default, str | Path):
        return str(default)
    return json.dumps(default)


def _literals(annotation: object) -> list[object]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [value for argument in typing.get_args(annotation) for value in _literals(argument)]


def test_models_found_include_every_output_and_delivery() -> None:
    # Guards the walk below: it must reach the models the reference is checked against.
    found = set(_models(LoggerSettings))
    assert set(_output_models()) <= found
    assert settings.DeliverySettings in found
    assert len(_output_models()) == 7


def test_every_settings_field_has_a_description_in_the_schema() -> None:
    # The reference page shows each field's schema description; a field without one is
    # a bare "–" there. Checked on the schema itself, so it fails without building the site.
    schema = LoggerSettings.model_json_schema()
    described = {"LoggerSettings": schema, **schema["$defs"]}
    models = {model.__name__: model for model in _models(LoggerSettings)}
    assert set(described) == set(models)
    missing = []
    for name, model in models.items():
        properties = described[name]["properties"]
        assert list(properties) == list(model.model_fields), f"{name}: fields differ"
        missing += [
            f"{name}.{field}"
            for field, field_schema in properties.items()
            if not str(field_schema.get("description", "")).strip()
        ]
    assert not missing, f"settings fields without a description: {missing}"


@pytest.mark.parametrize("model", list(_models(LoggerSettings)), ids=lambda model: model.__name__)
def test_settings_reference_lists_every_field_with_its_default_and_description(
    site: Site, model: type[BaseModel]
) -> None:
    page = parse(site.page("reference/settings"))
    section = model.__name__.lower()
    assert section in page.tables, f"no section for {model.__name__} in the settings reference"
    (table,) = page.tables[section]
    assert table.header == ["field", "type", "default", "limits", "description"]
    rows = {row[0]: row for row in table.rows}
    assert list(rows) == list(model.model_fields), f"{model.__name__}: fields differ"
    for name, info in model.model_fields.items():
        _, kind, default, _, description = rows[name]
        written = _written_default(info)
        if written is not None:
            assert default == written, f"{model.__name__}.{name}: default"
        else:
            assert default != "–", f"{model.__name__}.{name}: computed default not shown"
        assert info.description, f"{model.__name__}.{name}: no description"
        # Backticks become code; <run_dir> and the like stay visible as text.
        assert description == info.description.replace("`", ""), f"{model.__name__}.{name}"
        for choice in _literals(info.annotation):
            assert str(choice) in kind, f"{model.__name__}.{name}: choice {choice!r} missing"


def _without_roles(text: str) -> str:
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text).replace("``", "")


def test_settings_reference_describes_each_model_and_the_environment(site: Site) -> None:
    page = parse(site.page("reference/settings"))
    for model in _models(LoggerSettings):
        text = " ".join("".join(page.sections[model.__name__.lower()]).split())
        summary = _without_roles((model.__doc__ or "").strip().splitlines()[0])
        assert summary in text, model.__name__
    top = "".join(page.sections["loggersettings"])
    for name in LoggerSettings.model_fields:
        assert f"TRACKLOG_{name.upper()}" in top


def test_settings_reference_shows_computed_defaults_without_the_environment(
    site: Site, tmp_path: Path
) -> None:
    # A tracking URI in the builder's environment (maybe with a password) must not be
    # published as the default.
    page = parse(site.page("reference/settings"))
    (mlflow,) = page.tables["mlflowoutput"]
    tracking_uri = next(row for row in mlflow.rows if row[0] == "tracking_uri")
    assert tracking_uri[2] == "sqlite:///mlflow.db †"
    (top,) = page.tables["loggersettings"]
    outputs_row = next(row for row in top.rows if row[0] == "outputs")
    assert outputs_row[2] == "console, file, jsonl, csv †"


# The value x backend table -------------------------------------------------------------


def _output_types() -> list[str]:
    return [model.model_fields["type"].default for model in _output_models()]


def test_value_backend_table_has_a_cell_for_every_value_type_and_output(site: Site) -> None:
    page = parse(site.page("values-backends"))
    table = page.tables[""][0]
    header = table.header
    columns = [set(cell.split(", ")) for cell in header[1:]]
    for kind in _output_types():
        assert sum(kind in column for column in columns) == 1, f"no column for type {kind}"
    assert set().union(*columns) == set(_output_types()), "a column for an unknown output"
    names = [cls.__name__ for cls in typing.get_args(LogValue)]
    assert len(names) == 8
    first_words = [row[0].split(" ", 1)[0] for row in table.rows]
    for name in names:
        assert first_words.count(name) == 1, f"no row for {name}"
    for row in table.rows:
        assert len(row) == len(header), row
        if row[0].split(" ", 1)[0] in names:
            assert all(cell not in ("", "–") for cell in row), f"a hole in the row {row[0]}"


# The API reference ---------------------------------------------------------------------

API_PAGES: dict[str, ModuleType] = {
    "api/settings": settings,
    "api/outputs": outputs,
    "api/readers": readers,
    "api/callbacks": callbacks,
}


def _documented(site: Site) -> set[str]:
    ids: set[str] = set()
    for page in ["api/tracklog", *API_PAGES]:
        parser = _Ids()
        parser.feed(site.page(page))
        ids |= parser.ids
    return ids


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        anchor = dict(attrs).get("id")
        if anchor:
            self.ids.add(anchor)


@pytest.mark.parametrize("page", list(API_PAGES))
def test_api_reference_documents_every_public_name_of_each_module(site: Site, page: str) -> None:
    module = API_PAGES[page]
    ids = _documented(site)
    missing = [name for name in module.__all__ if f"{module.__name__}.{name}" not in ids]
    assert not missing, f"{page}: not documented: {missing}"


@pytest.mark.parametrize("page", ["api/tracklog", *API_PAGES])
def test_api_reference_shows_no_private_module_level_name(site: Site, page: str) -> None:
    # The public names are the ones in __all__; mask_uri, LEVELS, parse_field... are not.
    module = API_PAGES.get(page, tracklog)
    parser = _Ids()
    parser.feed(site.page(page))
    prefix = module.__name__ + "."
    shown = {
        anchor.removeprefix(prefix)
        for anchor in parser.ids
        if anchor.startswith(prefix) and "." not in anchor.removeprefix(prefix)
    }
    assert shown, f"{page}: nothing documented"
    assert shown <= set(module.__all__), f"{page}: not in __all__: {shown - set(module.__all__)}"


def test_api_reference_documents_every_top_level_name_somewhere(site: Site) -> None:
    ids = _documented(site)
    modules = {module.__name__ for module in API_PAGES.values()}
    missing = []
    for name in tracklog.__all__:
        if name.startswith("__"):
            continue
        value = getattr(tracklog, name)
        if isinstance(value, ModuleType):
            if value.__name__ not in modules:
                missing.append(name)
            continue
        homes = {f"tracklog.{name}"} | {f"{module}.{name}" for module in modules}
        if not homes & ids:
            missing.append(name)
    assert not missing, f"public names of tracklog missing from the API reference: {missing}"


def test_api_reference_shows_no_raw_sphinx_roles(site: Site) -> None:
    # The docstrings use reST roles (:class:`~tracklog.Video`); the griffe extension in
    # docs/hooks turns them into code, so no page shows the markup.
    assert ":class:`" in (callbacks.__doc__ or ""), "no role left to check: update this test"
    for page in ["api/tracklog", *API_PAGES, "reference/settings"]:
        text = "".join("".join(parts) for parts in parse(site.page(page)).sections.values())
        for role in (":class:", ":func:", ":meth:", ":data:", ":mod:", ":attr:"):
            assert role not in text, f"{page} shows {role}"
