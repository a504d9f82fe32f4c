r"""Per data set: the standard training run that the sweeps vary, and how it is measured.

A :class:`Recipe` holds the data set's standard :class:`validate.train.TrainConfig` (model,
batch size B, the *standard rate* — its ``base_lr`` η̃₀, the base rate that the learning-rate
factors multiply —, momentum, schedule, epochs), the ratio of the sweeps' second batch size
(4: B and 4B), and the reference run's :class:`MeasureConfig`. The experiments' presets size
the study (grid, seeds, measurement points); the recipe says what one run is.

* ``digits`` (CPU): the small CNN (8, 16 channels, 1,898 parameters) on scikit-learn's digits,
  plain SGD (μ = 0: the regime of the exact theory of :mod:`sgdtheory.memory` and
  :func:`sgdtheory.theory.linreg_stability_limit`), B = 32, 20 epochs, a linear warm-up over
  the first 20% then linear decay to 0 (Myrtle's shape of schedule), no augmentation, weight
  decay or label smoothing. Standard rate η = 0.5 at B = 32 (η̃₀ = 1/64): the rate with the
  lowest test loss of a ×2 scan (0.125 … 4) with this recipe on the full training split, chosen
  before any experiment ran (at B = 32 the scan trained up to η = 1 and collapsed to chance at 2).
  The Hessian of the whole training split (1,437 examples) is cheap: λ_max and tr(H) are
  measured on it exactly (no sampling error), once per epoch (21 points).
* ``synthetic`` (tests): 16×16 synthetic images (:func:`validate.data.synthetic_cifar10`), the
  same CNN and recipe, fewer epochs.
* ``npz``: a user's data set: the model from its shape (CNN or MLP), otherwise as digits (the
  Hessian on at most 2,048 sampled examples, 3 batches for a standard error of λ_max).
* ``cifar10`` (GPU): the fast ResNet and the airbench-style recipe of :mod:`validate.train`
  (Nesterov μ = 0.9, label smoothing 0.2, weight decay 5e-4, crops and flips), at B = 128 and
  512 as in Myrtle's sweep, standard rate η̃₀ = 0.4/512 per example (Page's ResNet-9), 10
  epochs; measured with BatchNorm in training mode on micro-batches of 64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from validate.train import TrainConfig, make_config

__all__ = ["RECIPES", "MeasureConfig", "Recipe", "recipe_for"]


@dataclass(frozen=True)
class MeasureConfig:
    """How the reference run is measured (see :func:`validate.experiments.runs.measure_point`)."""

    points: int = 11               # measurements from step 0 to the last step, evenly spaced
    measure_batch: int = 512       # examples whose gradients are measured (with replacement)
    micro_batch: int = 16          # examples per unit of the two-batch estimators (≥ 2 with BN)
    hessian_batch: int | None = None  # examples defining Ĥ; None → the whole training subset
    hessian_reps: int = 1          # independent Hessian batches (λ_max standard error) if sampled
    top_k: int = 8                 # top Hessian eigenvalues by Lanczos (the spectrum's head)
    lanczos_iters: int = 200       # at most this many HVPs for Lanczos
    hutchinson: int = 60           # Hutch++ HVPs for tr(H)

    def __post_init__(self):
        for name in ("points", "measure_batch", "micro_batch", "hessian_reps", "top_k",
                     "lanczos_iters", "hutchinson"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name in (
                    "points", "hutchinson", "lanczos_iters") else 1):
                raise ValueError(f"measure {name} must be a positive integer (≥ 2 for points, "
                                 f"hutchinson, lanczos_iters), got {v!r}")
        if self.measure_batch % self.micro_batch or self.measure_batch // self.micro_batch < 2:
            raise ValueError(f"measure micro_batch ({self.micro_batch}) must divide "
                             f"measure_batch ({self.measure_batch}) into at least 2 parts")


@dataclass(frozen=True)
class Recipe:
    """A data set's standard run (``train``; its ``base_lr`` is the standard rate η̃₀), the
    batch ratio of the sweeps and the reference measurement settings."""

    name: str
    train: TrainConfig
    batch_ratio: int = 4
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    synthetic: tuple = (2048, 512, 16)  # synthetic data only: train, test images, size in pixels

    @property
    def batches(self) -> tuple[int, int]:
        """(B, ratio·B)."""
        return self.train.batch_size, self.train.batch_size * self.batch_ratio


_DIGITS = make_config("digits", epochs=20, batch_size=32, base_lr=0.5 / 32, lr_factor=1.0,
                      momentum=0.0, nesterov=False, weight_decay=0.0, label_smoothing=0.0,
                      schedule="linear", warmup=0.2, final_lr=0.0, model="cnn",
                      channels=(8, 16))

RECIPES = {
    "digits": Recipe("digits", _DIGITS, measure=MeasureConfig(points=21)),
    "synthetic": Recipe("synthetic", _DIGITS.replace(epochs=4),
                        measure=MeasureConfig(hessian_batch=512, hessian_reps=2)),
    "npz": Recipe("npz", _DIGITS.replace(model="auto", eval_batch=1024),
                  measure=MeasureConfig(hessian_batch=2048, hessian_reps=3)),
    "cifar10": Recipe("cifar10", make_config("default", batch_size=128, base_lr=0.4 / 512,
                                             lr_factor=1.0, tta=False),
                      measure=MeasureConfig(measure_batch=2048, micro_batch=64,
                                            hessian_batch=1024, hessian_reps=3, top_k=4,
                                            lanczos_iters=60, hutchinson=30)),
}


def recipe_for(data: str) -> Recipe:
    """The recipe of a ``--data`` value: its name, or ``npz`` for a path."""
    key = "cifar10" if data in ("cifar", "cifar10") else data
    return RECIPES.get(key, RECIPES["npz"])
