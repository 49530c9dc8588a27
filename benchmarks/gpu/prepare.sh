#!/usr/bin/env bash
# Run HERE (a machine with the project's .venv and a package registry), before the GPU run:
# fetches into benchmarks/gpu/wheels/ (git-ignored; the device call carries it) the wheels that
# the GPU machine lacks, for its CPython 3.12 on x86-64 (manylinux), at the versions of .venv.
#
#   bash benchmarks/gpu/prepare.sh          # idempotent: a wheel already there is kept
#
# What and why (the imports of multieye_dist and benchmarks/, against machine-packages.txt):
#   deepspeed       engine.py; built here without ops (DS_BUILD_OPS=0: pure Python, ops are
#                   JIT-built only if asked for, and the project asks for none)
#   hjson, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions
#                   deepspeed's requirements missing there (typing-extensions is there, maybe
#                   older than pydantic's >= 4.16)
#   webdataset, braceexpand
#                   the shard reader (data/stream.py) and its requirement
#   pillow          pyproject pins < 13 (timm's RandAugment asks Pillow for posterize(bits=0),
#                   which 13 rejects); the machine's version is not known
# Already there: torch, triton, timm, torchvision, numpy, pyyaml, safetensors, scikit-learn,
# opencv-python-headless, tqdm, pytest, einops, msgpack, ninja, psutil, py-cpuinfo, packaging.
# The last step checks every requirement of every carried wheel against what is carried and
# machine-packages.txt, and prints the total size.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-.venv/bin/python}
DEST=benchmarks/gpu/wheels
PKGS=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
  webdataset braceexpand pillow)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p "$DEST"

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# A wheel's file name starts with its normalised name (PEP 427: runs of -_. become _).
stem() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; }
have() {  # have NAME VERSION: a wheel of exactly that version is there; other versions go
  local s found=1 f base
  s=$(stem "$1")
  shopt -s nullglob nocaseglob
  for f in "$DEST"/*.whl; do
    base=$(basename "$f")
    [[ $(stem "${base%%-*}") == "$s" ]] || continue
    if [[ $base == *-"$2"-* ]]; then found=0; else echo "removing stale $base"; rm -f "$f"; fi
  done
  shopt -u nullglob nocaseglob
  return $found
}

for pkg in "${PKGS[@]}"; do
  ver=$(version "$pkg")
  if have "$pkg" "$ver"; then
    echo "have $pkg $ver"
  elif [[ $pkg == deepspeed ]]; then
    echo "building $pkg $ver without ops"
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation \
      -w "$DEST" "deepspeed==$ver"
  else
    echo "fetching $pkg $ver for cp312"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$pkg==$ver"
  fi
done

# Every requirement of a carried wheel (markers evaluated for CPython 3.12 on Linux x86-64) must
# be carried or on the machine; then the list and the total size.
"$PY" - "$DEST" benchmarks/gpu/machine-packages.txt <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

dest, listed = Path(sys.argv[1]), Path(sys.argv[2])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
machine = {norm(x) for x in listed.read_text().split() if not x.startswith("#")}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
wheels, needs = {}, {}
for whl in sorted(dest.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    name = norm(re.search(r"^Name: (.+)$", text, re.M).group(1).strip())
    if name in wheels:
        sys.exit(f"two wheels of {name}: {wheels[name].name} and {whl.name}")
    wheels[name] = whl
    for line in re.findall(r"^Requires-Dist: (.+)$", text, re.M):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            needs.setdefault(norm(req.name), []).append(name)
missing = {n: by for n, by in needs.items() if n not in wheels and n not in machine}
total = 0
for name, whl in sorted(wheels.items()):
    size = whl.stat().st_size
    total += size
    print(f"{size / 2**20:8.2f} MiB  {whl.name}")
print(f"{total / 2**20:8.2f} MiB  total, {len(wheels)} wheels in {dest}")
if missing:
    sys.exit(f"requirements neither carried nor on the GPU machine: {missing}")
print("every requirement is carried or on the GPU machine")
EOF
