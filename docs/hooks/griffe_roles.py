"""A griffe extension: Sphinx roles in tracklog's docstrings as Markdown code spans.

The docstrings are written for ``help()`` and editors, in reST's habits
(``:class:`~tracklog.Video```); mkdocstrings renders Markdown, where the role would
show as literal text. ``:class:`~a.b.C``` becomes ```C``` and ``:func:`a.b.f``` becomes
```a.b.f```, as Sphinx would print them.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|data|attr|mod|exc|obj):`(~?)([^`]+)`")


def _code_span(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def plain_roles(text: str) -> str:
    """``text`` with every Sphinx cross-reference role turned into a code span."""
    return _ROLE.sub(_code_span, text)


class SphinxRoles(griffe.Extension):
    """Rewrites the roles in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(obj.docstring.value)
