"""Fuzz of the measurement layer of ``validate`` (``validate.measure``, ``validate.models``)
with bad input, as tests/test_fuzz_api.py does for sgdtheory (issue 13, "Hardening").

The contract: any input either gives a result with no NaN/inf outside an estimate flagged
``resolved=False`` (whose ``reason`` says why), or raises ValueError (TypeError tolerated)
whose message names the argument. Never a raw torch/NumPy error (autograd's "One of the
differentiated Tensors appears to not have been used", a shape mismatch from inside the
model), never OverflowError. None, strings, bools used as counts, floats used as counts,
complex values and NaN/inf tolerances are refused; NumPy integers are accepted wherever
ints are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import numpy as np
import pytest
import torch
from linear_models import LinearInExtra, linear_extra_loss
from torch import nn

from sgdtheory import krylov
from validate import models
from validate.measure import (
    DDPNoiseHook,
    HessianOperator,
    ModelFunction,
    distributed_gradient_noise,
    gradient_noise,
    hessian_noise,
    hessian_trace,
    hvp,
    micro_batch_gradients,
    per_sample_gradients,
    top_hessian_eigenvalue,
)

DT = torch.float64
CE = nn.CrossEntropyLoss()


def mlp(seed=0):
    """4 → 8 → 3 tanh network, 67 parameters, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def cnn(seed=0):
    """conv3×3(1→2) · ReLU · linear(32→3) on 1×4×4 images: 89 parameters, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32, 3)).to(DT)


def data(n, shape=(4,), seed=1, classes=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=g, dtype=DT),
            torch.randint(0, classes, (n,), generator=g))


MODEL = mlp()
P = sum(p.numel() for p in MODEL.parameters())
X, Y = data(8)
HX, HY = data(8, seed=2)
FN = ModelFunction(MODEL, CE)
OP = HessianOperator(MODEL, CE, X, Y)


def summed(out, t):
    return nn.functional.cross_entropy(out, t, reduction="sum")


def per_example(out, t):
    return nn.functional.cross_entropy(out, t, reduction="none")


def as_float(out, t):
    return float(nn.functional.cross_entropy(out, t))


class _Opaque:
    pass


# ------------------------------------------------------------------ wrappers


def op_call(vector):
    return OP(vector)


def op_matmat(vectors, chunk):
    return OP.matmat(vectors, chunk=chunk)


def micro_list(fn, x, y, micro_batch):
    return list(micro_batch_gradients(fn, x, y, micro_batch))


def distributed(local_grad, local_batch, global_grad):
    return distributed_gradient_noise(local_grad, local_batch, global_grad=global_grad)


GOOD = {
    gradient_noise: dict(model=MODEL, criterion=CE, inputs=X, targets=Y, method="micro_batch",
                         micro_batch=2, chunk_size=4, n_groups=4),
    hessian_noise: dict(model=MODEL, criterion=CE, inputs=X, targets=Y, micro_batch=2,
                        hessian_inputs=HX, hessian_targets=HY),
    top_hessian_eigenvalue: dict(model=MODEL, criterion=CE, inputs=X, targets=Y, k=1,
                                 method="lanczos", tol=1e-6, max_iter=20, seed=0,
                                 v0=torch.ones(P, dtype=DT), return_vector=False,
                                 stop="residual"),
    hessian_trace: dict(model=MODEL, criterion=CE, inputs=X, targets=Y, n_samples=4, seed=0,
                        method="hutchinson"),
    hvp: dict(model=MODEL, criterion=CE, inputs=X, targets=Y, vector=torch.ones(P, dtype=DT),
              method="double_backward"),
    HessianOperator: dict(model=MODEL, criterion=CE, inputs=X, targets=Y,
                          method="forward_over_reverse"),
    op_call: dict(vector=torch.ones(P, dtype=DT)),
    op_matmat: dict(vectors=torch.ones(3, P, dtype=DT), chunk=2),
    ModelFunction: dict(model=MODEL, criterion=CE),
    per_sample_gradients: dict(fn=FN, x=X, y=Y, randomness="different"),
    micro_list: dict(fn=FN, x=X, y=Y, micro_batch=2),
    models.build_model: dict(name="cnn", input_shape=(1, 8, 8), num_classes=3, width=0.125,
                             channels=(2, 2), hidden=4, whiten=False, bn_momentum=0.1),
    models.SmallCNN: dict(input_shape=(1, 8, 8), num_classes=3, channels=(2, 2)),
    models.MLP: dict(input_shape=(4,), num_classes=3, hidden=4),
    models.FastResNet: dict(num_classes=3, width=0.125, whiten=True, logit_scale=0.125,
                            bn_momentum=0.1),
    models.channels: dict(width=0.5),
    models.count_parameters: dict(model=MODEL, trainable=True),
    models.init_whitening: dict(model=models.FastResNet(3, width=0.125, whiten=True),
                                images=torch.randn(2, 3, 8, 8), eps=5e-4),
}

COUNTS = {"micro_batch", "chunk_size", "n_groups", "k", "max_iter", "n_samples", "chunk",
          "local_batch", "num_classes", "hidden"}
REALS = {"tol", "width", "bn_momentum", "logit_scale", "eps"}
FLAGS = {"return_vector", "whiten", "trainable"}
STRINGS = {"method", "stop", "randomness", "name"}
TENSORS = {"inputs", "targets", "hessian_inputs", "hessian_targets", "vector", "v0", "vectors",
           "x", "y", "images"}
#: arguments for which None is valid
OPTIONAL = {"micro_batch", "chunk_size", "hessian_inputs", "hessian_targets", "v0"}
#: arguments refused together with a partner (the message names both)
PAIRS = {"hessian_inputs": "hessian_targets", "hessian_targets": "hessian_inputs"}

BAD_COUNT = {"str": "2", "bool": True, "false": False, "float": 2.5, "float2": 2.0,
             "npfloat": np.float64(2.0), "neg": -1, "zero": 0, "nan": float("nan"),
             "inf": float("inf"), "complex": 2 + 0j, "list": [2], "object": _Opaque(),
             "npbool": np.bool_(True), "ftensor": torch.tensor(2.0)}
BAD_REAL = {"str": "0.5", "bool": True, "nan": float("nan"), "inf": float("inf"),
            "-inf": -float("inf"), "neg": -1.0, "zero": 0.0, "complex": 0.5 + 0j,
            "list": [0.5], "object": _Opaque()}
BAD_FLAG = {"str": "no", "int": 1, "none": None, "float": 0.0, "list": [True]}
BAD_STRING = {"bogus": "bogus", "int": 3, "none": None, "bool": True, "bytes": b"lanczos"}


def bad_tensors(arg, good):
    """Wrong kinds, shapes and values for a tensor argument ``good``."""
    out = {"none": None, "str": "x", "list": good.tolist(), "numpy": good.numpy(),
           "scalar": torch.tensor(1.0, dtype=DT), "complex": good.to(torch.complex128)}
    if good.is_floating_point():
        out["nan"] = torch.full_like(good, float("nan"))
        out["inf"] = torch.full_like(good, float("inf"))
    if arg in ("vector", "v0"):
        out.update(short=good[:-1], matrix=good[None], zero_len=good[:0])
    elif arg == "vectors":
        out.update(short=good[:, :-1], flat=good[0], cube=good[None])
    else:
        out.update(empty=good[:0], fewer=good[:5])
    if arg in ("inputs", "x", "hessian_inputs"):
        out["wrong_features"] = torch.ones(good.shape[0], 5, dtype=DT)
        out["no_batch_axis"] = good[0]
    if arg in ("targets", "y", "hessian_targets"):
        out["out_of_range"] = torch.full_like(good, 7)
        out["float_targets"] = good.to(DT)
        out["negative"] = torch.full_like(good, -2)
    return out


def bad_values(fn, arg, good):
    if arg in COUNTS:
        out = dict(BAD_COUNT)
        if arg in OPTIONAL:
            del out["npbool"]
        return out
    if arg in REALS:
        return dict(BAD_REAL)
    if arg in FLAGS:
        return dict(BAD_FLAG)
    if arg in STRINGS:
        return dict(BAD_STRING)
    if arg == "seed":
        return {"str": "0", "float": 0.5, "bool": True, "neg": -1, "complex": 1j,
                "object": _Opaque(), "nan": float("nan")}
    if arg in TENSORS:
        return bad_tensors(arg, good)
    if arg == "model" and fn is models.init_whitening:
        return {"none": None, "mlp": MODEL, "unwhitened": models.FastResNet(3, width=0.125)}
    if arg == "model":
        frozen = mlp()
        frozen.requires_grad_(False)
        return {"none": None, "str": "mlp", "callable": lambda x: x, "frozen": frozen,
                "object": _Opaque()}
    if arg == "criterion":
        return {"none": None, "str": "ce", "int": 3, "sum": nn.CrossEntropyLoss(reduction="sum"),
                "none_red": nn.CrossEntropyLoss(reduction="none"),
                "partial_sum": functools.partial(nn.functional.cross_entropy, reduction="sum"),
                "summed_callable": summed, "per_example": per_example, "as_float": as_float}
    if arg == "fn":
        return {"none": None, "model": MODEL, "str": "fn"}
    if arg == "input_shape":
        return {"none": None, "str": "abc", "int": 4, "neg": (-1, 8, 8) if len(good) == 3
                else (-4,), "float": tuple(v + 0.5 for v in good), "empty": (),
                "nested": ((1, 8, 8),), "bool": tuple(True for _ in good)}
    if arg == "channels":
        return {"none": None, "str": "ab", "one": (2,), "zero": (0, 2), "float": (2.5, 2),
                "bool": (True, True), "neg": (-2, 2), "int": 2}
    raise AssertionError(f"no bad values for {fn.__name__}({arg})")


# ------------------------------------------------------------------ result checks


def finite_or_flagged(out, where=""):
    """Assert ``out`` (a result, tensor, number or container) holds no NaN/inf, except the
    fields of an estimate flagged ``resolved=False`` with a reason."""
    if out is None or isinstance(out, (str, bool, int, nn.Module)):
        return
    if isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            finite_or_flagged(v, f"{where}[{i}]")
        return
    if isinstance(out, torch.Tensor):
        assert bool(torch.isfinite(out).all()), f"{where}: non-finite tensor"
        return
    if dataclasses.is_dataclass(out):
        for f in dataclasses.fields(out):
            v = getattr(out, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                assert not out.resolved and out.reason, f"{where}.{f.name}={v} unflagged"
                if not f.name.endswith("_stderr"):  # a magnitude is never nan or inf
                    assert f.name in ("b_simple", "eps_max", "b_noise"), f"{where}.{f.name}={v}"
        return
    if isinstance(out, float):
        assert math.isfinite(out), f"{where}: {out}"
        return
    assert isinstance(out, (HessianOperator, ModelFunction)), f"{where}: {type(out)}"


RAW = ("appears to not have been used", "mat1 and mat2", "shapes cannot be multiplied",
       "Expected", "expected scalar type", "out of bounds", "Traceback", "vmap")


def outcome(fn, kwargs, names):
    """'rejected' (ValueError/TypeError naming one of ``names``) or 'accepted' (NaN-free or
    flagged); anything else: a string 'FAIL: …' saying what happened."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", krylov.KrylovConvergenceWarning)
        try:
            out = fn(**kwargs)
        except (ValueError, TypeError) as exc:
            msg = str(exc)
            if not any(n in msg for n in names):
                return f"FAIL: {type(exc).__name__} not naming {names[0]}: {msg[:150]}"
            if any(r in msg.split(": ")[0] for r in RAW[:3]):
                return f"FAIL: raw error {msg[:150]}"
            return "rejected"
        except Exception as exc:  # noqa: BLE001 - the point of the test
            return f"FAIL: {type(exc).__name__}: {str(exc)[:150]}"
    try:
        finite_or_flagged(out, fn.__name__)
    except AssertionError as exc:
        return f"FAIL: {exc}"
    return "accepted"


def _cases():
    for fn, good in GOOD.items():
        for arg in good:
            yield pytest.param(fn, arg, id=f"{fn.__name__}-{arg}")


#: accepted by design: (function, argument) → labels of bad_values that are valid there
BY_DESIGN = {
    # a frozen model has parameters to count
    (models.count_parameters, "model"): {"frozen"},
    (models.init_whitening, "images"): {"fewer"},  # 2 images: enough for the covariance
    # a plain callable's reduction and output are checked on data, at the measurement
    (ModelFunction, "criterion"): {"summed_callable", "per_example", "as_float"},
    # v0 is optional; vectors given as lists or NumPy arrays of reals are converted
    **{(f, a): {"none", "list", "numpy"} for f, a in ((top_hessian_eigenvalue, "v0"),)},
    **{(f, a): {"list", "numpy"} for f, a in ((hvp, "vector"), (op_call, "vector"),
                                              (op_matmat, "vectors"))},
}


def test_good_arguments_are_accepted():
    for fn, good in GOOD.items():
        assert outcome(fn, good, list(good)) == "accepted", fn.__name__


@pytest.mark.parametrize(("fn", "arg"), list(_cases()))
def test_one_bad_argument_is_refused_by_name(fn, arg):
    good = GOOD[fn]
    names = [arg] + ([PAIRS[arg]] if arg in PAIRS else [])
    if arg in ("inputs", "targets"):
        names.append("inputs and targets")
    if arg in ("x", "y"):
        names.append("x and y")
    failures = []
    for label, value in bad_values(fn, arg, good[arg]).items():
        result = outcome(fn, {**good, arg: value}, names)
        if result.startswith("FAIL") or (result == "accepted"
                                         and label not in BY_DESIGN.get((fn, arg), ())):
            failures.append(f"{label}: {result}")
    assert not failures, f"{fn.__name__}({arg}=...):\n" + "\n".join(failures)


INT_ARGS = [(fn, arg) for fn, good in GOOD.items() for arg, v in good.items()
            if type(v) is int and arg != "seed"]


@pytest.mark.parametrize(("fn", "arg"), INT_ARGS, ids=[f"{f.__name__}-{a}" for f, a in INT_ARGS])
def test_numpy_integers_are_accepted_wherever_ints_are(fn, arg):
    good = GOOD[fn]
    want = fn(**good)
    for value in (np.int64(good[arg]), np.int32(good[arg]), np.uint8(good[arg]),
                  torch.tensor(good[arg])):
        got = fn(**{**good, arg: value})
        if isinstance(want, nn.Module):
            assert repr(got) == repr(want), f"{fn.__name__}({arg}={value!r})"
        elif isinstance(want, list):
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        elif isinstance(want, torch.Tensor):
            assert torch.equal(got, want)
        else:
            assert repr(got) == repr(want), f"{fn.__name__}({arg}={value!r})"


def test_numpy_integer_seeds_accepted():
    a = hessian_trace(MODEL, CE, X, Y, n_samples=4, seed=np.int64(3))
    assert a == hessian_trace(MODEL, CE, X, Y, n_samples=4, seed=3)
    lam = top_hessian_eigenvalue(MODEL, CE, X, Y, seed=np.int64(3), max_iter=20)
    assert lam == top_hessian_eigenvalue(MODEL, CE, X, Y, seed=3, max_iter=20)


# ------------------------------------------------------------------ scenarios


def test_distributed_checks_its_arguments_before_the_process_group():
    """Without a process group the arguments are still checked first, by name; NumPy integers
    are accepted as local_batch (they were refused as 'not a positive integer')."""
    g = torch.ones(P, dtype=DT)
    good = dict(local_grad=g, local_batch=4, global_grad=None)
    for value in (4, np.int64(4), np.int32(4)):
        with pytest.raises(ValueError, match="not initialised"):
            distributed(**{**good, "local_batch": value})
    bad = {
        "local_batch": [True, 2.5, 0, -1, "4", None, float("nan")],
        "local_grad": [None, "g", torch.full((P,), float("nan"), dtype=DT),
                       g.to(torch.complex128), torch.ones(2, P, dtype=DT), -1.0],
        "global_grad": ["g", torch.ones(P - 1, dtype=DT), torch.full((P,), math.inf, dtype=DT),
                        torch.ones(2, P, dtype=DT)],
    }
    failures = []
    for arg, values in bad.items():
        for value in values:
            result = outcome(distributed, {**good, arg: value}, [arg])
            if result != "rejected":
                failures.append(f"{arg}={value!r:.40}: {result}")
    # a squared norm needs the global gradient
    result = outcome(distributed, {**good, "local_grad": 2.0}, ["global_grad"])
    if result != "rejected":
        failures.append(f"norm without global_grad: {result}")
    assert not failures, "\n".join(failures)
    with pytest.raises(ValueError, match="recorded nothing"):
        DDPNoiseHook().pop()


def test_linear_and_unused_parameters_have_zero_second_derivative_everywhere():
    """No autograd 'appears to not have been used' error in any function or HVP method; the
    unused layer's gradient and Hessian rows are 0; H is that of brute-force autograd."""
    model = LinearInExtra(unused=True)
    x, y = data(16, seed=3)
    p = sum(v.numel() for v in model.parameters())
    flat = torch.cat([v.detach().reshape(-1) for v in model.parameters()])
    sizes = [v.numel() for v in model.parameters()]
    shapes = [v.shape for v in model.parameters()]

    def loss_of(theta):
        parts = dict(zip([k for k, _ in model.named_parameters()],
                         [c.view(s) for c, s in zip(theta.split(sizes), shapes, strict=True)],
                         strict=True))
        return linear_extra_loss(torch.func.functional_call(model, parts, (x,)), y)

    hess = torch.autograd.functional.hessian(loss_of, flat)
    v = torch.randn(p, dtype=DT, generator=torch.Generator().manual_seed(4))
    for method in ("double_backward", "forward_over_reverse"):
        got = hvp(model, linear_extra_loss, x, y, v, method=method)
        assert torch.allclose(got, hess @ v, rtol=1e-10, atol=1e-12), method
        op = HessianOperator(model, linear_extra_loss, x, y, method=method)
        assert torch.allclose(op.matmat(torch.stack([v, 2 * v])), torch.stack(
            [hess @ v, 2 * hess @ v]), rtol=1e-10, atol=1e-12), method
    for method in ("per_sample", "micro_batch"):
        est = gradient_noise(model, linear_extra_loss, x, y, method=method,
                             micro_batch=None if method == "per_sample" else 2)
        finite_or_flagged(est)
    finite_or_flagged(hessian_noise(model, linear_extra_loss, x, y, micro_batch=2))
    lam = top_hessian_eigenvalue(model, linear_extra_loss, x, y, tol=1e-10, max_iter=200)
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(hess)[-1]), rel=1e-7)
    finite_or_flagged(hessian_trace(model, linear_extra_loss, x, y, n_samples=8))
    grads = per_sample_gradients(ModelFunction(model, linear_extra_loss), x, y)
    off = sizes[0] + sizes[1] + sizes[2] + sizes[3] + sizes[4]  # net.*, extra: then unused
    assert float(grads[:, off:].abs().max()) == 0.0


def dropout_bn_model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2),
                         nn.Linear(6, 3)).to(DT)


@pytest.mark.filterwarnings("ignore::sgdtheory.krylov.KrylovConvergenceWarning")
@pytest.mark.parametrize("train", [True, False])
def test_train_and_eval_mode_measured_without_changing_the_model(train):
    model = dropout_bn_model().train(train)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data(16, seed=6)
    est = gradient_noise(model, CE, x, y)
    assert est.method == ("micro_batch" if train else "per_sample")
    finite_or_flagged(est)
    finite_or_flagged(hessian_noise(model, CE, x, y, micro_batch=2))
    assert math.isfinite(top_hessian_eigenvalue(model, CE, x, y, max_iter=10))
    finite_or_flagged(hessian_trace(model, CE, x, y, n_samples=4))
    assert model.training is train
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(("model_dtype", "data_dtype"), [(torch.float64, torch.float32),
                                                         (torch.float32, torch.float64)])
def test_inputs_of_another_dtype_are_refused_by_name(model_dtype, data_dtype):
    model = mlp().to(model_dtype)
    x, y = data(8)
    x = x.to(data_dtype)
    calls = [lambda: gradient_noise(model, CE, x, y),
             lambda: gradient_noise(model, CE, x, y, micro_batch=2),
             lambda: hessian_noise(model, CE, x, y),
             lambda: top_hessian_eigenvalue(model, CE, x, y, max_iter=5),
             lambda: hessian_trace(model, CE, x, y, n_samples=2),
             lambda: hvp(model, CE, x, y, torch.ones(P)),
             lambda: per_sample_gradients(ModelFunction(model, CE), x, y)]
    for call in calls:
        with pytest.raises(ValueError, match="inputs|x"):
            call()


def test_wrong_image_shape_for_a_cnn_is_refused_by_name():
    model = cnn()
    x, y = data(8, shape=(1, 4, 4))
    finite_or_flagged(gradient_noise(model, CE, x, y))
    finite_or_flagged(hessian_noise(model, CE, x, y, micro_batch=2))
    bad = torch.randn(8, 1, 5, 5, dtype=DT)
    for call in (lambda: gradient_noise(model, CE, bad, y),
                 lambda: gradient_noise(model, CE, bad, y, micro_batch=4),
                 lambda: hessian_noise(model, CE, x, y, hessian_inputs=bad, hessian_targets=y),
                 lambda: top_hessian_eigenvalue(model, CE, bad, y)):
        with pytest.raises(ValueError, match="inputs"):
            call()


def test_frozen_parameters_are_left_out_exactly():
    """requires_grad=False parameters are constants: per-sample gradients over the trainable
    ones equal a brute-force loop of autograd over examples."""
    model = mlp()
    model[0].weight.requires_grad_(False)
    x, y = data(6, seed=7)
    fn = ModelFunction(model, CE)
    grads = per_sample_gradients(fn, x, y)
    trainable = [v for v in model.parameters() if v.requires_grad]
    assert grads.shape == (6, sum(v.numel() for v in trainable))
    for i in range(6):
        g = torch.autograd.grad(CE(model(x[i:i + 1]), y[i:i + 1]), trainable)
        assert torch.allclose(grads[i], torch.cat([t.reshape(-1) for t in g]), atol=1e-12)
    assert model[0].weight.grad is None


def test_micro_batch_not_dividing_and_empty_batch():
    x, y = data(6)
    for call in (lambda: gradient_noise(MODEL, CE, x, y, micro_batch=4),
                 lambda: hessian_noise(MODEL, CE, x, y, hessian_inputs=x, hessian_targets=y,
                                       micro_batch=4),
                 lambda: micro_list(FN, x, y, 4)):
        with pytest.raises(ValueError, match="micro_batch"):
            call()
    for call in (lambda: gradient_noise(MODEL, CE, x[:0], y[:0]),
                 lambda: hessian_noise(MODEL, CE, x[:0], y[:0]),
                 lambda: top_hessian_eigenvalue(MODEL, CE, x[:0], y[:0]),
                 lambda: per_sample_gradients(FN, x[:0], y[:0]),
                 lambda: micro_list(FN, x[:0], y[:0], 1)):
        with pytest.raises(ValueError, match="inputs|x"):
            call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_inputs_on_another_device_are_refused_by_name():
    x, y = data(8)
    with pytest.raises(ValueError, match="inputs"):
        gradient_noise(MODEL, CE, x.cuda(), y.cuda())


# ------------------------------------------------------------------ extreme magnitudes


def scaled(c):
    def loss(out, t):
        return c * nn.functional.cross_entropy(out, t)
    return loss


def ref_data():
    """32 examples whose labels depend on x: |G|² resolved at the initial point."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(32, 4, generator=g, dtype=DT)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()


REF_X, REF_Y = ref_data()


def _refused(exc):
    msg = str(exc)
    return any(w in msg for w in ("overflow", "underflow")) and "rescale" in msg


# loss scales c per dtype: float32 only where the loss c·L itself is representable
_SCALES = [(torch.float64, c) for c in (1e-200, 1e-150, 1e-30, 1e-20, 1e20, 1e30, 1e150, 1e200)
           ] + [(torch.float32, c) for c in (1e-30, 1e-20, 1e20, 1e30)]


@pytest.mark.parametrize(("dtype", "c"), _SCALES)
@pytest.mark.parametrize("mode", ["per_sample", "micro_batch"])
def test_gradient_noise_scale_invariant_or_refused(dtype, c, mode):
    """|G|², tr(Σ) ∝ c² and B_simple invariant for the loss c·L: computed in scaled form, or
    refused with a reason (never B_simple 0 or NaN in a resolved estimate)."""
    model = mlp().to(dtype)
    x, y = REF_X.to(dtype), REF_Y
    kw = dict(method=mode, micro_batch=None if mode == "per_sample" else 2)
    ref = gradient_noise(mlp(), CE, REF_X, REF_Y, **kw)
    assert ref.resolved and ref.b_simple > 0
    try:
        est = gradient_noise(model, scaled(c), x, y, **kw)
    except ValueError as exc:
        assert _refused(exc), str(exc)
        assert c * c * ref.tr_sigma > 1e300 or c * c * ref.grad_sq < 1e-300, (
            f"refused a representable result: {exc}")
        return
    rel = 1e-9 if dtype == torch.float64 else 1e-3
    assert est.resolved, est.reason
    assert est.b_simple == pytest.approx(ref.b_simple, rel=rel * 100)
    assert est.tr_sigma == pytest.approx(c * c * ref.tr_sigma, rel=rel * 10)
    assert est.grad_sq == pytest.approx(c * c * ref.grad_sq, rel=rel * 100)


@pytest.mark.parametrize("c", [1e-120, 1e-90, 1e-20, 1e20, 1e90, 1e120])
def test_curvature_scale_invariant_or_refused(c):
    """GᵀHG ∝ c³, tr(HΣ) ∝ c³, ε_max ∝ 1/c, B_noise invariant, λ_max and tr(H) ∝ c."""
    x, y = REF_X, REF_Y
    ref = hessian_noise(mlp(), CE, x, y, micro_batch=2)
    try:
        est = hessian_noise(mlp(), scaled(c), x, y, micro_batch=2)
    except ValueError as exc:
        assert _refused(exc), str(exc)
        assert not 1e-300 < c * c * c * abs(ref.g_h_g) < 1e300 or not (
            1e-300 < c * c * ref.grad_sq < 1e300), f"refused a representable result: {exc}"
    else:
        assert est.resolved == ref.resolved
        assert est.b_noise == pytest.approx(ref.b_noise, rel=1e-8)
        assert est.b_simple == pytest.approx(ref.b_simple, rel=1e-8)
        assert est.eps_max == pytest.approx(ref.eps_max / c, rel=1e-8)
        assert est.g_h_g == pytest.approx(c * c * c * ref.g_h_g, rel=1e-8)
    lam_ref = top_hessian_eigenvalue(mlp(), CE, x, y, tol=1e-10, max_iter=100)
    tr_ref, se_ref = hessian_trace(mlp(), CE, x, y, n_samples=8)
    try:
        lam = top_hessian_eigenvalue(mlp(), scaled(c), x, y, tol=1e-10, max_iter=100)
        assert lam == pytest.approx(c * lam_ref, rel=1e-7)
        tr, se = hessian_trace(mlp(), scaled(c), x, y, n_samples=8)
        assert tr == pytest.approx(c * tr_ref, rel=1e-8)
        assert se == pytest.approx(c * se_ref, rel=1e-6)
    except ValueError as exc:
        assert _refused(exc), str(exc)


def test_batchnorm1d_eval_per_sample_gradients_match_a_loop():
    """BatchNorm1d in eval mode on (n, C) features: the hook path summed γ, β gradients over
    every axis (``sum(())``), a crash for several units and a wrong value for one."""
    model = dropout_bn_model().eval()
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x, y = data(6, seed=9)
    fn = ModelFunction(model, CE)
    params = [v for v in model.parameters()]
    from validate import _noise

    for chunk in (6, 1):  # all units in one pass, and one unit per pass
        got = torch.cat([u for _, u in _noise.unit_gradients(fn, x, y, 1, chunk_units=chunk)])
        for i in range(6):
            g = torch.autograd.grad(CE(model(x[i:i + 1]), y[i:i + 1]), params)
            assert torch.allclose(got[i], torch.cat([t.reshape(-1) for t in g]), atol=1e-12)
    assert _noise._HOOK_OK.get(model) is True  # the fast path, verified, not the vmap fallback


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SIZES = st.one_of(st.none(), st.integers(-2, 9), st.sampled_from([2.0, True, np.int64(2), "2"]))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(n=st.integers(0, 9), micro_batch=SIZES, n_groups=SIZES, chunk_size=SIZES,
       method=st.sampled_from(["auto", "per_sample", "micro_batch"]))
def test_gradient_noise_count_combinations(n, micro_batch, n_groups, chunk_size, method):
    """Any combination of batch size and counts: a named refusal or a finite (or flagged)
    result; never a raw error."""
    x, y = data(max(n, 1))
    x, y = x[:n], y[:n]
    kwargs = dict(model=MODEL, criterion=CE, inputs=x, targets=y, method=method,
                  micro_batch=micro_batch, n_groups=n_groups, chunk_size=chunk_size)
    result = outcome(gradient_noise, kwargs, ["micro_batch", "n_groups", "chunk_size",
                                              "inputs", "per-sample", "batch size"])
    assert not result.startswith("FAIL"), result


def test_probe_runs_once_per_kind_of_batch_and_targets_are_checked_every_time():
    """check_data's probe forward pass is skipped for a model and loss that already took a batch
    of the same kind (saving its cost on repeated measurements), while bad targets on that
    model are still refused by name and a new kind of batch is probed again."""
    model = mlp()
    forwards = []
    model.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    x, y = REF_X, REF_Y
    gradient_noise(model, CE, x, y, method="per_sample")
    first = list(forwards)
    forwards.clear()
    gradient_noise(model, CE, x, y, method="per_sample")
    assert 8 in first and 8 not in forwards  # the 8-example probe ran the first time only
    for bad in (torch.full_like(y, 7), torch.full_like(y, -2)):
        with pytest.raises(ValueError, match="targets: class"):
            gradient_noise(model, CE, x, bad, method="per_sample")
    ignored = y.clone()
    ignored[0] = -100  # CrossEntropyLoss's ignore_index is a valid target
    gradient_noise(model, CE, x, ignored, method="per_sample")
    with pytest.raises(ValueError, match="inputs"):  # a new kind of batch: probed, named
        gradient_noise(model, CE, x[:, :3].contiguous(), y, method="per_sample")
