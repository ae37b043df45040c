"""The input batch a configuration describes: a generated stimulus, or an image a student
uploaded (kept on disk under its hash, so a cached configuration can name it)."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading

import torch

from ..errors import StimulusError
from ..stimuli import MAX_IMAGE_BYTES, describe_stimulus, make_stimulus
from .config import UPLOAD_KIND, DashConfig

#: What a file name may keep of an uploaded file's name (the rest becomes ``_``).
UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def store_upload(data: bytes, name: str) -> tuple[str, str]:
    """Keep an uploaded file on disk for :func:`bnviz.make_stimulus` ``("file", path=...)``.

    Returns ``(sha256, path)``. The file keeps its (sanitised) original name inside a folder
    named by its hash, so error messages name the file the student uploaded.
    """
    if len(data) > MAX_IMAGE_BYTES:
        raise StimulusError(
            f"The uploaded file {name!r} is {len(data) / 2**20:.1f} MB, more than the "
            f"{MAX_IMAGE_BYTES // 2**20} MB bnviz accepts.",
            "upload a smaller image (a few hundred pixels is plenty at 224x224).",
        )
    digest = hashlib.sha256(data).hexdigest()
    folder = os.path.join(tempfile.gettempdir(), "bnviz-uploads", digest[:32])
    os.makedirs(folder, exist_ok=True)
    safe = UNSAFE_NAME.sub("_", os.path.basename(name or "upload")) or "upload"
    path = os.path.join(folder, safe)
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}.{threading.get_ident()}.part"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return digest, path


def make_batch(cfg: DashConfig, upload_path: str | None = None) -> torch.Tensor:
    """The raw input batch of ``cfg`` (``bnviz.make_stimulus``); StimulusError if bad."""
    if cfg.stimulus == UPLOAD_KIND:
        if not upload_path:
            raise StimulusError("No image uploaded yet.",
                                "upload a PNG or JPEG in the sidebar, or pick another stimulus.")
        return make_stimulus("file", cfg.size, cfg.batch_size, composition=cfg.composition,
                             seed=cfg.seed, path=upload_path)
    return make_stimulus(cfg.stimulus, cfg.size, cfg.batch_size,
                         composition=cfg.composition, seed=cfg.seed, **cfg.param_dict)


def describe_config_stimulus(cfg: DashConfig, upload_name: str = "") -> str:
    if cfg.stimulus == UPLOAD_KIND:
        return f"uploaded image ({upload_name or 'none yet'})"
    return describe_stimulus(cfg.stimulus, **cfg.param_dict)
