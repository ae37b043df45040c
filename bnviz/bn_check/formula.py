"""The lines of the BatchNorm formula, as nn.BatchNorm1d/2d/3d compute them.

Every finding of :func:`bnviz.check_batchnorm` names the line it breaks, by its key here.
``x_hat`` is ``(x - E[x]) / sqrt(Var[x] + eps)``; ``E`` and ``Var`` are taken per channel
over the batch and every spatial position (``n`` values per channel), ``g`` is the gradient
arriving at the output ``y``.
"""

from __future__ import annotations

FORMULA: dict[str, str] = {
    "constructor": "BatchNorm(num_features, eps=1e-05, momentum=0.1, affine=True, "
                   "track_running_stats=True)",
    "state": "state_dict: weight, bias (parameters); running_mean, running_var, "
             "num_batches_tracked (buffers)",
    "normalise_train": "y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta    "
                       "(train: E, Var of this batch per channel, Var biased: divided by n)",
    "normalise_eval": "y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta    "
                      "(eval)",
    "running_mean": "running_mean = (1 - momentum) * running_mean + momentum * E[x]",
    "running_var": "running_var = (1 - momentum) * running_var + momentum * Var_unbiased[x]"
                   "    (Var_unbiased = Var[x] * n / (n - 1))",
    "momentum_none": "momentum=None: momentum = 1 / num_batches_tracked    "
                     "(cumulative average)",
    "num_batches_tracked": "num_batches_tracked += 1    "
                           "(each training forward, with track_running_stats=True)",
    "grad_input": "dL/dx = gamma / sqrt(Var[x] + eps) * (g - mean(g) - x_hat * mean(g * x_hat))"
                  "    (train: E[x] and Var[x] are functions of x)",
    "grad_params": "dL/dgamma = sum(g * x_hat),  dL/dbeta = sum(g)",
    "affine": "affine=False: y = x_hat; weight and bias are None (nothing to learn)",
    "track_running_stats": "track_running_stats=False: running_mean, running_var and "
                           "num_batches_tracked are None; batch statistics in train and eval",
    "dtype": "y.dtype == x.dtype; module.to(dtype) converts weight, bias and running buffers",
    "device": "y.device == x.device; module.to(device) moves weight, bias and running buffers",
}
