"""What every page's charts share without sharing code: the "overwritten" mask's one colour
convention and the widths that keep subplot titles apart on a phone.

Plotly-free (plain trace dicts), so the dashboard's figures (:mod:`bnviz.figures`) and the
Pitfall lab's (:mod:`bnviz.pitfalls.figures`) both use it without importing each other.
"""

from __future__ import annotations

import numpy as np

#: The one colour convention of "was this value overwritten?" masks, on every page:
#: red = changed (the red that marks what needs attention), light grey = unchanged.
CHANGED = "#d62728"
UNCHANGED = "#e3e3e3"
MASK_TITLE = "overwritten (red = changed)"
MASK_COLORSCALE = [[0.0, UNCHANGED], [0.5, UNCHANGED], [0.5, CHANGED], [1.0, CHANGED]]

#: Characters a subplot title line may hold, by the number of columns: what fits its panel
#: on a phone (390 px; 12 px font, ~6.6 px a character) without running into its
#: neighbour's title.
SUBPLOT_TITLE_CHARS = {1: 50, 2: 26, 3: 17, 4: 12}


def wrap_words(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters at spaces (``<br>``); a
    part in parentheses starts a line of its own unless it fits whole on the current one."""
    lines: list[str] = []
    for i, group in enumerate(text.split(" (")):
        words = (group if i == 0 else "(" + group).split(" ")
        fits = lines and len(lines[-1]) + 1 + len(" ".join(words)) <= width
        for k, word in enumerate(words):
            if lines and len(lines[-1]) + 1 + len(word) <= width and (k or i == 0 or fits):
                lines[-1] += " " + word
            else:
                lines.append(word)
    return "<br>".join(lines)


def mask_heatmap(changed, x=None, y=None, colorbar: dict | None = None) -> dict:
    """The heatmap trace (a plain dict) of an "overwritten" mask in the one convention:
    1 = changed (red), 0 = unchanged (light grey), with a colour bar whose two ticks say
    "changed" and "unchanged". ``colorbar``: its placement."""
    trace = {"type": "heatmap", "z": np.asarray(changed, dtype=np.uint8), "zmin": 0,
             "zmax": 1, "colorscale": MASK_COLORSCALE, "name": "overwritten",
             # the labels near the ends, so the two words do not touch on a phone's short bar
             "colorbar": {"tickvals": [0.1, 0.9], "ticktext": ["unchanged", "changed"],
                          "thickness": 9, **(colorbar or {})},
             "hovertemplate": "h=%{y}, w=%{x}: %{z} (1 = changed, 0 = unchanged)"
                              "<extra></extra>"}
    if x is not None:
        trace["x"] = np.asarray(x, dtype=np.int32)
    if y is not None:
        trace["y"] = np.asarray(y, dtype=np.int32)
    return trace
