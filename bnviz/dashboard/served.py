"""The operator's model in the dashboard (``bnviz serve``, ``bnviz.serve``): the picker's
choices, the configuration and the link of a page that shows it.

The model and its input come from :func:`bnviz.models.custom.served_model` (set by whoever
started the server); a link can only pick it by its ``served:...`` name, as it picks a
registry model. With the operator's input there are no image stimulus controls: the
stimulus fields of the configuration keep their defaults (so they never split the cache),
and the link leaves them out.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import BnvizError
from ..models import list_models
from ..models.custom import ServedModel, served_model
from .config import DashConfig

#: The link parameters of the image stimulus, left out while the operator's input is shown.
STIMULUS_KEYS = ("weights", "stim", "size", "batch", "comp", "seed")


def load_served() -> tuple[ServedModel | None, str | None]:
    """``(served model or None, error message or None)``: a model the operator named that
    no longer loads is said on the page, and the registry's models still work."""
    try:
        return served_model(), None
    except BnvizError as exc:
        return None, f"The model this server was started with does not load: {exc}"


def model_choices(served: ServedModel | None) -> list[str]:
    """The model picker's options: the operator's model first, then the registry's."""
    names = list_models()
    if served is None or served.key in names:
        return names
    return [served.key, *names]


def base_config(served: ServedModel | None) -> DashConfig:
    """The configuration a page opens with before its link is read: the operator's model."""
    return DashConfig() if served is None else DashConfig(model=served.key)


def is_served(served: ServedModel | None, model: str) -> bool:
    """Whether ``model`` is the operator's own (loaded by them, not from the registry)."""
    return served is not None and not served.default_only and model == served.key


def operator_input(served: ServedModel | None, model: str) -> bool:
    """Whether the page shows the operator's input (not the image stimuli) for ``model``."""
    return is_served(served, model) and served.operator_input


def served_config(cfg: DashConfig, served: ServedModel | None) -> DashConfig:
    """``cfg`` as the operator's model is run: never "random init" (its weights are what
    the operator gave), and with their input the stimulus fields at their defaults."""
    if not is_served(served, cfg.model):
        return cfg
    cfg = replace(cfg, random_init=False)
    if not served.operator_input:
        return cfg
    plain = DashConfig()
    return replace(cfg, stimulus=plain.stimulus, params=plain.params, upload="",
                   size=plain.size, batch_size=served.batch_size,
                   composition=plain.composition, seed=plain.seed)


def served_query(query: dict[str, str], served: ServedModel | None,
                 model: str) -> dict[str, str]:
    """The link of a page: without the stimulus parameters while it shows the operator's
    input (they mean nothing there)."""
    if not operator_input(served, model):
        return query
    return {k: v for k, v in query.items() if k not in STIMULUS_KEYS}


def input_caption(served: ServedModel) -> str:
    """The sidebar's sentence on the operator's input."""
    n = len(served.inputs or ())
    what = "its input" if n == 1 else f"its {n} inputs (passed as model(*inputs))"
    return (f"Input: {served.input_text}. Whoever started this server chose {what}; the "
            "image stimulus controls do not apply.")
