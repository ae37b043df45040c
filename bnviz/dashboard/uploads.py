"""The input batch a configuration describes: a generated stimulus, or an image a student
uploaded.

Uploads are kept on disk under their hash, so that a cached configuration can name one, in
a folder private to this server process (:class:`UploadStore`): made fresh with mode 0700
at first use (never a shared, predictable folder whose files someone else could have put
there), each file deleted a while after its last use (``BNVIZ_UPLOAD_TTL_S``) and the
whole folder at exit. Only files this process wrote, whose bytes still have the recorded
hash, are ever read back; messages name an upload by its original file name, never by its
place on the server.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

import torch

from ..errors import StimulusError
from ..settings import settings
from ..stimuli import (
    MAX_IMAGE_BYTES,
    batch_of_image,
    describe_stimulus,
    load_image,
    make_stimulus,
)
from ..stimuli.files import read_regular_file, shown_name
from .config import UPLOAD_KIND, DashConfig

#: What a file name may keep of an uploaded file's name (the rest becomes ``_``).
UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
#: The most uploads kept at once (at most 20 MiB each); the oldest go first.
MAX_KEPT_UPLOADS = 256
# The label of the input is shown as Markdown: these characters of a file name are escaped
# so the name shows as typed (``[x](http://...)`` stays text). "." and "-" do nothing there.
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+!|<>~:&=$])")


def _gone() -> StimulusError:
    """The one message for an upload that cannot be read back, whatever the reason."""
    return StimulusError(
        "The uploaded image is no longer on the server (uploads are deleted a while after "
        "their last use).",
        "upload it again.",
    )


def upload_file_name(name: str) -> str:
    """An uploaded file's name as messages quote it (``'name'``): its last part, on one
    line, cut to 80 characters. Messages are plain text; the page shows them with
    :func:`bnviz.dashboard.literal.message`, which keeps such a quote literal."""
    return shown_name(re.split(r"[\\/]", str(name or ""))[-1] or "upload")


@dataclass
class _Upload:
    digest: str
    path: str
    name: str  # the original file name, for messages
    used: float  # time.time() of the last store or read


class UploadStore:
    """Uploaded files of one server process, in a private folder made at first use."""

    def __init__(self, ttl_s: float | None = None, max_kept: int = MAX_KEPT_UPLOADS):
        self._ttl_s = ttl_s
        self._max_kept = max_kept
        self._lock = threading.Lock()
        self._folder: str | None = None
        self._uploads: dict[str, _Upload] = {}  # by path

    @property
    def ttl_s(self) -> float:
        return settings().upload_ttl_s if self._ttl_s is None else self._ttl_s

    @property
    def folder(self) -> str | None:
        """The private folder, or None before the first upload."""
        return self._folder

    def _ensure_folder(self) -> str:
        if self._folder is None or not os.path.isdir(self._folder):
            # mkdtemp: a new, unpredictable name, created with mode 0700 by this process.
            self._folder = tempfile.mkdtemp(prefix="bnviz-uploads-")
            self._uploads.clear()
        return self._folder

    def _forget(self, upload: _Upload) -> None:
        self._uploads.pop(upload.path, None)
        try:
            os.unlink(upload.path)
            os.rmdir(os.path.dirname(upload.path))  # only once its last name is gone
        except OSError:
            pass

    def expire(self, now: float | None = None) -> int:
        """Delete the uploads unused for longer than the TTL; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            old = [u for u in self._uploads.values() if now - u.used > self.ttl_s]
            for upload in old:
                self._forget(upload)
            return len(old)

    def store(self, data: bytes, name: str, now: float | None = None) -> tuple[str, str]:
        """Keep ``data`` (an uploaded file called ``name``); returns ``(sha256, path)``."""
        now = time.time() if now is None else now
        self.expire(now)  # bounded: one pass over at most max_kept records
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            folder = self._ensure_folder()
            sub = os.path.join(folder, digest[:32])
            safe = UNSAFE_NAME.sub("_", re.split(r"[\\/]", name or "")[-1]) or "upload"
            path = os.path.join(sub, safe[:100])
            known = self._uploads.get(path)
            if known is not None and known.digest == digest and os.path.isfile(path):
                known.used, known.name = now, name
                return digest, path
            while len(self._uploads) >= self._max_kept:
                self._forget(min(self._uploads.values(), key=lambda u: u.used))
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.part"
            try:
                os.makedirs(sub, mode=0o700, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except OSError as exc:  # e.g. a full disk; the message names no path
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise StimulusError(
                    f"The server could not keep the uploaded file '{upload_file_name(name)}' "
                    f"({exc.strerror or type(exc).__name__}).",
                    "try again in a while, or tell whoever runs this server.",
                ) from None
            self._uploads[path] = _Upload(digest, path, name, now)
            return digest, path

    def read(self, path: str, now: float | None = None) -> tuple[bytes, str]:
        """The bytes and original name of an upload this store wrote at ``path``.

        Anything else (a path it never wrote, a file since deleted or changed) gets one
        message that names no path."""
        self.expire(now)
        with self._lock:
            upload = self._uploads.get(path)
            if upload is None:
                raise _gone()
            upload.used = time.time() if now is None else now
        label = f"uploaded file '{upload_file_name(upload.name)}'"
        try:
            data = read_regular_file(path, MAX_IMAGE_BYTES, label)
        except StimulusError:
            raise _gone() from None
        if hashlib.sha256(data).hexdigest() != upload.digest:
            raise _gone()
        return data, upload.name

    def close(self) -> None:
        """Delete the folder and everything in it (at exit, or in tests)."""
        with self._lock:
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
            self._uploads.clear()


_STORE = UploadStore()
atexit.register(lambda: _STORE.close())


def upload_store() -> UploadStore:
    """This process's upload store."""
    return _STORE


def store_upload(data: bytes, name: str) -> tuple[str, str]:
    """Keep an uploaded file for :func:`make_batch`; returns ``(sha256, path)``.

    The path is for :func:`make_batch` only: it is never shown (messages name the file the
    student uploaded).
    """
    if len(data) > MAX_IMAGE_BYTES:
        raise StimulusError(
            f"The uploaded file '{upload_file_name(name)}' is {len(data) / 2**20:.1f} MB, more "
            f"than the {MAX_IMAGE_BYTES // 2**20} MB bnviz accepts.",
            "upload a smaller image (a few hundred pixels is plenty at 224x224).",
        )
    return _STORE.store(data, name)


def make_batch(cfg: DashConfig, upload_path: str | None = None) -> torch.Tensor:
    """The raw input batch of ``cfg`` (``bnviz.make_stimulus``); StimulusError if bad."""
    if cfg.stimulus == UPLOAD_KIND:
        if not upload_path:
            raise StimulusError("No image uploaded yet.",
                                "upload a PNG or JPEG in the sidebar, or pick another stimulus.")
        data, name = _STORE.read(upload_path)
        # Decoded from the bytes, so that any message names the upload, not the path.
        image = load_image(data, cfg.size, name=upload_file_name(name))
        return batch_of_image(image, cfg.batch_size, composition=cfg.composition,
                              seed=cfg.seed)
    return make_stimulus(cfg.stimulus, cfg.size, cfg.batch_size,
                         composition=cfg.composition, seed=cfg.seed, **cfg.param_dict)


def describe_config_stimulus(cfg: DashConfig, upload_name: str = "") -> str:
    if cfg.stimulus == UPLOAD_KIND:
        # Shown as Markdown (a caption): the name's Markdown characters are escaped.
        shown = (_MARKDOWN.sub(r"\\\1", upload_file_name(upload_name)) if upload_name
                 else "none yet")
        return f"uploaded image ({shown})"
    return describe_stimulus(cfg.stimulus, **cfg.param_dict)
