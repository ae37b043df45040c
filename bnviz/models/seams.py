"""Functions the loaders look up on the ``bnviz.models`` package each time they call them.

The URL opener (``_urlopen``), the file-name hash rule (``_hash_prefix``), the network probe
(``_host_reachable``) and the torchvision builder (``_build_torchvision``) are what a test, or
anyone who needs an offline or instrumented run, replaces as ``bnviz.models.<name>``. Reading
them through the package keeps that single place effective whichever submodule makes the call.
"""

from __future__ import annotations

import sys
from typing import Any


def seam(name: str) -> Any:
    """The current value of ``bnviz.models.<name>`` (replaced or not)."""
    return getattr(sys.modules[__package__], name)
