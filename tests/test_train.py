"""validate.train: schedule, augmentation, units of the step, callbacks and exact resume (CPU)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from validate import data, train

TINY = {"epochs": 2, "batch_size": 32, "subset": 128, "width": 0.125, "whiten": False,
        "crop_pad": 2, "tta": False, "eval_batch": 256}


@pytest.fixture(scope="module")
def dataset():
    return data.synthetic_cifar10(256, 64, seed=0)


def test_lr_schedule_matches_piecewise_linear_definition():
    total, peak, warm, final = 50, 0.3, 0.2, 0.1
    w = 10  # ceil(0.2 * 50)
    got = [train.lr_schedule(t, total, peak, warm, final) for t in range(total)]
    for t in range(total):
        if t < w:
            want = peak * (t + 1) / w  # linear warm-up reaching the peak at step w − 1
        else:  # straight line from (w, peak) to (total, final·peak)
            want = peak + (final * peak - peak) * (t - w) / (total - w)
        assert got[t] == pytest.approx(want, rel=1e-12)
    assert max(got) == pytest.approx(peak)
    assert all(a >= b for a, b in zip(got[w:], got[w + 1:], strict=False))
    assert train.lr_schedule(0, 10, 1.0, 0.0, 0.0) == 1.0  # no warm-up


def test_peak_lr_units():
    hyp = train.make_config("default")
    assert hyp.lr is None
    assert train.peak_lr(hyp) == pytest.approx(hyp.base_lr * hyp.lr_factor * 512)
    hyp = train.make_config("default", base_lr=1e-3, lr_factor=3.0, batch_size=100)
    assert train.peak_lr(hyp) == pytest.approx(0.3)
    assert train.peak_lr(train.make_config("default", lr=0.05)) == 0.05


def test_crop_flip_against_loops():
    g = torch.Generator().manual_seed(0)
    padded = torch.randint(0, 256, (6, 3, 12, 12), generator=g, dtype=torch.uint8)
    dy = torch.tensor([0, 4, 2, 1, 3, 4])
    dx = torch.tensor([4, 0, 2, 3, 1, 4])
    flip = torch.tensor([False, True, True, False, True, False])
    got = train.crop_flip(padded, dy, dx, flip, size=8)
    for i in range(6):
        for c in range(3):
            for r in range(8):
                for s in range(8):
                    s_src = 7 - s if flip[i] else s
                    assert got[i, c, r, s] == padded[i, c, dy[i] + r, dx[i] + s_src]


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    a = train.epoch_plan(1, 3, 100, 4, True, "cpu")
    b = train.epoch_plan(1, 3, 100, 4, True, "cpu")
    c = train.epoch_plan(1, 4, 100, 4, True, "cpu")
    assert torch.equal(a.perm, b.perm) and torch.equal(a.dx, b.dx) and torch.equal(a.flip, b.flip)
    assert not torch.equal(a.perm, c.perm)
    assert sorted(a.perm.tolist()) == list(range(100))
    assert 0 <= a.dy.min() and a.dy.max() <= 8


def test_bad_hyperparameters(dataset):
    with pytest.raises(ValueError, match="preset"):
        train.make_config("fast")
    with pytest.raises(ValueError, match="unknown setting"):
        train.make_config("quick", learning_rate=1.0)
    hyp = train.make_config("quick", batch_size=200, subset=128)
    with pytest.raises(ValueError, match=r"batch_size \(200\) is larger than the training subset"):
        train.check_config(hyp, dataset)
    for key, value in (("lr", -1.0), ("epochs", 0), ("momentum", 1.0), ("warmup", 1.5),
                       ("schedule", "cosine"), ("model", "vgg"), ("channels", (4,)),
                       ("fail_factor", 1.0), ("crop_pad", 17)):
        with pytest.raises(ValueError, match=key):
            train.make_config("quick", **{key: value})
    with pytest.raises(ValueError, match="subset"):
        train.check_config(train.make_config("quick", subset=10**6), dataset)


@pytest.mark.parametrize(("momentum", "nesterov", "factor"),
                         [(0.0, True, 1.0), (0.5, True, 1.5), (0.5, False, 1.0)])
def test_first_step_is_lr_times_mean_gradient(dataset, momentum, nesterov, factor):
    """θ₁ = θ₀ − η₀ ∇L_B(θ₀) with L_B the MEAN loss over the batch and η₀ from the base rate;
    torch-form momentum from v₀ = 0: heavy ball steps η₀g, Nesterov η₀(g + μg) = η₀(1+μ)g."""
    hyp = train.make_config("quick", **TINY, momentum=momentum, nesterov=nesterov,
                                weight_decay=0.0, label_smoothing=0.0, base_lr=1e-3,
                                lr_factor=2.0, warmup=0.5)
    snaps = {}

    def cb(state):
        if state.step in (0, 1):
            snaps[state.step] = copy.deepcopy(state.model.state_dict())
            snaps[f"lr{state.step}"] = state.lr

    train.train(hyp, dataset, callback=cb, progress=False)
    # rebuild the first batch by hand: seeded subset, epoch-0 plan, crops and flips
    n, pad = hyp.subset, hyp.crop_pad
    idx = np.sort(np.random.default_rng(hyp.seed).permutation(256)[:n])
    imgs = np.pad(dataset.train_images[idx], ((0, 0), (0, 0), (pad, pad), (pad, pad)),
                  mode="reflect")
    plan = train.epoch_plan(hyp.seed, 0, n, pad, True, "cpu")
    j = plan.perm[:32]
    x = train.normalize(train.crop_flip(torch.from_numpy(imgs)[j], plan.dy[:32], plan.dx[:32],
                                        plan.flip[:32]))
    y = torch.from_numpy(dataset.train_labels[idx])[j]
    torch.manual_seed(0)
    from validate.models import FastResNet

    model = FastResNet(10, width=0.125)
    model.load_state_dict(snaps[0])
    model.train()
    per_example = F.cross_entropy(model(x), y, reduction="none")
    assert per_example.shape == (32,)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(per_example.sum() / 32, list(params.values()))
    eta0 = 1e-3 * 2.0 * 32 * (1 / 4)  # base · factor · B, warm-up step 1 of ceil(0.5·8) = 4
    assert snaps["lr0"] == pytest.approx(eta0)
    for (name, p), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(snaps[1][name], p.detach() - factor * eta0 * g, atol=1e-6,
                                   rtol=1e-5)


def test_resume_after_interruption_reproduces_the_run(dataset, tmp_path):
    hyp = train.make_config("quick", **TINY, checkpoint_every=3)
    seen = []

    def record(state):
        seen.append(state.step)
        state.extra.setdefault("steps", []).append(state.step)

    full = train.train(hyp, dataset, callback=record, progress=False,
                       checkpoint=tmp_path / "full.pt")
    assert seen == list(range(9))  # before the first step, then after each of the 8 steps

    class Interrupt(Exception):
        pass

    def crash(state):
        record(state)
        if state.step == 5:
            raise Interrupt

    ckpt = tmp_path / "part.pt"
    with pytest.raises(Interrupt):
        train.train(hyp, dataset, callback=crash, progress=False, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["step"] == 4  # saved at step 3, then epoch end 4
    resumed = train.train(hyp, dataset, callback=record, progress=False, checkpoint=ckpt,
                          resume=True)
    sa, sb = full["model"].state_dict(), resumed["model"].state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # bitwise on CPU
    assert resumed["history"] == [{**h, "time_s": r["time_s"],
                                   "examples_per_s": r["examples_per_s"]}
                                  for h, r in zip(full["history"], resumed["history"],
                                                  strict=True)]
    assert resumed["extra"]["steps"] == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # 0–4 from the checkpoint
    assert resumed["test_acc"] == full["test_acc"]
    with pytest.raises(ValueError, match=r"different hyperparameters: seed \(0 → 1\)"):
        train.train(hyp.replace(seed=1), dataset, progress=False, checkpoint=ckpt, resume=True)


def test_resume_compares_run_info(dataset, tmp_path):
    """The caller's other settings are saved with the checkpoint; resuming with different ones,
    or from a checkpoint that does not record them, is refused naming the difference."""
    hyp = train.make_config("quick", **{**TINY, "epochs": 1})
    ckpt = tmp_path / "c.pt"
    info = {"command": "noise", "noise_config": {"points": 2, "measure_mode": "train"}}
    first = train.train(hyp, dataset, progress=False, checkpoint=ckpt, run_info=info)
    assert torch.load(ckpt, weights_only=True)["run_info"] == info
    again = train.train(hyp, dataset, progress=False, checkpoint=ckpt, resume=True,
                        run_info=copy.deepcopy(info))
    assert again["test_acc"] == first["test_acc"] and again["steps"] == first["steps"]
    other = {"command": "noise", "noise_config": {"points": 3, "measure_mode": "eval"}}
    with pytest.raises(ValueError, match=r"noise_config.measure_mode \('train' → 'eval'\); "
                                         r"noise_config.points \(2 → 3\)"):
        train.train(hyp, dataset, progress=False, checkpoint=ckpt, resume=True, run_info=other)
    with pytest.raises(ValueError, match=r"command \('noise' → 'train'\)"):
        train.train(hyp, dataset, progress=False, checkpoint=ckpt, resume=True,
                    run_info={**info, "command": "train"})
    old = torch.load(ckpt, weights_only=True)
    del old["run_info"]  # a checkpoint written before run settings were recorded
    torch.save(old, ckpt)
    with pytest.raises(ValueError, match="does not record its run settings"):
        train.train(hyp, dataset, progress=False, checkpoint=ckpt, resume=True, run_info=info)


def test_training_learns_the_synthetic_task(dataset):
    hyp = train.make_config("quick", **{**TINY, "epochs": 4, "subset": 256})
    r = train.train(hyp, dataset, progress=False)
    assert r["steps"] == 4 * 8 and len(r["history"]) == 4
    h = r["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert r["test_acc"] > 0.2  # chance is 0.1
    assert r["examples_per_s"] > 0 and r["diverged_at_step"] is None


def test_divergence_is_a_result(dataset):
    hyp = train.make_config("quick", **TINY, lr=1e6, warmup=0.0)
    r = train.train(hyp, dataset, progress=False)
    assert r["diverged_at_step"] is not None and np.isnan(r["test_acc"])


def test_callback_can_stop_a_diverged_run(dataset, tmp_path):
    """A callback that finds the model non-finite sets state.diverged: training stops at that
    step, reports it like a loss divergence, and does not checkpoint the bad weights."""
    hyp = train.make_config("quick", **TINY)
    seen = []

    def cb(state):
        seen.append(state.step)
        if state.step == 3:
            with torch.no_grad():
                next(state.model.parameters()).fill_(float("nan"))
            state.diverged = True

    ckpt = tmp_path / "c.pt"
    r = train.train(hyp.replace(checkpoint_every=1), dataset, callback=cb, progress=False,
                    checkpoint=ckpt)
    assert seen == [0, 1, 2, 3] and r["diverged_at_step"] == 3 and r["steps"] == 3
    assert np.isnan(r["test_acc"]) and np.isnan(r["test_loss"])
    assert torch.load(ckpt, weights_only=True)["step"] == 2  # the last finite one


def test_bad_seed_and_nesterov_are_rejected():
    for key, value in (("seed", -1), ("seed", 1.5), ("nesterov", "yes")):
        with pytest.raises(ValueError, match=key):
            train.make_config("quick", **{key: value})


# ---------------------------------------------------------------------------- generic data
def vector_data(n_train=256, n_test=128, seed=0):
    """A learnable 3-class Gaussian mixture of 6-feature float vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 6)) * 2.0

    def make(n):
        y = np.arange(n) % 3
        return (centres[y] + rng.standard_normal((n, 6))).astype(np.float32), y.astype(np.int64)

    (xt, yt), (xv, yv) = make(n_train), make(n_test)
    return data.ImageData(xt, yt, xv, yv, ("a", "b", "c"), "mixture", tuple(xt.mean(0)),
                          tuple(xt.std(0)))


PLAIN = {"momentum": 0.0, "weight_decay": 0.0, "label_smoothing": 0.0, "warmup": 0.0,
         "crop_pad": 0, "flip": False, "tta": False, "model": "mlp", "hidden": 8,
         "eval_batch": 64}


def test_mlp_on_vectors_learns_and_measures_its_ends_by_hand():
    d = vector_data()
    cfg = train.make_config("digits", **PLAIN, epochs=5, batch_size=16, lr=0.2,
                            schedule="constant", record_loss=True)
    r = train.train(cfg, d, progress=False)
    assert not r["failed"] and r["test_acc"] > 0.8 and r["steps"] == 5 * 16
    # the initial training loss: the same network, built from the seed, on all examples
    torch.manual_seed(0)
    from validate.models import MLP

    m0 = MLP((6,), 3, hidden=8)
    x = train.model_inputs(d.train_images, d, "cpu")
    y = torch.from_numpy(d.train_labels)
    with torch.no_grad():
        assert r["initial_train_loss"] == pytest.approx(float(F.cross_entropy(m0(x), y)),
                                                        rel=1e-6)
        # the first recorded step loss is the first shuffled batch's loss at θ₀
        j = train.epoch_plan(0, 0, 256, 0, False, "cpu").perm[:16]
        assert r["train_losses"][0] == pytest.approx(float(F.cross_entropy(m0(x[j]), y[j])),
                                                     rel=1e-6)
        m1 = r["model"]
        assert r["final_train_loss"] == pytest.approx(float(F.cross_entropy(m1(x), y)),
                                                      rel=1e-6)
    assert len(r["train_losses"]) == r["steps"]
    assert r["chance_loss"] == pytest.approx(np.log(3), rel=1e-3)  # 86/85/85 labels
    with pytest.raises(ValueError, match="need images"):
        train.check_config(cfg.replace(flip=True), d)


def test_chance_loss_is_the_best_constant_prediction():
    """H(q) equals the minimum over constant logits of the (smoothed) cross-entropy, found
    by gradient descent on the logits."""
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])

    def best_constant(eps):
        logits = torch.zeros(5, requires_grad=True)
        opt = torch.optim.LBFGS([logits], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(logits.expand(10, 5), labels, label_smoothing=eps)
            loss.backward()
            return loss

        opt.step(closure)
        return float(closure().detach())

    for eps in (0.0, 0.2):
        best = best_constant(eps)
        assert train.chance_loss(labels.numpy(), 5, eps) == pytest.approx(best, abs=1e-6)


def test_failures_are_results_with_the_step_they_happened():
    """A run that explodes stops at the first step whose minibatch loss is non-finite or above
    10× the initial loss (found here from the recorded losses of the same run without the
    check); a run that ends no better than chance is failed too."""
    d = vector_data()
    cfg = train.make_config("digits", **PLAIN, epochs=3, batch_size=16, lr=40.0,
                            schedule="constant", record_loss=True)
    r = train.train(cfg, d, progress=False)
    free = train.train(cfg.replace(fail_factor=1e300), d, progress=False)
    losses = np.array(free["train_losses"], dtype=float)
    bad = ~np.isfinite(losses) | (losses > 10 * r["initial_train_loss"])
    first = int(np.flatnonzero(bad)[0])
    assert r["failed"] and r["failed_at_step"] == first and r["diverged_at_step"] == first + 1
    assert r["train_losses"] == pytest.approx(list(losses[:first + 1]), nan_ok=True)
    assert r["failure"].startswith("non-finite" if not np.isfinite(losses[first]) else "loss above")
    assert np.isnan(r["test_loss"])
    # a run whose steps are too small to change the loss ends not below its initial loss
    still = train.train(cfg.replace(lr=1e-12), d, progress=False)
    assert still["failed"] and still["failure"] == \
        "final training loss not below the initial one" and still["failed_at_step"] == 48
    ok = train.train(cfg.replace(lr=0.2), d, progress=False)
    assert not ok["failed"] and ok["failure"] is None
