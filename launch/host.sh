#!/usr/bin/env bash
# The command every host of a multi-host training runs: a SLURM task (launch/slurm_gpu.sbatch), a
# Cloud TPU VM worker (launch/tpu_vm_pod.sh) or a GKE pod (launch/xpk.sh). Each host runs the same
# program; --multihost joins them through jax.distributed, which detects the cluster.
#
#   CONFIG=configs/scm.py WORKDIR=/shared/runs/scm bash launch/host.sh [--config.x=y ...]
#
# DISTILL_JAX: the distill-jax executable (default: this repository's .venv, made by
# `make venv ACCEL=tpu|cuda`). The suite runs this file under a simulated SLURM job
# (tests/test_multihost.py).
set -euo pipefail
: "${CONFIG:?set CONFIG, e.g. configs/scm.py}" "${WORKDIR:?set WORKDIR (shared by all hosts)}"
REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
DISTILL_JAX="${DISTILL_JAX:-$REPO/.venv/bin/distill-jax}"
cd "$REPO"
exec "$DISTILL_JAX" train --config "$CONFIG" --workdir "$WORKDIR" --multihost "$@"
