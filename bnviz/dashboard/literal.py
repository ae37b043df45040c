"""Text that came from a link or a file name, made safe to show in Streamlit's Markdown.

Streamlit renders warnings and captions as Markdown, so a value from a URL such as
``[log in](http://evil)`` or ``![](http://host/pixel.png)`` would become a live link or make
the browser fetch an image. Values are therefore shown as code spans (exactly as typed,
nothing rendered) and cut to a length a page can show; sentences that may quote such a
value have every Markdown character escaped.
"""

from __future__ import annotations

import re
from typing import Any

#: The longest value shown; the rest is cut (a 100,000-character parameter once froze a tab).
MAX_SHOWN = 80
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~:/&=])")


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())  # no line breaks: one line of a warning
    return text if len(text) <= limit else text[: limit - 1] + "…"


def literal(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` as a Markdown code span, cut to ``limit`` characters."""
    text = _cut(repr(value), limit)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def plain(text: str, limit: int = 4 * MAX_SHOWN) -> str:
    """``text`` with every Markdown character backslash-escaped, cut to ``limit``."""
    return _MARKDOWN.sub(r"\\\1", _cut(str(text), limit))
