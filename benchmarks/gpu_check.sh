#!/usr/bin/env bash
# One-call GPU check of sgdtheory + validate: every figure in one JSON, in <= 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [--out gpu_check.json] [--device cuda|cpu] [--dry-run]
#
# Steps (each writes its figures; the JSON gets them all, plus the GPU's name and versions):
#   1. the GPU-marked tests (CuPy and torch-CUDA paths of the simulator and estimators), and
#      validate.measure on the GPU against the same measurement on the CPU in float64;
#   2. the simulator's throughput (updates/s) against the device's copy bandwidth
#      (benchmarks/bench_simulate.py's nqm_rates and bandwidth);
#   3. the CIFAR ResNet's examples/s and seconds per epoch, default preset, synthetic data,
#      2 epochs (the second epoch's time is the per-epoch figure);
#   4. the measurement cost ratios of issue 15 target 1 (benchmarks/bench_measure.py --preset
#      default: width-1 ResNet, validate.cifar's default measurement settings, and the digits CNN).
# --dry-run (with --device cpu, say) runs every step at toy sizes: a test of the script itself.
# Any error stops it with ONE line on stderr ("gpu_check: FAILED at step N (...)") and exit 1;
# the step's log is kept next to the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."

out="gpu_check.json"
device="cuda"
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

work="$(mktemp -d)"
logdir="$(dirname "$out")/gpu_check_logs"
mkdir -p "$logdir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
export GPU_CHECK_DEVICE="$device" GPU_CHECK_DRY="$dry" GPU_CHECK_WORK="$work"
step=0
start=$(date +%s)

fail() {
  echo "gpu_check: FAILED at step $step ($1); log: $logdir/step$step.log" >&2
  exit 1
}

run_step() {  # run_step N description command...
  step=$1; shift
  local what=$1; shift
  echo "[$step] $what" >&2
  if ! "$@" >"$logdir/step$step.log" 2>&1; then
    fail "$what: $(tail -n 1 "$logdir/step$step.log" | cut -c1-200)"
  fi
}

py() { python - "$@"; }

# ---------------------------------------------------------------------------- 0. the device
run_step 0 "device" py <<'EOF'
import json, os, sys, torch
dev = os.environ["GPU_CHECK_DEVICE"]
if dev.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch " + torch.__version__)
info = {"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda,
        "name": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu",
        "dry_run": os.environ["GPU_CHECK_DRY"] == "1"}
try:
    import cupy
    info["cupy"] = cupy.__version__
except Exception as e:  # noqa: BLE001
    info["cupy"] = f"not available: {type(e).__name__}"
json.dump(info, open(os.path.join(os.environ["GPU_CHECK_WORK"], "0_device.json"), "w"))
print(info)
EOF

# ---------------------------------------------------------------------------- 1. tests
tests_cmd=(python -m pytest -q -p no:cacheprovider -m gpu -rs tests sgdtheory)
run_step 1 "GPU-marked tests" bash -c '
  set -o pipefail
  "$@" | tee "$GPU_CHECK_WORK/1_tests.txt"; rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]  # 5: none collected (recorded as such below)
' _ "${tests_cmd[@]}"
run_step 1 "validate.measure on the device vs the CPU" py <<'EOF'
import json, math, os, sys, torch
from torch import nn
from validate import measure
dev = torch.device(os.environ["GPU_CHECK_DEVICE"])
torch.manual_seed(0)
def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).double()
x = torch.randn(64, 3, 16, 16, dtype=torch.float64); y = torch.randint(0, 10, (64,))
crit = nn.CrossEntropyLoss()
res = {}
for mode in ("train", "eval"):
    cpu, gpu = make().train(mode == "train"), make().to(dev).train(mode == "train")
    xd, yd = x.to(dev), y.to(dev)
    kw = {"micro_batch": 4} if mode == "train" else {"method": "per_sample"}
    a, b = measure.gradient_noise(cpu, crit, x, y, **kw), measure.gradient_noise(gpu, crit, xd, yd, **kw)
    h1 = measure.hessian_noise(cpu, crit, x, y, micro_batch=4)
    h2 = measure.hessian_noise(gpu, crit, xd, yd, micro_batch=4)
    l1 = measure.top_hessian_eigenvalue(cpu, crit, x, y, tol=1e-10, max_iter=300)
    l2 = measure.top_hessian_eigenvalue(gpu, crit, xd, yd, tol=1e-10, max_iter=300)
    t1 = measure.hessian_trace(cpu, crit, x, y, n_samples=8)
    t2 = measure.hessian_trace(gpu, crit, xd, yd, n_samples=8)
    pairs = {"grad_sq": (a.grad_sq, b.grad_sq), "tr_sigma": (a.tr_sigma, b.tr_sigma),
             "g_h_g": (h1.g_h_g, h2.g_h_g), "tr_h_sigma": (h1.tr_h_sigma, h2.tr_h_sigma),
             "lambda_max": (l1, l2), "trace": (t1[0], t2[0])}
    err = {k: abs(u - v) / max(abs(u), 1e-300) for k, (u, v) in pairs.items()}
    res[mode] = err
    bad = {k: e for k, e in err.items() if not e <= 1e-6}
    if bad:
        sys.exit(f"{mode} mode: device and CPU disagree (relative differences {bad})")
json.dump(res, open(os.path.join(os.environ["GPU_CHECK_WORK"], "1_measure_device.json"), "w"))
print(res)
EOF

# ---------------------------------------------------------------------------- 2. simulator
run_step 2 "simulator throughput vs copy bandwidth" py <<'EOF'
import json, os, sys
import numpy as np
sys.path.insert(0, "benchmarks")
from bench_simulate import bandwidth, nqm_rates
from sgdtheory import problems
from sgdtheory.backend import available_backends, get_backend
dev, dry = os.environ["GPU_CHECK_DEVICE"], os.environ["GPU_CHECK_DRY"] == "1"
r, p, steps = (200, 100, 10) if dry else (100_000, 1000, 200)
h = np.geomspace(1.0, 1e-3, p)
prob = problems.NoisyQuadratic(h, h)
out = {}
names = ["torch"] + (["cupy"] if dev.startswith("cuda") and "cupy" in available_backends() else [])
for name in names:
    be = get_backend(name, device=dev) if name == "torch" else get_backend("cupy")
    rate, ratio_fill, _ = nqm_rates(be, prob, r, steps, 2, rounds=3)
    bw = bandwidth(be, n=(1 << 20) if dry else (1 << 28))
    out[f"{name}-{dev}"] = {
        "replicas": r, "dim": p, "steps": steps, "updates_per_s": rate["sim"],
        "fill_per_s": rate["fill"], "ratio_to_fill": ratio_fill,
        "copy_bandwidth_bytes_per_s": bw,
        "ratio_to_bandwidth_at_20_bytes_per_update": rate["sim"] / (bw / 20)}
json.dump(out, open(os.path.join(os.environ["GPU_CHECK_WORK"], "2_simulator.json"), "w"))
print(out)
EOF

# ---------------------------------------------------------------------------- 3. CIFAR ResNet
run_step 3 "CIFAR ResNet training throughput" py <<'EOF'
import json, os
from validate import data, train
dev, dry = os.environ["GPU_CHECK_DEVICE"], os.environ["GPU_CHECK_DRY"] == "1"
preset = "quick" if dry else "default"
n_train, n_test = (512, 128) if dry else (50_000, 10_000)
d = data.synthetic_cifar10(n_train, n_test, seed=0)
hyp = train.make_config(preset, epochs=2, subset=None if not dry else 256)
r = train.train(hyp, d, device=dev, progress=False)
hist = r["history"]
epoch2 = hist[-1]["time_s"] - hist[-2]["time_s"] if len(hist) >= 2 else r["time_s"]
out = {"preset": preset, "train_examples": r["train_examples"], "params": r["params"],
       "batch_size": hyp.batch_size, "examples_per_s": r["examples_per_s"],
       "seconds_per_epoch": epoch2, "first_epoch_seconds": hist[0]["time_s"],
       "test_acc_synthetic": r["test_acc"], "steps": r["steps"]}
json.dump(out, open(os.path.join(os.environ["GPU_CHECK_WORK"], "3_cifar.json"), "w"))
print(out)
EOF

# ---------------------------------------------------------------------------- 4. measurement
if [ "$dry" = 1 ]; then
  bench_args=(--quick --preset quick --lanczos 3 --probes 3 --per-sample-batch 32)
else
  bench_args=(--quick --preset default)
fi
run_step 4 "measurement cost ratios" python benchmarks/bench_measure.py --device "$device" \
  "${bench_args[@]}" --json "$work/4_measure.json"

# ---------------------------------------------------------------------------- the JSON
step=5
python - "$out" "$start" <<'EOF' || fail "writing the JSON"
import json, os, re, sys, time
work = os.environ["GPU_CHECK_WORK"]
out, start = sys.argv[1], float(sys.argv[2])
res = {}
for name in sorted(os.listdir(work)):
    key = name.split(".")[0].split("_", 1)[1]
    path = os.path.join(work, name)
    if name.endswith(".json"):
        res[key] = json.load(open(path))
    else:
        text = open(path).read()
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text)}
        res[key] = {"counts": counts, "summary": text.strip().splitlines()[-1] if text.strip()
                    else "no output", "skip_reasons": re.findall(r"SKIPPED \[\d+\] (.*)", text)}
res["seconds"] = time.time() - start
json.dump(res, open(out, "w"), indent=1, allow_nan=False)
print(f"gpu_check: wrote {out} ({res['seconds']:.0f} s)")
EOF
rm -rf "$work"
