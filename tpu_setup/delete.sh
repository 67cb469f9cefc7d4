#!/usr/bin/env bash
# Deletes the TPU VM / pod slice (its disks and everything not copied to GCS are lost).
#
# Usage: tpu_setup/delete.sh [--name=NAME] [--zone=ZONE] [--project=P] [--yes] [--dry-run]
#   Asks for confirmation on stdin unless --yes is given; with no answer (no terminal, empty stdin) it refuses.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
rag_parse_args "$@"

assume_yes=0
set -- "${RAG_ARGS[@]}"
while (($#)); do
  case "$1" in
    --yes | -y) assume_yes=1 ;;
    *) rag_die "unknown argument: $1 (try --help)" ;;
  esac
  shift
done
((${#RAG_PASSTHRU[@]} == 0)) || rag_die "unexpected arguments after --: ${RAG_PASSTHRU[*]}"
rag_require RAG_TPU_NAME RAG_TPU_ZONE

if [[ "$assume_yes" != 1 && "$RAG_DRY_RUN" != 1 ]]; then
  printf "Delete TPU '%s' in zone %s%s? Type the TPU name to confirm: " "$RAG_TPU_NAME" "$RAG_TPU_ZONE" \
    "${RAG_GCP_PROJECT:+ (project $RAG_GCP_PROJECT)}" >&2
  answer=""
  read -r answer || true
  if [[ "$answer" != "$RAG_TPU_NAME" ]]; then
    rag_die "not confirmed (got '${answer}'); nothing deleted. Pass --yes to skip the question."
  fi
fi

# --quiet: gcloud would ask again; the question above (or --yes) already covered it.
rag_gcloud_tpu delete "$RAG_TPU_NAME" --quiet
