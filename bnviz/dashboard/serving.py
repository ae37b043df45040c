"""Running the network for the dashboard: one :func:`bnviz.inspect` per configuration,
condensed at once (the report and its activations are dropped), and the all-eval
reference predictions. Every run is counted, so tests can prove that picking a layer,
channel or chart never runs the network again.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..inspection import inspect
from ..models import LoadedModel, load_model
from ..prefetch import JobSignal
from ..settings import settings
from ..validation import seeded_call
from .pipeline import OverlappedCondensing, _overlap_pool, build_view_data
from .resources import _forward_finished, _forward_started
from .views import ViewData, prediction_rows

_COUNTER_LOCK = threading.Lock()
INSPECT_CALLS = {"view": 0, "eval": 0, "prefetch": 0}


def _count(kind: str) -> None:
    with _COUNTER_LOCK:
        INSPECT_CALLS[kind] += 1


def inspect_calls() -> dict[str, int]:
    with _COUNTER_LOCK:
        return dict(INSPECT_CALLS)


def view_cache_entries() -> int:
    """How many configurations the server keeps condensed (``BNVIZ_VIEW_CACHE``, default 16)."""
    return settings().view_cache


def load_shared_model(name: str, random_init: bool) -> LoadedModel:
    """The model every session of a configuration shares: pretrained, or a random init
    seeded so that every session and every server restart shows the same random network
    (a shared link reproduces its numbers)."""
    if random_init:
        return seeded_call(load_model, name, weights=None, seed=0)
    return load_model(name)


def compute_view_data(loaded, x: torch.Tensor, modes: Mapping[str, str] | str | None,
                      device: str, *, random_init: bool,
                      meta: Mapping[str, Any] | None = None,
                      cancel: threading.Event | None = None) -> ViewData:
    """One :func:`bnviz.inspect` call (all tensors kept), condensed; the report is dropped.

    ``cancel`` (given by a prefetch): checked at every BatchNorm layer (CPU); once set, the
    forward stops there with :class:`bnviz.prefetch.Cancelled` (a prefetch that a waiting
    student overtook). What is left to condense after such a forward is done in the calling
    (low-priority) thread, not on the normal-priority pool. A prefetch's ``cancel``
    (:class:`bnviz.prefetch.JobSignal`) also pauses the work at every layer while a page is
    being drawn.
    """
    _count("view" if cancel is None else "prefetch")
    _forward_started()
    pool = _overlap_pool()
    overlapped = OverlappedCondensing(pool, cancel) \
        if pool is not None or cancel is not None else None
    try:
        try:
            report = inspect(loaded, x, modes=modes, device=device, keep_tensors=True,
                             tensor_sink=overlapped)
        except BaseException:
            if overlapped is not None:
                overlapped.cancel_all()
            raise
        try:
            return build_view_data(
                report, random_init=random_init, meta=meta, overlapped=overlapped,
                pooled=cancel is None,
                pause=cancel.pause_while_busy if isinstance(cancel, JobSignal) else None)
        finally:
            del report
    finally:
        _forward_finished()


@dataclass(frozen=True)
class EvalPredictions:
    """Top-k per image of the all-eval reference run (predictions only, no tensors)."""

    predictions: tuple[tuple[tuple[int, str, float], ...], ...] | None
    forward_ms: float


def compute_eval_predictions(loaded, x: torch.Tensor, device: str) -> EvalPredictions:
    """The reference run for the predictions view: every BN layer in eval, no tensors."""
    _count("eval")
    report = inspect(loaded, x, modes="eval", device=device, keep_tensors=False)
    return EvalPredictions(prediction_rows(report), report.forward_ms)
