"""The input normalisation each model expects, as an explicit object a UI can show."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BnvizError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Normalisation the model expects, applied explicitly to raw images in [0,1].

    bnviz keeps stimuli in raw [0,1] pixel space (that is what a user looks at and what the
    image generators produce) and normalises them in one visible step, because getting this
    step wrong is the most common silent failure with pretrained models: the network still
    runs, BatchNorm batch statistics look plausible, but predictions are garbage. Making the
    normalisation an explicit object with a human ``description`` lets the dashboard show it.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    description: str
    #: pass the input through unchanged, whatever its shape and dtype (a wrapped module
    #: takes exactly what it would take on its own)
    identity: bool = False

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 3 or x.shape[-3] != 3:
            raise BnvizError(
                f"This model's preprocessing ({self.description}) needs an image tensor "
                f"shaped (N, 3, H, W) or (3, H, W), got {tuple(x.shape)}.",
                "pass RGB images in [0, 1] (bnviz.make_stimulus), or wrap your module with "
                "bnviz.models.from_module(module) without preprocess to feed any tensor.",
            )
        if not x.is_floating_point():
            raise BnvizError(
                f"This model's preprocessing needs a float image in [0, 1], got dtype "
                f"{x.dtype}.", "divide uint8 images by 255.")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return mean, std

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        """``(raw - mean[c]) / std[c]`` as float32, same device and shape as ``raw``
        (``raw`` itself for an identity preprocessing)."""
        if self.identity:
            return raw
        mean, std = self._stats(raw)
        return (raw.to(torch.float32) - mean) / std

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Map a normalised tensor back to [0,1] pixel space (for previews).

        Not clamped, so ``invert(p(raw))`` round-trips; clamp when displaying.
        """
        if self.identity:
            return x
        mean, std = self._stats(x)
        return x.to(torch.float32) * std + mean


def _identity_preprocessing() -> Preprocessing:
    return Preprocessing(
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        input_size=224,
        description="identity: the input is passed unchanged (custom module)",
        identity=True,
    )


def _lite_preprocessing() -> Preprocessing:
    return Preprocessing(
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
        input_size=224,
        description=(
            "(x*255 - 127) / 128: pixels mapped to about [-1, 1], EfficientNet-Lite's own "
            "convention (not ImageNet mean/std)"
        ),
    )


def _torchvision_preprocessing(enum: Any) -> Preprocessing:
    transform = enum.transforms()
    mean = tuple(float(v) for v in getattr(transform, "mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in getattr(transform, "std", IMAGENET_STD))
    crop = int(getattr(transform, "crop_size", [224])[0])
    resize = getattr(transform, "resize_size", None)
    ref = f"; reference eval transform: resize {resize[0]} + center crop {crop}" if resize else ""
    fmt = ", ".join
    return Preprocessing(
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        input_size=crop,
        description=(
            f"(x - mean) / std with ImageNet mean=({fmt(f'{m:.3f}' for m in mean)}), "
            f"std=({fmt(f'{s:.3f}' for s in std)}){ref}"
        ),
    )
