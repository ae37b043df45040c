"""Refuse to start a first install that cannot fit on the disk, before downloading anything.

`make` installs PyPI's torch, whose CUDA libraries take about 6.3 GB in `.venv`, and pip
keeps the downloaded wheels (about 3.5 GB) in its temporary folder until the whole install
ends. A disk that fills half-way leaves a broken venv and pip's bare "No space left on
device"; this check says how much is needed where, and what to do, in one line instead.

Run by the Makefile with the system Python (the venv may not exist yet); does nothing when
torch is already installed in the venv, because then pip downloads next to nothing.
Usage: python scripts/check_disk.py VENV_DIR
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

GB = 1024**3
VENV_NEED = 7 * GB  # torch + CUDA libraries + triton + the rest, installed
DOWNLOAD_NEED = 3 * GB  # the wheels, held in pip's temporary folder during the install


def _has_torch(venv: Path) -> bool:
    return any(venv.glob("lib/python3*/site-packages/torch/__init__.py"))


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def main(argv: list[str]) -> int:
    venv = Path(argv[1] if len(argv) > 1 else ".venv").resolve()
    if _has_torch(venv):
        return 0
    tmp = Path(tempfile.gettempdir()).resolve()
    where = {}  # device -> (path, bytes needed)
    for path, need in ((_existing(venv), VENV_NEED), (tmp, DOWNLOAD_NEED)):
        dev = os.stat(path).st_dev
        old = where.get(dev, (path, 0))
        where[dev] = (old[0], old[1] + need)
    for path, need in where.values():
        free = shutil.disk_usage(path).free
        if free < need:
            print(
                f"bnviz: the first install (PyTorch with its CUDA libraries) needs about "
                f"{need / GB:.0f} GB free on the disk of {path}, but only {free / GB:.1f} GB "
                "is free. Free some space there (or point TMPDIR at a larger disk for pip's "
                "downloads) and run make again.",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
