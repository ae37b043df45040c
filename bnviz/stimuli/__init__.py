"""Input images ("stimuli") to push through a network while its BatchNorm layers are inspected.

A BatchNorm layer in ``train()`` mode normalises every channel with the mean and variance
computed over the *whole batch* (and all spatial positions), not with its running
statistics. What the layer does to one image therefore depends on which other images share
its batch, so a stimulus here is a whole batch, and *how the batch is composed* is a
first-class choice:

``copies``
    ``batch_size`` identical copies of one image. The batch statistics equal that single
    image's own statistics, so the batch size alone changes nothing except the
    biased/unbiased variance factor. A batch of one uniform image has zero variance in
    every channel, which is exactly the degenerate case BatchNorm handles worst.
``different``
    ``batch_size`` different images of the same kind (see :func:`make_stimulus` for what
    "different" means per kind). The statistics now mix images, so each image's output in
    train mode depends on its batch-mates.
``jitter``
    the first image unchanged, the others slightly shifted, flipped and brightness-scaled
    copies of it: a batch that is *almost* ``copies``, to see how sensitive the
    normalisation is to small perturbations.

Whatever the composition, image 0 of the batch is always the requested stimulus itself, so
comparisons between compositions look at the same image. Every tensor returned here holds
*raw* pixel values in ``[0, 1]`` (float32, CPU, shape ``(batch, 3, size, size)``); the
model's ImageNet normalisation is applied elsewhere, because a "uniform image of ones" is
meant in pixel space.

Everything a user can get wrong (unknown kind, bad parameter, unreadable or oversized image
file) raises :class:`~bnviz.errors.StimulusError` naming the problem and the fix.

Layout: :mod:`.params` (kinds, limits, parameter checks), :mod:`.generators` (synthetic
images), :mod:`.photos` (bundled photographs), :mod:`.files` (user image files),
:mod:`.pixels` (PIL to tensor), :mod:`.batch` (:func:`make_stimulus`) and :mod:`.spec`
(spec strings and labels). The image-file caps re-exported here are read from
:mod:`.files` whenever a file is checked, so that is where to change them.
"""

from __future__ import annotations

from .batch import batch_of_image, make_stimulus
from .files import IMAGE_EXTENSIONS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, load_image
from .params import (
    COMPOSITIONS,
    DEFAULT_PARAMS,
    MAX_BATCH_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    STIMULUS_KINDS,
)
from .params import MAX_SEED as MAX_SEED
from .photos import PHOTOS
from .spec import describe_stimulus, make_stimulus_from_spec, parse_stimulus_spec

__all__ = [
    "COMPOSITIONS",
    "DEFAULT_PARAMS",
    "IMAGE_EXTENSIONS",
    "MAX_BATCH_SIZE",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_SIZE",
    "MIN_SIZE",
    "PHOTOS",
    "STIMULUS_KINDS",
    "batch_of_image",
    "describe_stimulus",
    "load_image",
    "make_stimulus",
    "make_stimulus_from_spec",
    "parse_stimulus_spec",
]
