#!/usr/bin/env bash
# The project's GPU checks in one command, for one CUDA GPU (sized for an H200: under 8 minutes
# with the install). Each part runs under its own timeout, so one failure or hang does not stop
# the rest, and writes its log and table to $OUT/<part>.txt ($OUT when set, else gpu-results/);
# $OUT/summary.txt gets the part / status / seconds table, which is also printed last. Exits 1
# if any part failed or timed out.
#
#   bash benchmarks/gpu/run.sh                  # on the GPU machine (wheels from prepare.sh)
#   bash benchmarks/gpu/run.sh --dry-run        # here, on the CPU: the same parts, tiny shapes
#   bash benchmarks/gpu/run.sh --only kernel,step   # a subset (a rerun)
#
# Parts: install (the carried wheels into /tmp/site; GPU only; its log heads env.txt), env
# (nvidia-smi, torch/CUDA/cuDNN/triton versions, the device, the packages), tests (pytest -m
# gpu), kernel (benchmarks/bench_kernel.py), step (benchmarks/step.py --profile), precision
# (benchmarks/bench_precision.py), loader (benchmarks/bench_loader.py, 16 workers, 512 px),
# global (benchmarks/bench_global_scope.py --gpu: the global contrastive scope with 131,072
# anchors per level, fused vs eager; the second rank simulated in one process).
# Timeouts (seconds) can be changed with T_<PART>=..., e.g. T_STEP=200.
#
# GPU mode uses python3 (the machine's, with torch and triton) and
# benchmarks/gpu/wheels/*.whl; --dry-run uses .venv/bin/python, no install, and runs Triton
# under its interpreter (TRITON_INTERPRET=1). PYTHON=... overrides either.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"

DRY=0
ONLY=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --only) ONLY=${2:?--only needs a comma list of parts}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    -h | --help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PARTS=(install env tests kernel step precision loader global)
# Seconds; 470 in all before the global part (+60), which leaves the machine's start and the
# transfers room in a 10-minute call.
declare -A LIMIT=([install]=20 [env]=20 [tests]=70 [kernel]=110 [step]=150 [precision]=40
  [loader]=60 [global]=60)
OUT=${OUT:-$REPO/gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WHEELS=$REPO/benchmarks/gpu/wheels
SITE=/tmp/site

export REPO OUT DRY WHEELS SITE
export PYTHONUNBUFFERED=1
if [[ $DRY == 1 ]]; then
  export PY=${PYTHON:-$REPO/.venv/bin/python}
  export TRITON_INTERPRET=1
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export PY=${PYTHON:-python3}
  export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
  export DS_ACCELERATOR=cuda
fi

# ----------------------------------------------------------------------------- the parts
# Each returns non-zero if anything in it failed; sub-commands carry their own timeouts so that
# a slow one leaves the others their time.

part_install() {
  if [[ $DRY == 1 ]]; then
    echo "dry run: no install, using $PY"
    return 0
  fi
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  if [[ ${#wheels[@]} == 0 ]]; then
    echo "no wheels in $WHEELS: run bash benchmarks/gpu/prepare.sh on the CPU machine and carry"
    echo "benchmarks/gpu/wheels"
    return 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" && ls "$SITE"
}

part_env() {
  local rc=0
  echo "== uname: $(uname -a)"
  echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi || rc=1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
      --format=csv || rc=1
  else
    echo "(no nvidia-smi)"
    [[ $DRY == 1 ]] || rc=1
  fi
  echo "== python"
  timeout 60 "$PY" - <<'EOF' || rc=1
import importlib
import importlib.metadata as md
import os
import platform
import re
import sys
import zipfile
from pathlib import Path

import torch
from packaging.requirements import Requirement

dry = os.environ["DRY"] == "1"
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    print(f"NCCL {torch.cuda.nccl.version()}, bf16 supported: {torch.cuda.is_bf16_supported()}")
elif not dry:
    sys.exit("torch sees no CUDA device")
bad = []
for mod in ("triton", "deepspeed", "webdataset", "pydantic", "hjson", "PIL", "timm", "numpy",
            "yaml", "safetensors", "sklearn", "cv2", "tqdm", "pytest", "multieye_dist"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')} ({Path(m.__file__).parent})")
    except Exception as exc:  # noqa: BLE001 - every failure is listed
        bad.append(f"{mod}: {type(exc).__name__}: {exc}")
# What the carried wheels need must be installed (prepare.sh checked it against a list).
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
for whl in sorted(Path(os.environ["WHEELS"]).glob("*.whl")) if not dry else []:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    for line in re.findall(r"^Requires-Dist: (.+)$", text, re.M):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            bad.append(f"{whl.name} needs {req}, which is not installed")
            continue
        if have not in req.specifier and req.specifier:
            bad.append(f"{whl.name} needs {req}, installed: {have}")
for line in bad:
    print(f"PROBLEM: {line}")
sys.exit(1 if bad else 0)
EOF
  echo "== pip list (the project's packages)"
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|triton|deepspeed|webdataset|\
braceexpand|pydantic|pydantic[-_]core|hjson|annotated[-_]types|typing[-_]inspection|\
typing[-_]extensions|pillow|timm|numpy|pyyaml|safetensors|scikit-learn|opencv-python-headless|\
tqdm|pytest|einops|msgpack|ninja|psutil|py-cpuinfo|packaging|nvidia-cudnn-cu13|\
nvidia-nccl-cu13) " || rc=1
  return $rc
}

part_tests() {
  # Only the modules that hold CUDA tests: the others may import what the GPU machine lacks.
  local files
  files=$(grep -l "mark\.gpu" tests/test_*.py) || { echo "no gpu tests found"; return 1; }
  echo "== pytest -m gpu:" $files
  # shellcheck disable=SC2086 # one word per file
  "$PY" -m pytest -m gpu -v -s -rA -p no:cacheprovider --durations=10 $files
}

part_kernel() {
  local rc=0
  if [[ $DRY == 1 ]]; then
    local cpu=(--device cpu --repeat 1 --warmup 0)
    "$PY" benchmarks/bench_kernel.py "${cpu[@]}" --sizes 8,21 || rc=1
    "$PY" benchmarks/bench_kernel.py "${cpu[@]}" --dtype fp32 --sizes 8 || rc=1
    # (torch.compile needs a C++ toolchain and minutes on the CPU: its row is GPU only.)
    "$PY" benchmarks/bench_kernel.py "${cpu[@]}" --sizes 12 --methods eager,triton || rc=1
    return $rc
  fi
  echo "== bf16, eager vs the fused kernel (K 98, D 512)"
  timeout 35 "$PY" benchmarks/bench_kernel.py --sizes 64,4096,16384,65536 \
    --methods eager,triton || rc=1
  echo "== fp32 inputs (what the kernel gets if the embeddings reach the loss in fp32)"
  timeout 30 "$PY" benchmarks/bench_kernel.py --dtype fp32 --sizes 4096 --methods eager,triton \
    || rc=1
  echo "== bf16 at N = 512 with torch.compile (compile time is in its warm-up)"
  timeout 43 "$PY" benchmarks/bench_kernel.py --sizes 512 --methods eager,compile,triton || rc=1
  return $rc
}

part_step() {
  if [[ $DRY == 1 ]]; then
    "$PY" benchmarks/step.py --device cpu --smoke --profile
  else
    "$PY" benchmarks/step.py --device cuda --profile --steps 20 --warmup 3 --workers 16
  fi
}

part_precision() {
  if [[ $DRY == 1 ]]; then
    "$PY" benchmarks/bench_precision.py --device cpu --backbone test_resnet --image-size 32 \
      --batch-size 4 --steps 3 --warmup 1
  else
    "$PY" benchmarks/bench_precision.py --device cuda --backbone resnet50 --image-size 512 \
      --batch-size 64 --steps 20 --warmup 5
  fi
}

part_loader() {
  if [[ $DRY == 1 ]]; then
    "$PY" benchmarks/bench_loader.py --per-class 2 --image-size 48 --fundus-size 32 --oct-size 40 \
      --samples 32 --batch 8 --workers 1
  else
    "$PY" benchmarks/bench_loader.py --per-class 12 --image-size 512 --samples 1536 --batch 64 \
      --workers 16
  fi
}

part_global() {
  # One process stands in for a 2-rank run (one GPU): this rank's 131,072 anchors per level
  # against 262,144 candidates. Eager needs 128 GiB of logits per level and should report OOM;
  # the part fails only if the fused step fails.
  if [[ $DRY == 1 ]]; then
    "$PY" benchmarks/bench_global_scope.py --gpu --local-batch 24 --peer-anchors 40 --d 32
  else
    "$PY" benchmarks/bench_global_scope.py --gpu --local-batch 65536 --peer-anchors 131072 \
      --d 512
  fi
}

export -f part_install part_env part_tests part_kernel part_step part_precision part_loader \
  part_global

# ----------------------------------------------------------------------------- run them

# install always runs (a fresh machine has none of it; on a warm one it is quick).
want() { [[ -z $ONLY || $1 == install || ",$ONLY," == *",$1,"* ]]; }
for p in ${ONLY//,/ }; do
  [[ " ${PARTS[*]} " == *" $p "* ]] || { echo "unknown part: $p (${PARTS[*]})" >&2; exit 2; }
done

declare -A STATUS SECS
echo "GPU checks: $([[ $DRY == 1 ]] && echo 'dry run on the CPU' || echo 'GPU'), python $PY, \
logs in $OUT"
for p in "${PARTS[@]}"; do
  want "$p" || continue
  var=T_${p^^}
  limit=${!var:-${LIMIT[$p]}}
  log=$OUT/$p.txt
  [[ $p == install ]] && log=$OUT/env.txt  # install heads env.txt: at most 8 files come back
  [[ $p == env && -n ${STATUS[install]:-} ]] || : >"$log"
  start=$SECONDS
  echo "-- $p (timeout ${limit}s) -> $log"
  {
    echo "### part $p, timeout ${limit}s, $(date -u +%FT%TZ)"
    timeout -k 10 "$limit" bash -c "part_$p"
  } >>"$log" 2>&1
  rc=$?
  SECS[$p]=$((SECONDS - start))
  case $rc in
    0) STATUS[$p]=ok ;;
    124 | 137) STATUS[$p]="timeout (${limit}s)" ;;
    *) STATUS[$p]="failed (exit $rc)" ;;
  esac
  echo "   ${STATUS[$p]} in ${SECS[$p]}s"
done

failed=0
for p in "${PARTS[@]}"; do
  [[ -z ${STATUS[$p]:-} || ${STATUS[$p]} == ok ]] || failed=1
done
{
  echo "GPU checks ($([[ $DRY == 1 ]] && echo 'dry run, CPU' || echo GPU)), $(date -u +%FT%TZ)"
  printf '%-10s %-20s %8s\n' part status seconds
  total=0
  for p in "${PARTS[@]}"; do
    [[ -n ${STATUS[$p]:-} ]] || continue
    printf '%-10s %-20s %8s\n' "$p" "${STATUS[$p]}" "${SECS[$p]}"
    total=$((total + SECS[$p]))
  done
  printf '%-10s %-20s %8s\n' total "$([[ $failed == 0 ]] && echo ok || echo FAILED)" "$total"
} | tee "$OUT/summary.txt"
exit $failed
