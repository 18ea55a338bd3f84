#!/usr/bin/env bash
# Submit a distill-jax training to a GKE TPU cluster with XPK (github.com/AI-Hypercomputer/xpk).
#
#   CLUSTER=my-cluster TPU_TYPE=v5p-32 IMAGE=gcr.io/proj/distill-jax:latest \
#   CONFIG=configs/scm.py WORKDIR=gs://bucket/runs/scm bash launch/xpk.sh [--config.x=y ...]
#
# IMAGE is a container holding this repository at $REPO (default /distill-jax), installed with
# `pip install -e ".[tpu]"`. Every pod runs launch/host.sh; jax.distributed detects GKE.
set -euo pipefail
: "${CLUSTER:?}" "${TPU_TYPE:?}" "${IMAGE:?}" "${CONFIG:?}" "${WORKDIR:?}"
REPO="${REPO:-/distill-jax}"
xpk workload create \
  --cluster "$CLUSTER" \
  --workload "distill-$(date +%Y%m%d-%H%M%S)" \
  --tpu-type "$TPU_TYPE" \
  --num-slices 1 \
  --docker-image "$IMAGE" \
  --command "cd $REPO && CONFIG=$CONFIG WORKDIR=$WORKDIR DISTILL_JAX=distill-jax bash launch/host.sh $*"
