"""BatchNorm layers whose own forward also applies an activation (timm's ``BatchNormAct2d``
and ``SyncBatchNormAct``): where their normalised output is measured.

Such a layer runs ``F.batch_norm``, then its ``drop`` module, then its ``act`` module, and
returns the activation's output, usually written in place over the normalised values. Its
"BN output" is therefore the input of ``drop`` (or of ``act``): that is what the manual
formula is compared with and what the report keeps as ``output``; the activation's output
is kept separately as ``activation_output``. Both children are wrapped on the private copy
only (instance ``forward``, like the layer itself), so the model's own forward still runs
exactly as written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from torch.nn.modules.batchnorm import _BatchNorm

    from .copies import _CopyInfo

#: the child modules timm's norm-act layers apply after normalising, in call order
_AFTER_NORM = ("drop", "act")


def after_norm(module: nn.Module) -> tuple[nn.Module, ...]:
    """The children ``module``'s forward applies to its normalised output (timm's ``drop``
    and ``act``, less those that are ``nn.Identity``), or ``()`` for a layer whose output is
    the normalised value itself (plain BatchNorm, or a norm-act layer without either)."""
    children = module._modules
    return tuple(c for key in _AFTER_NORM
                 if isinstance(c := children.get(key), nn.Module)
                 and not isinstance(c, nn.Identity))


def activation_module(module: nn.Module) -> nn.Module | None:
    """The activation ``module`` applies inside its own forward, or None."""
    act = module._modules.get("act")
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        return act
    return None


def fused_activation(module: nn.Module) -> str | None:
    """The class name of the activation ``module`` applies itself (``"SiLU"``), or None."""
    act = activation_module(module)
    return None if act is None else type(act).__name__


def set_children_training(module: nn.Module, flags: list[tuple[nn.Module, bool]]) -> None:
    """Give ``module``'s children back the training flags in ``flags``: a BN mode is the
    layer's own (``nn.Module.train`` would switch its dropout child too)."""
    for child, flag in flags:
        child.__dict__["training"] = flag


def install(info: _CopyInfo, module: _BatchNorm, native: Any,
            children: tuple[nn.Module, ...]) -> None:
    """Wrap ``module`` (a norm-act layer) and its ``children`` on the private copy.

    The layer's session steps run as for plain BatchNorm, except that the call is measured
    when the first child receives the normalised value, before the activation can overwrite
    it; the activation's output is then handed to the session. If no child runs (a subclass
    that skips them), the layer's output is measured as usual.
    """
    act = activation_module(module)
    #: the call being measured: its key and the layer's arguments, until a child takes it
    open_call: list[tuple[str, tuple]] = []
    act_key: list[str] = []

    def measure(value: Any) -> None:
        if open_call:
            key, args = open_call.pop()
            info.session.after_call(key, module, args, value)  # type: ignore[union-attr]

    def forward(*args, **kwargs):
        session = info.session
        if session is None:
            return native(*args, **kwargs)
        key = session.before_call(module)
        open_call[:] = [(key, args)]
        act_key[:] = [key]
        try:
            output = native(*args, **kwargs)
            measure(output)
        finally:
            open_call.clear()
            act_key.clear()
        return output

    module.__dict__["forward"] = forward
    for child in children:
        _wrap_child(info, child, measure, act_key if child is act else None)


def _wrap_child(info: _CopyInfo, child: nn.Module, measure: Any,
                act_key: list[str] | None) -> None:
    child_native = child.forward

    def child_forward(*args, **kwargs):
        if info.session is None or not args:
            return child_native(*args, **kwargs)
        measure(args[0])
        out = child_native(*args, **kwargs)
        if act_key:
            info.session.activated(act_key.pop(), child, args[0], out)
        return out

    child.__dict__["forward"] = child_forward
