#!/usr/bin/env bash
# Creates the TPU VM (single host, e.g. v4-8) or pod slice (multi-host, e.g. v4-32).
#
# Usage: tpu_setup/create.sh [--name=NAME] [--zone=ZONE] [--type=TYPE] [--runtime=VERSION] [--project=P]
#                            [--spot | --preemptible] [--dry-run] [-- EXTRA_GCLOUD_FLAGS...]
#   --spot          Spot capacity: much cheaper, can be preempted at any time (training resumes from the
#                   last checkpoint in the GCS workdir when you re-create and re-run).
#   --preemptible   The older preemptible model (at most 24 hours).
#   After `--`, flags go to `gcloud compute tpus tpu-vm create` unchanged (e.g. --service-account=...,
#   --network=..., --data-disk=...).
# Settings (RAG_TPU_NAME, RAG_TPU_ZONE, RAG_TPU_TYPE, ...) are described in tpu_setup/common.sh.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
rag_parse_args "$@"

capacity=()
set -- "${RAG_ARGS[@]}"
while (($#)); do
  case "$1" in
    --spot) capacity=(--spot) ;;
    --preemptible) capacity=(--preemptible) ;;
    *) rag_die "unknown argument: $1 (gcloud flags go after --; try --help)" ;;
  esac
  shift
done

rag_require RAG_TPU_NAME RAG_TPU_ZONE RAG_TPU_TYPE
if [[ -z "$RAG_TPU_RUNTIME" ]]; then
  rag_die "no default TPU software version for accelerator type '$RAG_TPU_TYPE':" \
    "export RAG_TPU_RUNTIME=... or pass --runtime=... (see cloud.google.com/tpu/docs/runtimes)"
fi

rag_info "creating $RAG_TPU_TYPE '$RAG_TPU_NAME' in $RAG_TPU_ZONE with runtime $RAG_TPU_RUNTIME"
rag_gcloud_tpu create "$RAG_TPU_NAME" "--accelerator-type=$RAG_TPU_TYPE" "--version=$RAG_TPU_RUNTIME" \
  "${capacity[@]}" "${RAG_PASSTHRU[@]}"
