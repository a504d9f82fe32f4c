"""sgdtheory: the theory of batch size and learning rate for SGD, checked by simulation.

Conventions (docs/design.md §2; README "Units and conventions"):

* the training loss L is the *mean* of per-example losses; G = grad L, H = hess L;
* Sigma is the covariance of per-example gradients (1/N normalisation on finite data);
* ``lr`` (eta) multiplies the *mean* minibatch gradient; the base rate is eta/B;
* heavy-ball momentum is ``v <- mu v + g; theta <- theta - lr v`` (torch.optim.SGD).

The modules (loaded on first use, so ``import sgdtheory`` stays light and never imports torch
or CuPy): :mod:`~sgdtheory.theory`, :mod:`~sgdtheory.nqm` and :mod:`~sgdtheory.memory` (closed
forms), :mod:`~sgdtheory.estimators` and :mod:`~sgdtheory.krylov` (measurements),
:mod:`~sgdtheory.problems`, :mod:`~sgdtheory.optim` and :mod:`~sgdtheory.simulate` (the Monte
Carlo simulator), :mod:`~sgdtheory.backend` (NumPy, CuPy or torch arrays) and
:mod:`~sgdtheory.experiments` (the figures). The names most used are here too:

>>> import sgdtheory as sgt
>>> s = sgt.quadratic_stats([1.0, 0.1], [1.0, 0.1], [0.1, 0.01])  # diagonal H, Σ; G
>>> round(s.b_noise, 1), round(float(sgt.eps_opt(100, s.eps_max, s.b_noise)), 3)
(100.9, 0.502)
>>> res = sgt.run(sgt.NoisyQuadratic([1.0], [1.0]), lr=0.5, batch=4, steps=10, replicas=2,
...               progress=False)
>>> res.train_loss.shape
(2, 11)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_MODULES = ("backend", "estimators", "experiments", "krylov", "memory", "nqm", "optim",
            "problems", "simulate", "theory")

#: name → module of the names re-exported at the top level
_NAMES = {
    "quadratic_stats": "theory",
    "eps_opt": "theory",
    "two_batch": "estimators",
    "NoiseScaleEMA": "estimators",
    "advise_batch_size": "estimators",
    "NoisyQuadratic": "problems",
    "FiniteSumQuadratic": "problems",
    "LinearRegression": "problems",
    "LinearRegressionData": "problems",
    "LogisticRegression": "problems",
    "sgd": "optim",
    "Plan": "simulate",
    "plan": "simulate",
    "run": "simulate",
    "get_backend": "backend",
}

__all__ = ["__version__", *_MODULES, *_NAMES]


def __getattr__(name: str):
    """Import a public module, or the module of a re-exported name, on first access."""
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from . import (  # noqa: F401
        backend,
        estimators,
        experiments,
        krylov,
        memory,
        nqm,
        optim,
        problems,
        simulate,
        theory,
    )
    from .backend import get_backend  # noqa: F401
    from .estimators import NoiseScaleEMA, advise_batch_size, two_batch  # noqa: F401
    from .optim import sgd  # noqa: F401
    from .problems import (  # noqa: F401
        FiniteSumQuadratic,
        LinearRegression,
        LinearRegressionData,
        LogisticRegression,
        NoisyQuadratic,
    )
    from .simulate import Plan, plan, run  # noqa: F401
    from .theory import eps_opt, quadratic_stats  # noqa: F401
