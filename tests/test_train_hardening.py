"""validate.train: training time apart from callback time (result and progress bar), and
corrupt checkpoints refused in one line (API and CLI)."""

import io
import pickle
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import tqdm.auto

from validate import data, train

ROOT = Path(__file__).resolve().parents[1]
TINY = {"epochs": 2, "batch_size": 32, "subset": 128, "width": 0.125, "whiten": False,
        "crop_pad": 2, "tta": False, "eval_batch": 256}  # 4 steps per epoch, 8 in all


@pytest.fixture(scope="module")
def dataset():
    return data.synthetic_cifar10(256, 64, seed=0)


@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar train() opens, with each postfix it showed and its elapsed time at
    close."""
    made = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            k["file"] = io.StringIO()
            super().__init__(*a, **k)
            self.postfixes, self.elapsed_at_close = [], None
            made.append(self)

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            self.postfixes.append(dict(ordered_dict or {}, **kwargs))
            super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

        def close(self):
            if self.elapsed_at_close is None:
                self.elapsed_at_close = self._time() - self.start_t
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    return made


def test_examples_per_s_counts_training_time_only(dataset, monkeypatch, bars):
    """A fake clock: each training step takes 1 s (advanced by the batch hook), the callback
    100 s at steps 0, 3 and 6. Training time, callback time and every examples/s shown or
    returned follow exactly."""
    now = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: now[0],
                                                             time=time.time))

    def hook(step, x, y):
        now[0] += 1.0
        return x, y

    def measure(state):
        if state.step in (0, 3, 6):
            now[0] += 100.0

    hyp = train.make_config("quick", **TINY)
    r = train.train(hyp, dataset, device="cpu", callback=measure, batch_hook=hook,
                    progress=True)
    B = hyp.batch_size
    assert r["steps"] == 8
    assert r["time_s"] == 8.0
    assert r["callback_time_s"] == 300.0
    assert r["examples_per_s"] == B * 8 / 8.0
    assert [(h["time_s"], h["examples_per_s"]) for h in r["history"]] == [(4.0, B), (8.0, B)]
    (bar,) = bars
    assert len(bar.postfixes) == 8  # one per step on CPU
    assert {p["ex_s"] for p in bar.postfixes} == {str(B)}  # B examples per (fake) second
    # callback time so far: 100 s before the first step, +100 after steps 3 and 6
    assert [p["callback_s"] for p in bar.postfixes] == \
        ["100.0"] * 3 + ["200.0"] * 3 + ["300.0"] * 2


def test_sleeping_callback_is_not_training_time(dataset, bars):
    """Real clock: a callback sleeping 0.3 s at three steps. Its time is in callback_time_s,
    not in time_s nor in the bar's elapsed time (which gives its rate and ETA)."""
    sleeps = (0, 4, 8)

    def measure(state):
        if state.step in sleeps:
            time.sleep(0.3)

    hyp = train.make_config("quick", **TINY)
    t = time.perf_counter()
    r = train.train(hyp, dataset, device="cpu", callback=measure, progress=True)
    wall = time.perf_counter() - t
    slept = 0.3 * len(sleeps)
    assert r["callback_time_s"] >= slept
    assert r["time_s"] + r["callback_time_s"] <= wall
    assert r["examples_per_s"] == pytest.approx(hyp.batch_size * 8 / r["time_s"])
    (bar,) = bars
    # the bar starts after the first callback and stops during the others
    assert bar.elapsed_at_close <= wall - slept


# ---------------------------------------------------------------------------- corrupt checkpoints
def _corrupt_forms(good: Path) -> dict:
    """Damaged versions of the checkpoint ``good``: name → bytes."""
    raw = good.read_bytes()
    ck = torch.load(good, weights_only=True)

    def saved(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    return {
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "garbage": np.random.default_rng(0).bytes(4096),
        "plain pickle": pickle.dumps({"step": 1}),
        "a list": saved([1, 2, 3]),
        "a numpy array inside": saved({**ck, "extra": {"a": np.arange(3)}}),
        "step not an integer": saved({**ck, "step": "four"}),
        "no sums": saved({k: v for k, v in ck.items() if k != "sums"}),
        "sums of the wrong shape": saved({**ck, "sums": torch.zeros(5)}),
        "step beyond the run": saved({**ck, "step": 10_000}),
        "wrong weights": saved({**ck, "model": {"w": torch.zeros(2)}}),
        "wrong optimiser state": saved({**ck, "optimizer": {"state": 1}}),
    }


@pytest.fixture(scope="module")
def good_checkpoint(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "checkpoint.pt"
    hyp = train.make_config("quick", **{**TINY, "epochs": 1})
    train.train(hyp, dataset, device="cpu", progress=False, checkpoint=path)
    return hyp, path


def test_corrupt_checkpoint_is_one_line_error(dataset, good_checkpoint, tmp_path):
    hyp, good = good_checkpoint
    for name, blob in _corrupt_forms(good).items():
        path = tmp_path / "checkpoint.pt"
        path.write_bytes(blob)
        with pytest.raises(ValueError) as info:
            train.train(hyp, dataset, device="cpu", progress=False, checkpoint=path,
                        resume=True)
        msg = str(info.value)
        assert "\n" not in msg, name
        assert msg.startswith(f"checkpoint {path} is corrupt"), (name, msg)
        assert msg.endswith("delete it or drop --resume"), (name, msg)
    # the intact one resumes (a finished run: nothing left to train)
    r = train.train(hyp, dataset, device="cpu", progress=False, checkpoint=good, resume=True)
    assert r["steps"] == 4 and not r["failed"]


def test_checkpoint_holds_plain_data_only(good_checkpoint):
    """Read back with weights_only=True, every entry of the expected type, the config a dict."""
    _, good = good_checkpoint
    ck = train.read_checkpoint(good)
    assert set(train.CHECKPOINT_ENTRIES) <= set(ck)
    assert ck["hyp"]["batch_size"] == TINY["batch_size"] and isinstance(ck["hyp"], dict)
    assert isinstance(ck["callback_time_s"], float)


@pytest.mark.parametrize("form", ["truncated", "garbage", "plain pickle", "step not an integer"])
def test_cli_resume_from_corrupt_checkpoint(good_checkpoint, tmp_path, form):
    _, good = good_checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(_corrupt_forms(good)[form])
    cmd = [sys.executable, "-m", "validate.cifar", "train", "--device", "cpu", "--preset",
           "quick", "--data", "synthetic", "--out", str(out), "--resume", "--epochs", "1",
           "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"checkpoint {out / 'checkpoint.pt'} is corrupt" in lines[0]
    assert "Traceback" not in proc.stderr
