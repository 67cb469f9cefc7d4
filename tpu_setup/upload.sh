#!/usr/bin/env bash
# Copies data and index directories (or single files) to the GCS bucket, where every worker can read them.
#
# Usage: tpu_setup/upload.sh [--data=PATH]... [--index=PATH]... [--prefix=P] [--create-bucket] [common flags]
#   --data=PATH     a data directory or file -> gs://BUCKET[/P]/data/BASENAME (repeatable). With neither
#                   --data nor --index, uploads the bundled mini task rag_jax/assets/nq_open_mini.
#   --index=PATH    an index directory (passage embeddings, ScaNN files) -> gs://BUCKET[/P]/index/BASENAME.
#   --prefix=P      a folder inside the bucket to put data/ and index/ under.
#   --create-bucket first create gs://BUCKET in the TPU zone's region (RAG_TPU_ZONE).
# Directories are copied with `gcloud storage rsync --recursive` (re-running copies only what changed),
# files with `gcloud storage cp`.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
rag_parse_args "$@"

data_paths=()
index_paths=()
prefix=""
create_bucket=0
set -- "${RAG_ARGS[@]}"
while (($#)); do
  case "$1" in
    --data=*) data_paths+=("${1#*=}") ;;
    --index=*) index_paths+=("${1#*=}") ;;
    --prefix=*) prefix="${1#*=}" ;;
    --create-bucket) create_bucket=1 ;;
    *) rag_die "unknown argument: $1 (try --help)" ;;
  esac
  shift
done
((${#RAG_PASSTHRU[@]} == 0)) || rag_die "unexpected arguments after --: ${RAG_PASSTHRU[*]}"
rag_require RAG_GCS_BUCKET
if ((${#data_paths[@]} + ${#index_paths[@]} == 0)); then
  data_paths=("$RAG_REPO_ROOT/rag_jax/assets/nq_open_mini")
fi

base="gs://$RAG_GCS_BUCKET"
prefix="${prefix#/}"
prefix="${prefix%/}"
if [[ -n "$prefix" ]]; then base="$base/$prefix"; fi

if [[ "$create_bucket" == 1 ]]; then
  rag_require RAG_TPU_ZONE
  region="${RAG_TPU_ZONE%-*}" # us-central2-b -> us-central2: same region as the TPU, no egress charges
  bucket_cmd=(gcloud storage buckets create "gs://$RAG_GCS_BUCKET" "--location=$region" --uniform-bucket-level-access)
  if [[ -n "$RAG_GCP_PROJECT" ]]; then bucket_cmd+=("--project=$RAG_GCP_PROJECT"); fi
  rag_run "${bucket_cmd[@]}"
fi

# upload KIND PATH: one directory (rsync) or file (cp) to $base/KIND/.
upload() {
  local kind="$1" path="${2%/}" name
  name="$(basename "$path")"
  if [[ -d "$path" ]]; then
    rag_info "$path -> $base/$kind/$name/"
    rag_run gcloud storage rsync --recursive "$path" "$base/$kind/$name"
  elif [[ -f "$path" ]]; then
    rag_info "$path -> $base/$kind/$name"
    rag_run gcloud storage cp "$path" "$base/$kind/$name"
  else
    rag_die "--$kind=$path: no such file or directory"
  fi
}

for path in "${data_paths[@]}"; do upload data "$path"; done
for path in "${index_paths[@]}"; do upload index "$path"; done
