#!/usr/bin/env bash
# Creates .venv in the project root and installs multieye-dist with its dev extra.
# Idempotent: a second run only checks that everything is installed.
#   --no-slurm        skip the Slurm packages (only the Slurm launcher's tests need them)
#   TORCH_INDEX_URL   where torch/torchvision come from, e.g. https://download.pytorch.org/whl/cpu
#                     (CPU-only) or .../whl/cu126 (another CUDA build); default: PyPI's build
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
WITH_SLURM=1
for arg in "$@"; do
  case "$arg" in
    --no-slurm) WITH_SLURM='' ;;
    -h | --help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (options: --no-slurm)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# Slurm for launch/slurm_cluster.sh and its tests: Debian's daemons and clients, plus slurmdbd
# and a MariaDB server because submitit reads job states through sacct, which needs slurmdbd.
# iproute2 gives `ss` (free ports). Nothing is configured or started here.
SLURM_PKGS=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server-core mariadb-client-core
  iproute2)
slurm_installed() {
  local p
  for p in "${SLURM_PKGS[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || return 1
  done
}
install_slurm() {
  # The packages' postinst scripts start their services through invoke-rc.d; without systemd
  # that runs the sysvinit scripts, which would leave a system munged running (the Slurm ones
  # give up for lack of /etc/slurm/slurm.conf). launch/slurm_cluster.sh runs its own daemons, so
  # a policy-rc.d denying every start is put in place for this install only; an existing one
  # (Docker images ship one) is left as it is.
  local made_policy='' rc=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${SLURM_PKGS[@]}" >/dev/null; } || rc=$?
  [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
  return "$rc"
}
if [ -z "$WITH_SLURM" ]; then
  echo "install.sh: --no-slurm: Slurm not installed; the Slurm tests will skip"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  slurm_installed || install_slurm ||
    echo "install.sh: installing Slurm failed; the Slurm tests will skip (fail under CI=true)" >&2
else
  echo "install.sh: not root (or no apt-get): Slurm not installed; the Slurm tests will skip"
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian ships venv/ensurepip separately.
    rm -rf .venv
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      "$PY" -m venv .venv
    else
      echo "install.sh: '$PY -m venv' failed; install python3-venv and rerun" >&2
      exit 1
    fi
  fi
fi

pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install "setuptools>=64" wheel
# torch first: DeepSpeed's setup.py imports torch, so it is built without isolation against it.
# The pins have no local label, so PyTorch's own builds (2.x.y+cpu, +cu126) satisfy them.
pip install -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch torchvision
DS_BUILD_OPS=0 pip install -c constraints.txt --no-build-isolation -e '.[dev]'
echo "install.sh: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
