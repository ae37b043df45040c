"""The dashboard's use of :mod:`bnviz.prefetch`: the process's prefetcher, the view lookups
that consult it, and the prefetch of the view a student most likely opens next (the same
configuration with the other global mode).

The prefetcher is made on first use, from the settings (``BNVIZ_PREFETCH=0`` switches it
off); :func:`set_prefetcher` replaces it (tests).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..errors import BnvizError
from ..prefetch import Prefetcher
from ..settings import settings
from .config import DashConfig
from .overrides import overrides_to_modes
from .serving import (
    EvalPredictions,
    compute_eval_predictions,
    compute_view_data,
    view_cache_entries,
)
from .views import ViewData

#: At most this many finished views wait to be taken (tens of MB each at batch 8).
PREFETCH_CAPACITY = 4
#: See :func:`prefetch_quiet_s`.
DEFAULT_PREFETCH_QUIET_S = 0.75

_LOCK = threading.Lock()
_PREFETCHER: Prefetcher | None = None


def prefetch_quiet_s() -> float:
    """``BNVIZ_PREFETCH_QUIET_S``: seconds the prefetch waits after a rerun that a browser
    on this machine asked for (default 0.75; 0: never waits). See :func:`note_activity`."""
    return settings().prefetch_quiet_s


def prefetcher() -> Prefetcher:
    """The process-wide prefetcher of views, made on first use.

    It remembers as many computed configurations as the app's view cache holds, so what
    that cache has dropped is prefetched again.
    """
    global _PREFETCHER
    with _LOCK:
        if _PREFETCHER is None:
            s = settings()
            _PREFETCHER = Prefetcher(capacity=PREFETCH_CAPACITY, enabled=s.prefetch,
                                     remembered=view_cache_entries(),
                                     quiet_s=prefetch_quiet_s())
        return _PREFETCHER


def set_prefetcher(pre: Prefetcher | None) -> Prefetcher | None:
    """Make ``pre`` the process's prefetcher (None: a new one from the settings on next
    use); returns the one it replaces."""
    global _PREFETCHER
    with _LOCK:
        previous, _PREFETCHER = _PREFETCHER, pre
    return previous


_LOOPBACK = ("127.", "::1", "::ffff:127.", "localhost")


def browser_address(ip_address: object, headers: Mapping[str, Any] | None = None) -> str | None:
    """Where a session's browser runs, for :func:`note_activity`: its address, or None when
    it is (or may be) on this machine.

    ``ip_address`` is Streamlit's ``st.context.ip_address`` (the TCP peer; None for
    localhost) and ``headers`` its ``st.context.headers``. A reverse proxy on the server
    itself makes every peer 127.0.0.1, but names the real client in ``X-Forwarded-For``
    (first entry) or ``X-Real-IP``; that address is used when there is one. It is only a
    hint for scheduling (a client can forge it), never used for anything that matters to
    security.
    """
    address = ip_address
    for name in ("X-Forwarded-For", "X-Real-IP") if hasattr(headers, "get") else ():
        value = headers.get(name)
        first = value.split(",")[0].strip() if isinstance(value, str) else ""
        if first:
            address = first
            break
    if not isinstance(address, str) or not address or address.lower().startswith(_LOOPBACK):
        return None
    return address


def note_activity(client_ip: object) -> None:
    """A rerun of a session whose browser connects from ``client_ip`` starts or ends.

    ``None`` (Streamlit's ``st.context.ip_address`` for a browser on localhost), or anything
    that is not an address string (unknown), means the browser may draw on this machine's
    cores, so the prefetch waits until that is done
    (:meth:`bnviz.prefetch.Prefetcher.activity`). A student's browser on another machine
    does not share the server's cores: its reruns do not hold the prefetch back
    (:func:`browser_address` finds it behind a reverse proxy that says where the client is).

    On a server shared by a class (``BNVIZ_SHARED_SERVER=1``, set by ``bnviz serve-class``)
    no browser counts as local: there the cores serve every student, and one browser on the
    server itself (the operator's, or any behind a proxy that hides the client) must not
    hold back the prefetch of the whole class.
    """
    if not isinstance(client_ip, str) and not settings().shared_server:
        prefetcher().activity()


def view_data(key: Any, loaded, x: torch.Tensor, modes: Mapping[str, str], device: str, *,
              random_init: bool, prefetcher: Prefetcher | None = None,
              on_wait: Callable[[int], None] | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> ViewData:
    """The view of configuration ``key``: prefetched if it was, else computed now (in the
    server's run queue: ``on_wait(runs ahead)`` while it waits for its slot,
    ``on_progress(layers done, layers)`` during a long forward).

    The app calls this through the shared result of ``key``
    (:class:`~bnviz.dashboard.run_queue.SharedResult`), so a configuration is computed at
    most once in the foreground, however many sessions ask for it at once.
    """
    pre = _chosen(prefetcher)
    view = pre.take(key)
    if view is None:
        with pre.foreground(key):
            view = compute_view_data(loaded, x, modes, device, random_init=random_init,
                                     on_wait=on_wait, on_progress=on_progress)
    return view


def eval_predictions(key: Any, loaded, x: torch.Tensor, device: str, *,
                     prefetcher: Prefetcher | None = None,
                     on_wait: Callable[[int], None] | None = None) -> EvalPredictions:
    """The all-eval reference of ``key`` (:meth:`DashConfig.eval_key`): offered by an
    all-eval view of the same input if there was one, else computed now (queued like
    :func:`view_data`)."""
    pre = _chosen(prefetcher)
    ref = pre.take(("eval", key))
    if ref is None:
        with pre.foreground(("eval", key)):
            ref = compute_eval_predictions(loaded, x, device, on_wait=on_wait)
    return ref


def prefetch_other_mode(cfg: DashConfig, modes: Mapping[str, str], view: ViewData, loaded,
                        x: torch.Tensor, layer_names: Sequence[str], device: str, *,
                        prefetcher: Prefetcher | None = None) -> bool:
    """Ask for ``cfg`` with the other global mode (same overrides), the view a student
    most likely opens next; False if there is nothing to ask for. ``modes`` and ``view``:
    what ``cfg`` ran with and showed (remembered, so it is not prefetched again).

    Also offers the all-eval reference predictions when ``view`` is all-eval, so a toggle
    away from eval does not need a second forward for them.

    Only on the CPU: a prefetch stops or pauses at the BatchNorm layers the CPU forward
    hands over as it goes (:class:`~bnviz.dashboard.pipeline.OverlappedCondensing`); a CUDA
    forward hands nothing over, so it could neither make way for a student's forward nor
    pause, and both would hold every kept activation in GPU memory at once.
    """
    pre = _chosen(prefetcher)
    pre.remember(repr(cfg.compute_key()))
    if not pre.enabled:
        return False
    if not str(device).startswith("cpu"):
        return False
    if set(modes.values()) == {"eval"}:
        pre.offer(("eval", repr(cfg.eval_key())),
                  EvalPredictions(view.predictions, view.forward_ms))
    other = replace(cfg, mode="eval" if cfg.mode == "train" else "train")
    try:
        other_modes = overrides_to_modes(other.mode, other.override_dict, layer_names)
    except BnvizError:  # an override that is invalid in the other mode: nothing to show
        return False
    random_init = cfg.random_init
    return pre.schedule(
        repr(other.compute_key()),
        lambda cancel: compute_view_data(loaded, x, other_modes, device,
                                         random_init=random_init, cancel=cancel))


def _chosen(pre: Prefetcher | None) -> Prefetcher:
    return prefetcher() if pre is None else pre
