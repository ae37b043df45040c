"""Errors a user can fix.

Every error bnviz raises for bad input derives from :class:`BnvizError` and carries two
parts: ``problem`` (what is wrong, naming the offending value) and ``fix`` (what to do
about it). The CLI prints ``str(err)`` as one line and exits non-zero; the dashboard shows
it in an error box and keeps running. Anything that is *not* a ``BnvizError`` is a bug.
"""

from __future__ import annotations


class BnvizError(ValueError):
    """Base class: a problem with the caller's input, and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} Fix: {fix}")


class UnknownModelError(BnvizError):
    """The model name is not in the registry."""


class WeightsUnavailableError(BnvizError):
    """Pretrained weights are neither cached nor downloadable (typically offline)."""

    def __init__(self, problem: str, fix: str | None = None, *, url: str = "",
                 filename: str = "", cache_dir: str = ""):
        super().__init__(problem, fix)
        self.url = url
        self.filename = filename
        self.cache_dir = cache_dir


class CheckpointError(BnvizError):
    """A user checkpoint cannot be read or does not fit the architecture."""


class StimulusError(BnvizError):
    """Unknown stimulus kind, bad parameter, unreadable / too large image."""


class ModeError(BnvizError):
    """A layer mode string that does not parse, or names an unknown layer."""


class LayerError(BnvizError):
    """A layer name that the model does not have, or a model without BatchNorm."""


class DeviceError(BnvizError):
    """CUDA asked for but missing, or out of memory."""
