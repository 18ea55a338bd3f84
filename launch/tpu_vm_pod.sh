#!/usr/bin/env bash
# Run a distill-jax training on every worker of a Cloud TPU VM pod slice (e.g. v5p-32).
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a CONFIG=configs/scm.py WORKDIR=gs://bucket/runs/scm \
#     bash launch/tpu_vm_pod.sh --config.teacher.path=/ckpt/flux-lite-rescaled
#
# The repository must already be cloned at $REPO on every worker:
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#     --command "git clone <repo> $REPO"
# Each worker makes its TPU environment (`make venv ACCEL=tpu`: jax[tpu] with libtpu, a no-op
# when current) and runs launch/host.sh, where jax.distributed discovers the slice.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR}"
REPO="${REPO:-~/distill-jax}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO && make venv ACCEL=tpu && CONFIG=$CONFIG WORKDIR=$WORKDIR bash launch/host.sh $*"
