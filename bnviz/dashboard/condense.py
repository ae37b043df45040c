"""Condensing one layer's activation tensors into the small arrays the charts draw.

A kept layer holds activations of hundreds of MB for a batch of 8; the dashboard keeps
only what its charts show: feature maps of image 0 (every pixel up to 112 x 112), fixed-bin
histograms, a fixed sample of elements for the scatter plot and a few exactly stored
elements for the written-out formula (:class:`CondensedTensors`). Every value is read from
the tensors, never recomputed; only maps larger than the limit are shrunk, by averaging
blocks of pixels (the charts say so).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BnvizError
from ..inspection import LayerReport

# -- sizes of what is kept per layer --------------------------------------------------------

#: Feature maps of image 0 are kept whole up to MAX_GRID x MAX_GRID pixels: a 112 x 112 map
#: (the first layers at 224 px) is the picture a student recognises; every 7th pixel of it
#: was noise. Larger maps are kept as means of f x f blocks (f as small as fits).
MAX_GRID = 112
#: ... and at most about this many values per layer and kind (5 MB of float32): the widest
#: 112 x 112 layers of the registry (96 channels) stay whole, and a wider or larger layer
#: (DenseNet concatenates up to 1024 channels) is averaged further instead of dominating the
#: memory of a cached configuration.
MAP_BUDGET = 1_300_000
#: Fixed number of bins of the per-channel histograms, and how many (image, position) pairs
#: per layer they count (the same positions in every channel; all of them when fewer).
HIST_BINS = 24
HIST_SAMPLE = 512
#: Elements per layer in the manual-vs-native scatter sample (fixed seed: reproducible). As
#: many as a browser without a GPU draws quickly as SVG; the per-channel maximum difference
#: next to the scatter covers *every* element anyway.
SAMPLE_POINTS = 1000
SAMPLE_SEED = 0

#: Elements stored exactly for the formula, per channel, in this order.
FORMULA_ELEMENTS = (
    "centre of image 0",
    "top-left of image 0",
    "largest input in image 0",
    "smallest input in image 0",
    "centre of the last image",
)


def frozen(a: np.ndarray) -> np.ndarray:
    """``a`` as a contiguous read-only array (view data are shared by sessions)."""
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) viewed as (N, C, H, W): 2-D inputs get H=W=1, 3-D inputs H=1,
    volumes fold depth into H. BatchNorm statistics do not depend on this layout."""
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t.reshape(t.shape[0], t.shape[1], 1, 1)
    if t.dim() == 3:
        return t.reshape(t.shape[0], t.shape[1], 1, t.shape[2])
    return t.reshape(t.shape[0], t.shape[1], -1, t.shape[-1])


def map_plane(t: torch.Tensor) -> torch.Tensor:
    """The (C, h, w) maps of image 0 that the charts show: the image itself, a sequence as
    one row (C, 1, L), a table as (C, 1, 1), and of a volume (N, C, D, H, W) its middle
    depth slice ``D // 2`` (a picture, where the folded layout of :func:`as_4d` is not)."""
    if t.dim() == 5:
        return t[0, :, t.shape[2] // 2]
    return as_4d(t)[0]


#: The quantiles a table's per-feature box plots show (whiskers at the minimum and maximum).
FEATURE_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def feature_quantiles(t: torch.Tensor | None) -> np.ndarray | None:
    """For a table (N, C): each feature's :data:`FEATURE_QUANTILES` over the batch, (C, 5),
    as ``numpy.quantile`` computes them (linear interpolation) in float64; None for any
    other shape (their values are shown as maps and histograms)."""
    if t is None or t.dim() != 2:
        return None
    values = t.detach().to(torch.float64).cpu().numpy()
    return frozen(np.quantile(values, FEATURE_QUANTILES, axis=0).T.astype(np.float32))


def grid_indices(length: int, max_points: int = MAX_GRID) -> np.ndarray:
    """Every s-th index of ``range(length)`` with s chosen so at most ``max_points`` remain."""
    step = max(1, math.ceil(length / max_points))
    return np.arange(0, length, step, dtype=np.int64)


def map_side(channels: int, budget: int = MAP_BUDGET, max_side: int = MAX_GRID) -> int:
    """Largest side a layer's maps may have: MAX_GRID, smaller when channels x side^2 >
    budget (never below 4)."""
    return int(max(4, min(max_side, math.isqrt(max(budget // max(channels, 1), 1)))))


def map_block(h: int, w: int, channels: int, budget: int = MAP_BUDGET,
              max_side: int = MAX_GRID) -> int:
    """Side f of the pixel blocks a layer's (h, w) maps are averaged over: 1 (every pixel)
    when both sides fit :func:`map_side`, else the smallest f that makes them fit."""
    side = map_side(channels, budget, max_side)
    return max(1, math.ceil(max(h, w) / side))


def block_means(t: torch.Tensor, block: int) -> np.ndarray:
    """(..., H, W) maps as a read-only float32 array: a copy of every pixel when ``block``
    is 1, else the mean of each ``block`` x ``block`` block (edge blocks average the pixels
    they have). Always a copy: a view would keep the whole activation alive."""
    t = t.detach()
    if block <= 1:
        return frozen(t.to(torch.float32, copy=True).cpu().numpy())
    lead = t.shape[:-2]
    flat = t.reshape(-1, 1, *t.shape[-2:]).to(torch.float32)
    pooled = torch.nn.functional.avg_pool2d(flat, block, block, ceil_mode=True)
    return frozen(pooled.reshape(*lead, *pooled.shape[-2:]).cpu().numpy())


def subsample_map(t: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``t[..., rows, :][..., cols]`` as a read-only float32 array (actual values, no pooling)."""
    r = torch.tensor(rows, dtype=torch.int64)
    c = torch.tensor(cols, dtype=torch.int64)
    sub = t.index_select(-2, r).index_select(-1, c)
    return frozen(sub.detach().to(torch.float32).cpu().numpy())


def histogram_positions(n: int, length: int, k: int = HIST_SAMPLE,
                        seed: int = SAMPLE_SEED) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``k`` fixed random (image, position) pairs shared by all channels of a layer, or
    None when the layer has at most ``k`` values per channel (then all are used).

    Remembered per shape, because many layers share one and drawing the permutation is not
    free (the returned tensors are shared, so never written to).
    """
    return _histogram_positions(n, length, k, seed)


@functools.lru_cache(maxsize=256)
def _histogram_positions(n: int, length: int, k: int,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    total = n * length
    if total <= k:
        return None
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randperm(total, generator=gen)[:k].sort().values
    return pos // length, pos % length


def channel_histograms(x4: torch.Tensor, bins: int = HIST_BINS,
                       positions: tuple[torch.Tensor, torch.Tensor] | None = None,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel histograms of a (N, C, H, W) tensor over common fixed bins.

    ``positions`` (from :func:`histogram_positions`) restricts the count to the same
    sampled (image, pixel) positions in every channel; without it every value counts. The
    edges span the sampled values' min..max so channels share one axis. Returns ``(edges
    (bins+1,), counts (C, bins))``. One bucketize pass and one bincount, no loop over
    channels (a 1280-channel layer would otherwise cost 1280 kernel launches).
    """
    n, c = x4.shape[:2]
    x3 = x4.detach().reshape(n, c, -1)
    if positions is None:  # every value: no copy, channels stay on dim 1
        vals, offsets_shape = x3, (1, c, 1)
    else:
        vals, offsets_shape = x3[positions[0], :, positions[1]], (1, c)  # (k, C)
    vals = vals.to(torch.float32)
    lo, hi = (float(v) for v in torch.aminmax(vals))
    if not (math.isfinite(lo) and math.isfinite(hi)):  # inf/nan (a diverged layer)
        finite = vals[torch.isfinite(vals)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        vals = vals.nan_to_num(nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    scale = bins / (hi - lo)
    # clamp to [0, bins - 0.5] then truncate: floor for these non-negative values
    idx = (vals - lo).mul_(scale).clamp_(0, bins - 0.5).to(torch.int32)
    idx += (torch.arange(c, dtype=torch.int32) * bins).view(offsets_shape)
    counts = torch.bincount(idx.reshape(-1), minlength=c * bins).view(c, bins)
    # with sampled positions a channel has at most HIST_SAMPLE values: 16 bits suffice
    small = counts.numel() == 0 or int(counts.max()) <= torch.iinfo(torch.int16).max
    dtype = torch.int16 if small else torch.int32
    return frozen(edges), frozen(counts.to(dtype).numpy())


def sample_indices(shape: Sequence[int], k: int = SAMPLE_POINTS,
                   seed: int = SAMPLE_SEED) -> np.ndarray:
    """``min(k, numel)`` distinct element indices (rows of (n, c, h, w)), fixed seed.

    Remembered per shape (read-only array): layers and configurations share shapes.
    """
    return _sample_indices(tuple(int(d) for d in shape), k, seed)


@functools.lru_cache(maxsize=256)
def _sample_indices(shape: tuple[int, ...], k: int, seed: int) -> np.ndarray:
    numel = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(numel, size=min(k, numel), replace=False))
    idx = np.stack(np.unravel_index(flat, shape), axis=1).astype(_index_dtype(shape))
    return frozen(idx)


def _index_dtype(shape: Sequence[int]) -> type:
    """The smallest integer type holding every index of ``shape`` (int16 in practice)."""
    return np.int16 if max(shape) <= np.iinfo(np.int16).max else np.int32


@dataclass(frozen=True)
class CondensedTensors:
    """The activation-sized part of a layer's view: what is read from the kept tensors
    (maps, histograms, samples, formula elements). Made apart from the statistics so it can
    be computed on another core while the forward is still running."""

    # image-0 feature maps: (C, len(rows), len(cols)); every pixel, or the means of the
    # blocks starting at rows x cols when the maps are larger than MAX_GRID
    rows: np.ndarray
    cols: np.ndarray
    map_input: np.ndarray
    map_output: np.ndarray
    map_activation: np.ndarray | None
    map_reference: np.ndarray | None  # what a reference-keeping hook saw (if overwritten)
    # per-channel histograms over hist_count sampled (image, position) pairs of all images:
    # edges (B+1,), counts (C, B)
    hist_count: int
    hist_input: tuple[np.ndarray, np.ndarray]
    hist_output: tuple[np.ndarray, np.ndarray]
    hist_activation: tuple[np.ndarray, np.ndarray] | None
    # scatter sample: indices (S, 4) and values (S,)
    sample_index: np.ndarray
    sample_input: np.ndarray
    sample_native: np.ndarray
    sample_activation: np.ndarray | None
    # exactly stored elements for the formula: (C, E, 4) indices, (C, E) values
    element_index: np.ndarray
    element_input: np.ndarray
    element_native: np.ndarray
    element_activation: np.ndarray | None
    overwritten_fraction: float  # of the BN output, as a reference-keeping hook sees it
    # a table's (N, C) per-feature quantiles over the batch (FEATURE_QUANTILES): (C, 5)
    quantiles_input: np.ndarray | None
    quantiles_output: np.ndarray | None
    quantiles_activation: np.ndarray | None


def _formula_elements(x4: torch.Tensor) -> np.ndarray:
    """(C, E, 4) indices of the elements in :data:`FORMULA_ELEMENTS`, per channel."""
    n, c, h, w = x4.shape
    flat0 = x4[0].reshape(c, -1)
    amax = flat0.argmax(dim=1).numpy()
    amin = flat0.argmin(dim=1).numpy()
    idx = np.zeros((c, len(FORMULA_ELEMENTS), 4), dtype=_index_dtype(x4.shape))
    ch = np.arange(c)
    idx[:, :, 1] = ch[:, None]
    idx[:, 0, 2:] = (h // 2, w // 2)
    idx[:, 1, 2:] = (0, 0)
    idx[:, 2, 2], idx[:, 2, 3] = amax // w, amax % w
    idx[:, 3, 2], idx[:, 3, 3] = amin // w, amin % w
    idx[:, 4, 0] = n - 1
    idx[:, 4, 2:] = (h // 2, w // 2)
    return idx


class _Picker:
    """The sampled points and the formula's elements of a layer, read from each tensor
    (input, output, activation) with one indexing op instead of one per array."""

    def __init__(self, sidx: np.ndarray, eidx: np.ndarray) -> None:
        flat = np.concatenate([sidx.astype(np.int64), eidx.reshape(-1, 4).astype(np.int64)])
        self._index = tuple(torch.from_numpy(np.ascontiguousarray(flat[:, i]))
                            for i in range(4))
        self._split = len(sidx)
        self._eshape = eidx.shape[:-1]

    def __call__(self, x4: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        vals = x4[self._index].detach().to(torch.float32).numpy()
        return (frozen(vals[:self._split]),
                frozen(vals[self._split:].reshape(self._eshape)))


def condense_tensors(input: torch.Tensor, output: torch.Tensor,
                     activation_output: torch.Tensor | None,
                     output_reference: torch.Tensor | None,
                     overwritten_by: str | None) -> CondensedTensors:
    """Read one layer's kept tensors into small arrays (the tensors are read, not kept)."""
    x4 = as_4d(input)
    y4 = as_4d(output)
    a4 = None if activation_output is None else as_4d(activation_output)
    overwritten = overwritten_by is not None and output_reference is not None
    ref4 = as_4d(output_reference) if overwritten else None
    n, channels, h, w = x4.shape
    mh, mw = map_plane(input).shape[-2:]  # a volume's maps are its middle slice
    block = map_block(mh, mw, channels)
    rows = np.arange(0, mh, block, dtype=np.int64)
    cols = np.arange(0, mw, block, dtype=np.int64)
    pos = histogram_positions(n, h * w)
    sidx = sample_indices(tuple(x4.shape))
    eidx = _formula_elements(x4)
    pick = _Picker(sidx, eidx)
    s_in, e_in = pick(x4)
    s_nat, e_nat = pick(y4)
    s_act, e_act = (None, None) if a4 is None else pick(a4)
    map_act = None if a4 is None else block_means(map_plane(activation_output), block)
    map_ref = None if ref4 is None else block_means(map_plane(output_reference), block)
    if map_ref is not None and map_act is not None and np.array_equal(map_ref, map_act):
        map_ref = map_act  # an in-place activation: what the hook sees *is* its output
    fraction = float((output != output_reference).float().mean()) if overwritten else 0.0
    return CondensedTensors(
        rows=frozen(rows), cols=frozen(cols),
        map_input=block_means(map_plane(input), block),
        map_output=block_means(map_plane(output), block),
        map_activation=map_act, map_reference=map_ref,
        hist_count=n * h * w if pos is None else len(pos[0]),
        hist_input=channel_histograms(x4, positions=pos),
        hist_output=channel_histograms(y4, positions=pos),
        hist_activation=None if a4 is None else channel_histograms(a4, positions=pos),
        sample_index=sidx, sample_input=s_in, sample_native=s_nat, sample_activation=s_act,
        element_index=frozen(eidx), element_input=e_in, element_native=e_nat,
        element_activation=e_act, overwritten_fraction=fraction,
        quantiles_input=feature_quantiles(input), quantiles_output=feature_quantiles(output),
        quantiles_activation=feature_quantiles(activation_output),
    )


def condense_layer_tensors(layer: LayerReport) -> CondensedTensors:
    """:func:`condense_tensors` of a kept :class:`LayerReport`."""
    if layer.input is None or layer.output is None:
        raise BnvizError(f"Layer {layer.name!r} was inspected without keeping tensors.",
                         "call inspect(..., keep_tensors=True) before building view data.")
    return condense_tensors(layer.input, layer.output, layer.activation_output,
                            layer.output_reference, layer.overwritten_by)
