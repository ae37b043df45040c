"""What this machine offers a server: memory (the container's limit when lower).

Kept free of torch so the replica supervisor (``bnviz serve-class``) can share memory out
without importing it.
"""

from __future__ import annotations

import os


def machine_memory_bytes() -> int:
    """This machine's memory: physical RAM, or the container's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total
