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
    hyp = train.hyperparameters("default")
    assert hyp["lr"] is None
    assert train.peak_lr(hyp) == pytest.approx(hyp["base_lr"] * hyp["lr_factor"] * 512)
    hyp = train.hyperparameters("default", base_lr=1e-3, lr_factor=3.0, batch_size=100)
    assert train.peak_lr(hyp) == pytest.approx(0.3)
    assert train.peak_lr(train.hyperparameters("default", lr=0.05)) == 0.05


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


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="preset"):
        train.hyperparameters("fast")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        train.hyperparameters("quick", learning_rate=1.0)
    hyp = train.hyperparameters("quick", batch_size=2000)
    with pytest.raises(ValueError, match=r"batch_size \(2000\) is larger than the training subset"):
        train.check_hyperparameters(hyp, 5000)
    for key, value in (("lr", -1.0), ("epochs", 0), ("momentum", 1.0), ("warmup", 1.5)):
        with pytest.raises(ValueError, match=key):
            train.check_hyperparameters(train.hyperparameters("quick", **{key: value}), 5000)
    with pytest.raises(ValueError, match="subset"):
        train.check_hyperparameters(train.hyperparameters("quick", subset=10**6), 5000)


@pytest.mark.parametrize(("momentum", "nesterov", "factor"),
                         [(0.0, True, 1.0), (0.5, True, 1.5), (0.5, False, 1.0)])
def test_first_step_is_lr_times_mean_gradient(dataset, momentum, nesterov, factor):
    """θ₁ = θ₀ − η₀ ∇L_B(θ₀) with L_B the MEAN loss over the batch and η₀ from the base rate;
    torch-form momentum from v₀ = 0: heavy ball steps η₀g, Nesterov η₀(g + μg) = η₀(1+μ)g."""
    hyp = train.hyperparameters("quick", **TINY, momentum=momentum, nesterov=nesterov,
                                weight_decay=0.0, label_smoothing=0.0, base_lr=1e-3,
                                lr_factor=2.0, warmup=0.5)
    snaps = {}

    def cb(state):
        if state.step in (0, 1):
            snaps[state.step] = copy.deepcopy(state.model.state_dict())
            snaps[f"lr{state.step}"] = state.lr

    train.train(hyp, dataset, callback=cb, progress=False)
    # rebuild the first batch by hand: seeded subset, epoch-0 plan, crops and flips
    n, pad = hyp["subset"], hyp["crop_pad"]
    idx = np.sort(np.random.default_rng(hyp["seed"]).permutation(256)[:n])
    imgs = np.pad(dataset.train_images[idx], ((0, 0), (0, 0), (pad, pad), (pad, pad)),
                  mode="reflect")
    plan = train.epoch_plan(hyp["seed"], 0, n, pad, True, "cpu")
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
    hyp = train.hyperparameters("quick", **TINY, checkpoint_every=3)
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
        train.train({**hyp, "seed": 1}, dataset, progress=False, checkpoint=ckpt, resume=True)


def test_resume_compares_run_info(dataset, tmp_path):
    """The caller's other settings are saved with the checkpoint; resuming with different ones,
    or from a checkpoint that does not record them, is refused naming the difference."""
    hyp = train.hyperparameters("quick", **{**TINY, "epochs": 1})
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
    hyp = train.hyperparameters("quick", **{**TINY, "epochs": 4, "subset": 256})
    r = train.train(hyp, dataset, progress=False)
    assert r["steps"] == 4 * 8 and len(r["history"]) == 4
    h = r["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert r["test_acc"] > 0.2  # chance is 0.1
    assert r["examples_per_s"] > 0 and r["diverged_at_step"] is None


def test_divergence_is_a_result(dataset):
    hyp = train.hyperparameters("quick", **TINY, lr=1e6, warmup=0.0)
    r = train.train(hyp, dataset, progress=False)
    assert r["diverged_at_step"] is not None and np.isnan(r["test_acc"])


def test_callback_can_stop_a_diverged_run(dataset, tmp_path):
    """A callback that finds the model non-finite sets state.diverged: training stops at that
    step, reports it like a loss divergence, and does not checkpoint the bad weights."""
    hyp = train.hyperparameters("quick", **TINY)
    seen = []

    def cb(state):
        seen.append(state.step)
        if state.step == 3:
            with torch.no_grad():
                next(state.model.parameters()).fill_(float("nan"))
            state.diverged = True

    ckpt = tmp_path / "c.pt"
    r = train.train({**hyp, "checkpoint_every": 1}, dataset, callback=cb, progress=False,
                    checkpoint=ckpt)
    assert seen == [0, 1, 2, 3] and r["diverged_at_step"] == 3 and r["steps"] == 3
    assert np.isnan(r["test_acc"]) and np.isnan(r["test_loss"])
    assert torch.load(ckpt, weights_only=True)["step"] == 2  # the last finite one


def test_bad_seed_and_nesterov_are_rejected():
    for key, value in (("seed", -1), ("seed", 1.5), ("nesterov", "yes")):
        with pytest.raises(ValueError, match=key):
            train.check_hyperparameters(train.hyperparameters("quick", **{key: value}), 5000)
