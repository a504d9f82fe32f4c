"""sgdtheory._threads: thread counts from the cores a process may use, set everywhere once."""

import argparse
import os
import subprocess
import sys

import pytest

from sgdtheory import _threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_available_cores_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    n = _threads.available_cores()
    assert 1 <= n <= (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count())
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 cores
    assert _threads._cgroup_cores(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _threads._cgroup_cores(str(tmp_path)) == float("inf")
    monkeypatch.setattr(_threads, "_cgroup_cores", lambda root="": 1.5)
    assert _threads.available_cores() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(_threads, "_cgroup_cores", lambda root="": float("inf"))
    assert _threads.available_cores() == 4


def test_choose_threads_precedence(monkeypatch):
    monkeypatch.setattr(_threads, "available_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert _threads.choose_threads() == 8
    assert _threads.choose_threads(workers=3) == 2  # no oversubscription across workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's ranks on this machine
    assert _threads.choose_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _threads.choose_threads() == 3
    assert _threads.choose_threads(5) == 5  # an explicit request wins
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert _threads.choose_threads() == 2
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="threads"):
            _threads.choose_threads(bad)


def test_limit_threads_sets_environment_and_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    for var in (*_threads.THREAD_VARS, *_threads._USER_WAIT_VARS):
        monkeypatch.setenv(var, "0")  # recorded, so the test leaves the environment as it was
        monkeypatch.delenv(var)
    before = torch.get_num_threads()
    try:
        assert _threads.limit_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert all(os.environ[v] == "1" for v in _threads.THREAD_VARS)
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        from threadpoolctl import threadpool_info

        assert all(p["num_threads"] == 1 for p in threadpool_info())
    finally:
        torch.set_num_threads(before)


def test_wait_policy_reaches_a_fresh_torch():
    """Set before torch loads (as the CLIs do), OpenMP in torch sees the passive policy."""
    code = ("from sgdtheory import _threads; _threads.limit_threads(1); import torch; "
            "print(torch.get_num_threads(), "
            "'OMP_WAIT_POLICY : PASSIVE' in torch.__config__.parallel_info() or "
            "__import__('os').environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k not in _threads._USER_WAIT_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": ROOT}, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True"] or out.stdout.split() == ["1", "PASSIVE"]


def test_threads_argument_parses_and_rejects():
    ap = argparse.ArgumentParser(prog="x")
    _threads.add_threads_argument(ap)
    assert ap.parse_args([]).threads is None
    assert ap.parse_args(["--threads", "3"]).threads == 3
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--threads", "0"])
    assert e.value.code == 2


@pytest.mark.parametrize("module,args", [
    ("validate.cifar", ["noise", "--device", "cpu", "--data", "synthetic"]),
    ("sgdtheory.figures", ["--list"]),
])
def test_cli_threads_flag(module, args):
    """Both CLIs take --threads; a bad value is one line and exit status 2."""
    if module == "validate.cifar":
        pytest.importorskip("torch")
    env = {**os.environ, "PYTHONPATH": ROOT, "MPLBACKEND": "Agg"}
    bad = subprocess.run([sys.executable, "-m", module, *args, "--threads", "zero"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "--threads" in bad.stderr
    assert "must be an integer >= 1" in bad.stderr
    if module == "sgdtheory.figures":
        ok = subprocess.run([sys.executable, "-m", module, *args, "--threads", "1"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(("others", "cores", "n", "spin"), [
    (0, 2, 2, True),    # a quiet 2-core machine: a short spin
    (1, 2, 2, False),   # one other runnable task takes a core the team needs: passive
    (2, 8, 4, True),    # free cores for every thread
    (5, 8, 4, False),
    (0, 2, 1, False),   # one thread never waits on a team
])
def test_wait_policy_follows_the_free_cores(monkeypatch, others, cores, n, spin):
    monkeypatch.setattr(_threads, "_others_running", lambda samples=5: others)
    monkeypatch.setattr(_threads, "available_cores", lambda: cores)
    got = _threads.wait_vars(n)
    assert got == (_threads.SHORT_SPIN_VARS if spin else _threads.WAIT_VARS)


def test_limit_threads_keeps_a_wait_policy_the_user_set(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # limit_threads writes os.environ
    for var in (*_threads.THREAD_VARS, *_threads._USER_WAIT_VARS):
        os.environ.pop(var, None)
    monkeypatch.setattr(_threads, "_others_running", lambda samples=5: 0)
    monkeypatch.setattr(_threads, "available_cores", lambda: 4)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    _threads.limit_threads(2)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    _threads.limit_threads(2)
    assert os.environ["GOMP_SPINCOUNT"] == _threads.SHORT_SPIN_VARS["GOMP_SPINCOUNT"]
    assert "OMP_WAIT_POLICY" not in os.environ


def test_others_running_reads_the_runnable_count():
    """/proc/loadavg's running count includes the reader: never negative, and a busy child
    process raises it (Linux only)."""
    if not os.path.exists("/proc/loadavg"):
        pytest.skip("no /proc/loadavg on this system")
    assert _threads._others_running() >= 0
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert _threads._others_running(samples=9) >= 1
    finally:
        busy.kill()
        busy.wait()
