"""Check your own BatchNorm implementation against the native layer.

    >>> import bnviz
    >>> report = bnviz.check_batchnorm(MyBN)          # a class, a factory or an instance
    >>> report.ok, report.causes
    >>> print(report)                                # the findings in plain words

Modules: :mod:`.formula` (the lines of the BatchNorm formula a finding names),
:mod:`.causes` (each diagnosis in words, with its fix), :mod:`.hypotheses` (the correct
formula and the usual mistakes, in float64), :mod:`.candidate` (building the implementation
and the naming convention for its state), :mod:`.probes` (one setting, side by side with the
native layer), :mod:`.findings` (the records), :mod:`.check` (``check_batchnorm``),
:mod:`.loading` (``pkg.module:Name`` specs) and :mod:`.cli` (``bnviz check-bn``).
See docs/check_batchnorm.md.
"""

from .check import check_batchnorm
from .findings import CHECKS, CheckReport, Finding
from .formula import FORMULA

__all__ = ["CHECKS", "FORMULA", "CheckReport", "Finding", "check_batchnorm"]
