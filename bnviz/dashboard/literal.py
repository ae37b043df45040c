"""Text that came from a link or a file name, made safe to show in Streamlit's Markdown.

Streamlit renders warnings and captions as Markdown, so a value from a URL such as
``[log in](http://evil)`` or ``![](http://host/pixel.png)`` would become a live link or make
the browser fetch an image. Values are therefore shown as code spans (exactly as typed,
nothing rendered) and cut to a length a page can show; sentences that may quote such a
value have every Markdown character escaped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

#: The longest value shown; the rest is cut (a 100,000-character parameter once froze a tab).
MAX_SHOWN = 80
#: The longest message shown (a message may quote a value, and the value is cut on its own).
MAX_MESSAGE = 1200
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~:/&=$])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_SPACE = re.compile(r"\s+")
_MAX_QUOTES = 8  # quotes of a user's text turned into code spans, per message


def _cut(text: str, limit: int) -> str:
    # one line of a warning: no line breaks, no control characters
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def code_span(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` itself as a Markdown code span, on one line and cut to ``limit``
    characters: nothing in it is rendered."""
    text = _cut(str(text), limit)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def literal(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` as a Markdown code span, cut to ``limit`` characters."""
    return code_span(repr(value), limit)


def plain(text: str, limit: int = 4 * MAX_SHOWN) -> str:
    """``text`` with every Markdown character backslash-escaped, cut to ``limit``."""
    return _MARKDOWN.sub(r"\\\1", _cut(str(text), limit))


def message(text: str, quoted: Iterable[str] = (), limit: int = MAX_MESSAGE) -> str:
    """A message that may quote text a user chose (an uploaded file's name, say), as
    Markdown that shows it literally.

    Where the message quotes one of ``quoted`` (``'name'``, as bnviz's messages do), that
    quote becomes a code span of its own, cut to :data:`MAX_SHOWN`; every other character
    is escaped, so the message is shown exactly as written even where a quote is not
    recognised. The rest of the message is cut to ``limit`` characters.
    """
    text = _SPACE.sub(" ", _CONTROL.sub(" ", str(text))).strip()
    forms = set()
    for value in (str(v) for v in quoted if v):
        one_line = _SPACE.sub(" ", _CONTROL.sub(" ", value)).strip()
        forms |= {repr(value), repr(one_line), f"'{one_line}'", f"'{_cut(value, MAX_SHOWN)}'"}
    spans: list[tuple[int, int]] = []
    if forms:
        pattern = re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)))
        spans = [m.span() for m in pattern.finditer(text)][:_MAX_QUOTES]
    parts, pos, budget = [], 0, limit
    for start, end in [*spans, (len(text), len(text))]:
        between = text[pos:start]
        if len(between) > budget:
            parts.append(_MARKDOWN.sub(r"\\\1", between[: max(budget - 1, 0)]) + "…")
            break
        budget -= len(between)
        parts.append(_MARKDOWN.sub(r"\\\1", between))
        if start < end:
            parts.append(code_span(text[start:end]))
        pos = end
    return "".join(parts)
