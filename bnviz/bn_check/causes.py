"""What each diagnosis says, in plain words, and its fix.

A cause is one specific way an implementation departs from nn.BatchNorm (a key such as
``"biased_running_var"``). Its texts are format strings filled with the numbers measured for
the finding (``{used}``, ``{expected}``, ``{name}``, ...); missing numbers leave the braces'
name in place rather than failing.
"""

from __future__ import annotations

import string
from dataclasses import dataclass


@dataclass(frozen=True)
class Cause:
    formula: str  # key of bnviz.bn_check.formula.FORMULA: the line it breaks
    what: str  # what the implementation does
    fix: str


GENERIC_FIX = ("compare your forward with the formula line by line "
               "(bnviz.manual_batch_norm is that formula written out)")

CAUSES: dict[str, Cause] = {
    # building it
    "constructor_keyword": Cause(
        "constructor", "its constructor does not accept {name}, which nn.BatchNorm takes",
        "add the keyword arguments to __init__ with nn.BatchNorm's defaults: eps=1e-05, "
        "momentum=0.1, affine=True, track_running_stats=True"),
    "constructor_raises": Cause(
        "constructor", "building it as {call} raised {error}",
        "accept nn.BatchNorm's constructor arguments, or pass factory=... to check_batchnorm"),
    # its state
    "missing_parameter": Cause(
        "state", "it has no parameter named {name}, so it could not be given the native "
        "layer's {name}, and a native state_dict does not load into it",
        "register nn.Parameter {name} of shape (num_features,), or pass "
        "names={{'{name}': 'your_name'}} to check_batchnorm"),
    "missing_buffer": Cause(
        "state", "it has no buffer named {name}, so it could not be given the native layer's "
        "{name}, and a native state_dict does not load into it",
        "self.register_buffer('{name}', ...) of shape (num_features,), or pass "
        "names={{'{name}': 'your_name'}} to check_batchnorm"),
    "nbt_missing": Cause(
        "num_batches_tracked", "it has no num_batches_tracked buffer: momentum=None has no "
        "count to average with, and a native state_dict has a key it does not expect",
        "self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long)) and "
        "add 1 to it on each training forward"),
    "not_registered": Cause(
        "state", "it keeps {name} as plain tensor attributes, not as registered parameters or "
        "buffers: they are missing from state_dict() and do not follow module.to(device or "
        "dtype)",
        "make weight and bias nn.Parameter and register running statistics with "
        "self.register_buffer(...)"),
    "state_not_moved": Cause(
        "dtype", "its {name} stayed {got} after module.to({expected})",
        "register it with self.register_buffer(...) (or as nn.Parameter), so that "
        "module.to() converts it"),
    "state_shape": Cause(
        "state", "{name} has {got} elements; nn.BatchNorm has one per channel ({expected})",
        "give {name} the shape (num_features,)"),
    # forward
    "unbiased_var_in_normalisation": Cause(
        "normalise_train", "it normalises with the unbiased variance (divided by n - 1, "
        "torch.var's default) instead of the biased one",
        "use x.var(dim=..., unbiased=False); the unbiased variance only feeds running_var"),
    "eps_outside_sqrt": Cause(
        "normalise_train", "it adds eps to the standard deviation, sqrt(Var) + eps, instead "
        "of inside the square root", "divide by torch.sqrt(var + eps)"),
    "no_eps": Cause(
        "normalise_train", "it leaves eps out and divides by sqrt(Var)",
        "divide by torch.sqrt(var + eps)"),
    "running_stats_in_train": Cause(
        "normalise_train", "it normalises with running_mean and running_var in training mode; "
        "train mode uses the mean and variance of the batch itself",
        "when self.training, normalise with the batch statistics; use the running ones only "
        "in eval"),
    "batch_stats_in_eval": Cause(
        "normalise_eval", "it normalises with the batch's own statistics in eval mode instead "
        "of running_mean and running_var",
        "check self.training: in eval (with track_running_stats=True) normalise with "
        "running_mean and running_var"),
    "per_sample_stats": Cause(
        "normalise_train", "it takes each sample's statistics separately, over the spatial "
        "positions only (that is InstanceNorm)",
        "reduce over the batch dim and every spatial dim: dim=(0, 2, 3) for 2d inputs"),
    "stats_over_batch_only": Cause(
        "normalise_train", "it reduces over the batch dim only, giving each position its own "
        "statistics", "reduce over the batch dim and every spatial dim: dim=(0, 2, 3) for 2d"),
    "stats_over_channels": Cause(
        "normalise_train", "it pools all channels into one mean and one variance",
        "take one mean and one variance per channel (keep dim 1)"),
    "no_affine_applied": Cause(
        "normalise_train", "it leaves out gamma and beta",
        "multiply by weight and add bias, per channel, after normalising"),
    "gamma_beta_swapped": Cause(
        "normalise_train", "it multiplies by beta and adds gamma (weight and bias swapped)",
        "y = x_hat * weight + bias"),
    "forward_differs": Cause(
        "normalise_train", "its output differs from the native layer's by up to {rel:.2g} "
        "(relative, channel {channel}) and matches none of the usual mistakes", GENERIC_FIX),
    # running statistics
    "biased_running_var": Cause(
        "running_var", "it updates running_var with the biased variance (divided by n "
        "instead of n - 1; n = {count} here)",
        "update with Var[x] * n / (n - 1), i.e. x.var(dim=..., unbiased=True)"),
    "momentum_reversed": Cause(
        "running_mean", "its momentum convention is reversed: it keeps momentum of the old "
        "value and gives the batch 1 - momentum (weight {used:.3g} on the batch instead of "
        "{expected:.3g}), the Keras/TensorFlow convention",
        "running = (1 - momentum) * running + momentum * batch (PyTorch's momentum 0.1 is "
        "Keras' 0.9)"),
    "momentum_none_ignored": Cause(
        "momentum_none", "it does not implement momentum=None: it gave the batch the weight "
        "{used:.3g} where the cumulative average gives 1 / num_batches_tracked = "
        "{expected:.3g}",
        "if momentum is None, use 1 / num_batches_tracked (after adding 1 to it) as the "
        "factor"),
    "wrong_momentum": Cause(
        "running_mean", "it gives the batch the weight {used:.3g} in the running update "
        "instead of momentum = {expected:.3g}",
        "running = (1 - momentum) * running + momentum * batch"),
    "no_running_update": Cause(
        "running_mean", "it does not update {name} in training mode",
        "after computing the batch statistics in training mode, update the running ones in "
        "place under torch.no_grad()"),
    "replaces_running": Cause(
        "running_mean", "it overwrites {name} with the batch statistics (as if momentum=1)",
        "running = (1 - momentum) * running + momentum * batch"),
    "running_differs": Cause(
        "running_mean", "its {name} after a training step differs from the native one by up "
        "to {rel:.2g} (relative) in a way none of the usual mistakes explains",
        "running = (1 - momentum) * running + momentum * batch statistic (unbiased variance "
        "for running_var)"),
    "updates_in_eval": Cause(
        "normalise_eval", "it changes {name} in eval mode",
        "update running statistics only when self.training"),
    # num_batches_tracked
    "nbt_not_incremented": Cause(
        "num_batches_tracked", "it does not add 1 to num_batches_tracked in training mode",
        "self.num_batches_tracked += 1 on each training forward (before using it for "
        "momentum=None)"),
    "nbt_counts_eval": Cause(
        "num_batches_tracked", "it adds to num_batches_tracked in eval mode",
        "count only training forwards"),
    "nbt_wrong": Cause(
        "num_batches_tracked", "num_batches_tracked is {got} after a training step where "
        "nn.BatchNorm has {expected}", "add exactly 1 per training forward"),
    # gradients
    "detached_stats": Cause(
        "grad_input", "it treats the batch mean and variance as constants (detached, or "
        "computed under no_grad): the output matches, but the gradient to the input misses "
        "the terms through E[x] and Var[x] (docs/stories.md section 2)",
        "compute mean and var from x with autograd on: no .detach(), .item(), .data or "
        "torch.no_grad() on them (only the running-statistics update goes under no_grad)"),
    "detached_mean": Cause(
        "grad_input", "it treats the batch mean as a constant (detached): the gradient to "
        "the input misses the term through E[x]",
        "compute the mean from x with autograd on (no .detach() / no_grad)"),
    "detached_var": Cause(
        "grad_input", "it treats the batch variance as a constant (detached): the gradient "
        "to the input misses the term through Var[x]",
        "compute the variance from x with autograd on (no .detach() / no_grad)"),
    "output_detached": Cause(
        "grad_input", "its output is not connected to the autograd graph (requires_grad is "
        "False for an input that requires grad)",
        "do not compute the output under torch.no_grad() or from x.detach() / .data"),
    "no_input_grad": Cause(
        "grad_input", "no gradient reaches its input",
        "compute the output from x itself, not from a detached copy"),
    "no_param_grad": Cause(
        "grad_params", "{name} receives no gradient",
        "use the nn.Parameter {name} itself in forward (not .data or .detach())"),
    "grad_differs": Cause(
        "grad_input", "the gradient with respect to {name} differs from the native one by up "
        "to {rel:.2g} (relative, channel {channel})", GENERIC_FIX),
    # variants
    "affine_ignored": Cause(
        "affine", "it has learnable parameters ({name}) although affine=False",
        "create weight and bias only when affine is True; otherwise "
        "self.register_parameter('weight', None) and self.register_parameter('bias', None)"),
    "track_ignored_in_eval": Cause(
        "track_running_stats", "with track_running_stats=False it still normalises with "
        "running statistics in eval mode; nn.BatchNorm then uses the batch statistics",
        "when track_running_stats is False, normalise with the batch statistics in eval too"),
    "track_buffers_kept": Cause(
        "track_running_stats", "it keeps {name} although track_running_stats=False, so its "
        "state_dict has keys the native layer's has not",
        "when track_running_stats is False, self.register_buffer(name, None) for "
        "running_mean, running_var and num_batches_tracked"),
    # dtype and device
    "wrong_output_dtype": Cause(
        "dtype", "it returns {got} for {expected} input",
        "return the dtype of the input: no .float() / .double() and no tensors made with a "
        "fixed dtype"),
    "float32_precision": Cause(
        "dtype", "it computes in float32 although input and parameters are float64: its "
        "results are only float32-accurate (relative error {rel:.1e})",
        "let every tensor follow x.dtype: no .float() and no torch.tensor(..., "
        "dtype=torch.float32)"),
    "wrong_output_device": Cause(
        "device", "it returns a tensor on {got} for input on {expected}",
        "create every tensor with device=x.device (or register it as a buffer)"),
    "bad_output": Cause(
        "normalise_train", "its forward returned {got}, not a tensor of the input's shape "
        "{expected}", "return one tensor shaped like the input"),
    "raises": Cause(
        "normalise_train", "{where} raised {error}",
        "make it run as nn.BatchNorm does in that setting ({config})"),
}


class _Keep(dict):
    def __missing__(self, key):
        return "{" + key + "}"


class _Lenient(string.Formatter):
    """``str.format`` that leaves a missing field's name and ignores a format spec that
    does not fit the value (a text where a number was expected)."""

    def format_field(self, value, format_spec):
        try:
            return super().format_field(value, format_spec)
        except (ValueError, TypeError):
            return str(value)


def fill(template: str, values: dict) -> str:
    """``template`` filled with ``values``."""
    return _Lenient().vformat(template, (), _Keep(values))
