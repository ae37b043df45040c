"""BatchNorm implementations for the tests of ``bnviz.check_batchnorm`` and ``bnviz
check-bn``: one correct, and each of the others wrong in one classic way (its docstring
says how). ``bnviz check-bn tests.bn_impls:BiasedVar`` runs from the repository root.
"""

from __future__ import annotations

import torch
from torch import nn


class CorrectBN(nn.Module):
    """nn.BatchNorm1d/2d/3d written out: no findings."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def batch_stats(self, x):
        """Mean, biased variance and values per channel, with autograd on."""
        dims = [0, *range(2, x.dim())]
        return x.mean(dim=dims), x.var(dim=dims, unbiased=False), x.numel() // x.shape[1]

    def factor(self):
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def update(self, mean, var, count):
        with torch.no_grad():
            self.num_batches_tracked += 1
            f = self.factor()
            self.running_mean.mul_(1 - f).add_(f * mean)
            self.running_var.mul_(1 - f).add_(f * var * count / (count - 1))

    def normalise(self, x, mean, var):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def forward(self, x):
        if self.training or not self.track_running_stats:
            mean, var, count = self.batch_stats(x)
            if self.training and self.track_running_stats:
                self.update(mean.detach(), var.detach(), count)
        else:
            mean, var = self.running_mean, self.running_var
        return self.normalise(x, mean, var)


class OnePassVar(CorrectBN):
    """Also correct: E[x^2] - E[x]^2 in one pass, rsqrt, and torch.var_mean for the update."""

    def batch_stats(self, x):
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims)
        return mean, (x * x).mean(dim=dims) - mean * mean, x.numel() // x.shape[1]

    def update(self, mean, var, count):
        super().update(mean, var, count)

    def normalise(self, x, mean, var):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))
        return y


def make_correct(num_features, **kwargs):
    """A factory with nn.BatchNorm's signature."""
    return CorrectBN(num_features, **kwargs)


class BiasedVar(CorrectBN):
    """Updates running_var with the biased variance."""

    def update(self, mean, var, count):
        super().update(mean, var * (count - 1) / count, count)


class MomentumReversed(CorrectBN):
    """running = momentum * running + (1 - momentum) * batch (the Keras convention)."""

    def factor(self):
        return 1 - super().factor()


class EpsOutsideSqrt(CorrectBN):
    """Divides by sqrt(var) + eps."""

    def normalise(self, x, mean, var):
        return super().normalise(x, mean, (torch.sqrt(var) + self.eps) ** 2 - self.eps)


class UnbiasedNormalise(CorrectBN):
    """Normalises with x.var() (unbiased)."""

    def batch_stats(self, x):
        mean, var, count = super().batch_stats(x)
        return mean, var * count / (count - 1), count

    def update(self, mean, var, count):  # its running update stays right
        super().update(mean, var * (count - 1) / count, count)


class DetachedStats(CorrectBN):
    """Computes the batch mean and variance from x.detach(): same output, wrong gradient
    (docs/stories.md section 2)."""

    def batch_stats(self, x):
        return super().batch_stats(x.detach())


class RunningStatsInTrain(CorrectBN):
    """Updates the running statistics, then normalises with them in training mode too."""

    def forward(self, x):
        if self.training and self.track_running_stats:
            self.update(*[t.detach() if torch.is_tensor(t) else t
                          for t in self.batch_stats(x)])
            return self.normalise(x, self.running_mean, self.running_var)
        return super().forward(x)


class BatchStatsInEval(CorrectBN):
    """Ignores eval mode: always normalises with the batch statistics."""

    def forward(self, x):
        mean, var, count = self.batch_stats(x)
        if self.training and self.track_running_stats:
            self.update(mean.detach(), var.detach(), count)
        return self.normalise(x, mean, var)


class NoBatchCount(CorrectBN):
    """Forgets num_batches_tracked, and with it momentum=None (uses 0.1 instead)."""

    def __init__(self, num_features, **kwargs):
        super().__init__(num_features, **kwargs)
        if self.track_running_stats:
            del self.num_batches_tracked
            self.register_buffer("num_batches_tracked", None)

    def factor(self):
        return 0.1 if self.momentum is None else self.momentum

    def update(self, mean, var, count):
        with torch.no_grad():
            f = self.factor()
            self.running_mean.mul_(1 - f).add_(f * mean)
            self.running_var.mul_(1 - f).add_(f * var * count / (count - 1))


class IgnoresAffine(CorrectBN):
    """Always has a learnable weight and bias."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True):
        super().__init__(num_features, eps, momentum, True, track_running_stats)


class IgnoresTrackRunningStats(CorrectBN):
    """Always keeps running statistics, and normalises with them in eval."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True):
        super().__init__(num_features, eps, momentum, affine, True)


class WrongDtype(CorrectBN):
    """Returns float32 whatever the input's dtype."""

    def forward(self, x):
        return super().forward(x).float()


class Float32Inside(CorrectBN):
    """Computes in float32, returns the input's dtype."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class PlainAttributes(CorrectBN):
    """Keeps the running statistics as plain tensor attributes, not buffers."""

    def __init__(self, num_features, **kwargs):
        super().__init__(num_features, **kwargs)
        if self.track_running_stats:
            mean, var = self.running_mean, self.running_var
            del self.running_mean, self.running_var
            self.running_mean, self.running_var = mean, var


class GammaBeta(CorrectBN):
    """Correct, with its parameters named gamma and beta (found by alias)."""

    def __init__(self, num_features, **kwargs):
        super().__init__(num_features, **kwargs)
        if self.affine:
            self.gamma, self.beta = self.weight, self.bias
            del self.weight, self.bias
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def normalise(self, x, mean, var):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.gamma.view(shape) + self.beta.view(shape)
        return y


class ScaleShift(GammaBeta):
    """Correct, with its parameters named scale and shift: needs
    names={"weight": "scale", "bias": "shift"}."""

    def __init__(self, num_features, **kwargs):
        super().__init__(num_features, **kwargs)
        if self.affine:
            self.scale, self.shift = self.gamma, self.beta
            del self.gamma, self.beta

    def normalise(self, x, mean, var):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.scale.view(shape) + self.shift.view(shape)
        return y


class OnlyChannels(CorrectBN):
    """Correct arithmetic, but its constructor takes num_features alone."""

    def __init__(self, num_features):
        super().__init__(num_features)


class WeightAlwaysUsed(CorrectBN):
    """Multiplies by self.weight even when affine=False (weight is None there)."""

    def normalise(self, x, mean, var):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


class ReturnsTuple(CorrectBN):
    """Returns (y, mean) instead of y."""

    def forward(self, x):
        return super().forward(x), None


class OnesOnCpu(CorrectBN):
    """Correct on the CPU; on CUDA it mixes in a tensor made without device=."""

    def forward(self, x):
        return super().forward(x) * torch.ones(x.shape[1]).view((1, -1) + (1,) * (x.dim() - 2))


class NativeSubclass1d(nn.BatchNorm1d):
    """The native layer itself, subclassed: no findings, 1d inferred."""


NOT_A_CLASS = 42


# ---- more single mistakes, each with its own diagnosis --------------------------------------


class PerSampleStats(CorrectBN):
    """Takes each sample's statistics over its spatial positions (InstanceNorm)."""

    def forward(self, x):
        if not (self.training or not self.track_running_stats):
            return super().forward(x)
        if self.training and self.track_running_stats:
            self.update(*[t.detach() if torch.is_tensor(t) else t for t in self.batch_stats(x)])
        dims = list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class StatsOverChannels(PerSampleStats):
    """Pools every channel into one mean and variance (LayerNorm-like)."""

    def forward(self, x):
        if not (self.training or not self.track_running_stats):
            return CorrectBN.forward(self, x)
        if self.training and self.track_running_stats:
            self.update(*[t.detach() if torch.is_tensor(t) else t for t in self.batch_stats(x)])
        y = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class NoEps(CorrectBN):
    """Divides by sqrt(var), without eps."""

    def normalise(self, x, mean, var):
        eps, self.eps = self.eps, 0.0
        try:
            return super().normalise(x, mean, var)
        finally:
            self.eps = eps


class NoAffineApplied(CorrectBN):
    """Has weight and bias but never applies them."""

    def normalise(self, x, mean, var):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)


class GammaBetaSwapped(CorrectBN):
    """y = x_hat * bias + weight."""

    def normalise(self, x, mean, var):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.bias.view(shape) + self.weight.view(shape) if self.affine else y


class DetachedMean(CorrectBN):
    """Detaches the batch mean only."""

    def batch_stats(self, x):
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims).detach()
        var = ((x - mean.view((1, -1) + (1,) * (x.dim() - 2))) ** 2).mean(dim=dims)
        return mean, var, x.numel() // x.shape[1]


class NoGradWeight(CorrectBN):
    """Uses weight.detach(): the weight never learns."""

    def normalise(self, x, mean, var):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.detach().view(shape) + self.bias.view(shape) if self.affine else y


class OutputDetached(CorrectBN):
    """Returns its output detached from the graph."""

    def forward(self, x):
        return super().forward(x).detach()


class NoRunningUpdate(CorrectBN):
    """Counts the batch but never updates running_mean / running_var."""

    def update(self, mean, var, count):
        with torch.no_grad():
            self.num_batches_tracked += 1


class FixedMomentum(CorrectBN):
    """Updates with a fixed 0.01 whatever momentum it was given."""

    def factor(self):
        return 0.01


class ReplacesRunning(CorrectBN):
    """Overwrites the running statistics with the batch's (momentum 1)."""

    def factor(self):
        return 1.0


class UpdatesInEval(CorrectBN):
    """Also updates the running statistics (and the count) in eval mode."""

    def forward(self, x):
        if self.training or not self.track_running_stats:
            return super().forward(x)
        mean, var = self.running_mean.clone(), self.running_var.clone()
        self.update(*[t.detach() if torch.is_tensor(t) else t for t in self.batch_stats(x)])
        return self.normalise(x, mean, var)


class NbtNotIncremented(CorrectBN):
    """Never adds to num_batches_tracked (reads it as if it had)."""

    def factor(self):
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked + 1)
        return self.momentum

    def update(self, mean, var, count):
        with torch.no_grad():
            f = self.factor()
            self.running_mean.mul_(1 - f).add_(f * mean)
            self.running_var.mul_(1 - f).add_(f * var * count / (count - 1))


class OwnBufferNames(CorrectBN):
    """Correct, with its running statistics named avg_mean / avg_var."""

    def __init__(self, num_features, **kwargs):
        super().__init__(num_features, **kwargs)
        if self.track_running_stats:
            self.register_buffer("avg_mean", self.running_mean)
            self.register_buffer("avg_var", self.running_var)
            del self.running_mean, self.running_var
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)

    def update(self, mean, var, count):
        with torch.no_grad():
            self.num_batches_tracked += 1
            f = self.factor()
            self.avg_mean.mul_(1 - f).add_(f * mean)
            self.avg_var.mul_(1 - f).add_(f * var * count / (count - 1))

    def forward(self, x):
        if self.training or not self.track_running_stats:
            return super().forward(x)
        return self.normalise(x, self.avg_mean, self.avg_var)
