"""The fingerprint of a caller's model: a pooled private copy is reused only while it is
unchanged (:mod:`bnviz.inspection.copies`).

Taken on every inspection, so it walks the module tree once and compares attribute values
through cached getters instead of a Python loop over every value.
"""

from __future__ import annotations

import threading
from operator import itemgetter

import torch

from ..norms import norm_layers


def _scan(model: torch.nn.Module) -> tuple[tuple, list[str]]:
    """One walk over the module tree: a cheap fingerprint and the BN layer names.

    The fingerprint covers structure (modules, their types and child names), parameter
    storage/versions, which buffers each module has, and each module's attributes
    (:func:`_attributes`). A pooled copy is reused only while it is unchanged: a replaced or
    renamed submodule, a re-assigned parameter, ``model.to(...)``, an in-place weight edit
    (``_version``), a registered or removed buffer, or a changed attribute
    (``relu.inplace = False``, ``googlenet.transform_input = True``) all force a fresh
    copy. What no fingerprint sees is read again on every reuse: buffer values, and the
    values of parameters held as device copies (:func:`_reset_copy`).

    The walk visits modules in ``named_modules()`` order (pre-order, each module once)
    without building every qualified name; the BN layers' names come from
    ``named_modules()`` once per structure (:data:`_NAMES`).
    """
    modules = []
    layout = []
    attributes = []
    params = []
    buffers = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        key = id(m)
        if key in seen:  # a module reachable twice is listed once, where first met
            continue
        seen.add(key)
        modules.append(key)
        children = m._modules
        layout.append((type(m), tuple(children)))
        attributes.append(_attributes(m))
        for p in m._parameters.values():
            if p is not None:
                params.append((id(p), p.data_ptr(), p._version))
        if m._buffers:
            buffers.append((key, tuple(m._buffers)))
        if children:
            stack.extend(reversed([c for c in children.values() if c is not None]))
    structure = (tuple(modules), tuple(layout))
    names = _NAMES.get(structure)
    if names is None:
        names = [n for n, _ in norm_layers(model)]
        with _NAMES_LOCK:
            if len(_NAMES) >= 64:
                _NAMES.pop(next(iter(_NAMES)))
            _NAMES[structure] = names
    return (*structure, tuple(params), tuple(buffers), tuple(attributes)), list(names)


#: Attribute values a module's forward may read and a caller may set at any time
#: (``relu.inplace``, ``googlenet.transform_input``, ``bn.eps``): compared by value.
_BY_VALUE = frozenset({bool, int, float, str, tuple, type(None), torch.dtype, torch.device})
#: What every ``nn.Module`` keeps in its ``__dict__``: parameters, buffers and submodules are
#: fingerprinted on their own, hooks never reach the private copy, and the training flag is
#: set anew by every inspection.
_STANDARD = frozenset(torch.nn.Module().__dict__)
#: id(module) -> (len(__dict__), a getter for its own attributes' values, whether one of
#: them is not a plain value, the module's type). The getter is an ``itemgetter``: a
#: fingerprint is taken on every inspection, and a Python loop over every value is slow.
_ATTR_KEYS: dict[int, tuple] = {}


def _attributes(module: torch.nn.Module) -> tuple:
    """The module's own attributes for :func:`_scan`'s fingerprint: plain values (and
    tuples) by value; functions, tensors and other objects set on it by identity (a
    tensor with its version), so the fingerprint holds no reference to them."""
    state = module.__dict__
    entry = _ATTR_KEYS.get(id(module))
    try:
        if entry is None or entry[0] != len(state) or entry[3] is not type(module):
            raise KeyError
        values = entry[1](state)
    except KeyError:  # new, changed, or another module at a freed module's address
        keys = tuple(k for k in state if k not in _STANDARD)
        getter = itemgetter(*keys) if len(keys) > 1 else (lambda d, k=keys: tuple(map(
            d.__getitem__, k)))
        values = getter(state)
        if len(_ATTR_KEYS) >= 100_000:
            _ATTR_KEYS.clear()
        entry = (len(state), getter, not _BY_VALUE.issuperset(map(type, values)),
                 type(module))
        _ATTR_KEYS[id(module)] = entry
    if not entry[2]:
        # Plain when first seen; one that became an object later is kept as it is (and
        # compared with ==, falling back to "changed" where that cannot say: _same).
        return values
    return tuple(v if type(v) in _BY_VALUE
                 else (id(v), v.data_ptr(), v._version) if type(v) is torch.Tensor else id(v)
                 for v in values)


#: BN layer names per module structure (ids, types and child names, which determine them):
#: ``named_modules()`` builds a qualified name for every module, a third of a scan's cost.
_NAMES: dict[tuple, list[str]] = {}
_NAMES_LOCK = threading.Lock()


def _same(a: tuple, b: tuple) -> bool:
    """Fingerprints compared; an attribute whose ``==`` cannot say (a tuple holding a
    tensor, say) counts as changed."""
    try:
        return bool(a == b)
    except (RuntimeError, ValueError, TypeError):
        return False
