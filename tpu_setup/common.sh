# shellcheck shell=bash
# Shared settings and helpers for the tpu_setup/ scripts; sourced, never run.
#
# Every setting comes from an environment variable or from a flag of the same meaning (flags win):
#   RAG_TPU_NAME       --name=NAME          TPU VM / pod slice name                        (required)
#   RAG_TPU_ZONE       --zone=ZONE          e.g. us-central2-b                             (required)
#   RAG_TPU_TYPE       --type=TYPE          accelerator type, e.g. v4-8, v4-32, v5p-64     (required by create.sh)
#   RAG_TPU_RUNTIME    --runtime=VERSION    TPU software version; default from the type:
#                                           v2/v3/v4 -> tpu-ubuntu2204-base, v5e -> v2-alpha-tpuv5-lite,
#                                           v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e
#   RAG_GCP_PROJECT    --project=PROJECT    GCP project; default: gcloud's configured project
#   RAG_GCS_BUCKET     --bucket=BUCKET      bucket for data, index and workdirs (gs:// optional)
#   RAG_REMOTE_DIR     --remote-dir=PATH    repo path on the workers; default rag_jax (relative = under $HOME)
#   RAG_REMOTE_VENV    --remote-venv=PATH   virtualenv on the workers; default rag_jax_venv (under $HOME)
#   RAG_REMOTE_LOG_DIR --log-dir=PATH       log and pid files on the workers; default rag_jax_logs (under $HOME)
#   RAG_DRY_RUN=1      --dry-run            print every command (shell-quoted) instead of running it
# Everything after a bare `--` is left untouched for the calling script.

# Globals below are read by the scripts that source this file, so "unused" (SC2034) is off file-wide.
# shellcheck disable=SC2034
RAG_SETUP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RAG_REPO_ROOT="$(cd "$RAG_SETUP_DIR/.." && pwd)"
RAG_SCRIPT="$(basename "$0")"

# Empty arrays under `set -u` and associative arrays need bash 4.4 (macOS ships 3.2).
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "tpu_setup/$RAG_SCRIPT: error: needs bash >= 4.4, this is $BASH_VERSION (on macOS: brew install bash)" >&2
  exit 1
fi

RAG_TPU_NAME="${RAG_TPU_NAME:-}"
RAG_TPU_ZONE="${RAG_TPU_ZONE:-}"
RAG_TPU_TYPE="${RAG_TPU_TYPE:-}"
RAG_TPU_RUNTIME="${RAG_TPU_RUNTIME:-}"
RAG_GCP_PROJECT="${RAG_GCP_PROJECT:-}"
RAG_GCS_BUCKET="${RAG_GCS_BUCKET:-}"
RAG_REMOTE_DIR="${RAG_REMOTE_DIR:-rag_jax}"
RAG_REMOTE_VENV="${RAG_REMOTE_VENV:-rag_jax_venv}"
RAG_REMOTE_LOG_DIR="${RAG_REMOTE_LOG_DIR:-rag_jax_logs}"
RAG_DRY_RUN="${RAG_DRY_RUN:-0}"

# What each required variable is and which flag sets it, for error messages.
declare -A RAG_FLAG_OF=(
  [RAG_TPU_NAME]="--name" [RAG_TPU_ZONE]="--zone" [RAG_TPU_TYPE]="--type" [RAG_TPU_RUNTIME]="--runtime"
  [RAG_GCP_PROJECT]="--project" [RAG_GCS_BUCKET]="--bucket"
)
declare -A RAG_EXAMPLE_OF=(
  [RAG_TPU_NAME]="rag-v4" [RAG_TPU_ZONE]="us-central2-b" [RAG_TPU_TYPE]="v4-32"
  [RAG_TPU_RUNTIME]="tpu-ubuntu2204-base" [RAG_GCP_PROJECT]="my-project" [RAG_GCS_BUCKET]="my-rag-bucket"
)

# Arguments the common parser did not recognise (before `--`), and everything after `--`.
RAG_ARGS=()
RAG_PASSTHRU=()

rag_die() {
  printf 'tpu_setup/%s: error: %s\n' "$RAG_SCRIPT" "$*" >&2
  exit 1
}

rag_info() {
  printf '[tpu_setup/%s] %s\n' "$RAG_SCRIPT" "$*" >&2
}

# Prints the comment block at the top of the calling script (its usage text).
rag_usage() {
  sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;}}' "$0"
}

rag_parse_args() {
  while (($#)); do
    case "$1" in
      --name=*) RAG_TPU_NAME="${1#*=}" ;;
      --zone=*) RAG_TPU_ZONE="${1#*=}" ;;
      --type=* | --accelerator-type=*) RAG_TPU_TYPE="${1#*=}" ;;
      --runtime=* | --version=*) RAG_TPU_RUNTIME="${1#*=}" ;;
      --project=*) RAG_GCP_PROJECT="${1#*=}" ;;
      --bucket=*) RAG_GCS_BUCKET="${1#*=}" ;;
      --remote-dir=*) RAG_REMOTE_DIR="${1#*=}" ;;
      --remote-venv=*) RAG_REMOTE_VENV="${1#*=}" ;;
      --log-dir=*) RAG_REMOTE_LOG_DIR="${1#*=}" ;;
      --dry-run) RAG_DRY_RUN=1 ;;
      -h | --help)
        rag_usage
        exit 0
        ;;
      --name | --zone | --type | --accelerator-type | --runtime | --version | --project | --bucket | \
        --remote-dir | --remote-venv | --log-dir)
        rag_die "$1 needs a value written as $1=VALUE (one word, with '=')"
        ;;
      --)
        shift
        RAG_PASSTHRU=("$@")
        break
        ;;
      *) RAG_ARGS+=("$1") ;;
    esac
    shift
  done
  RAG_GCS_BUCKET="${RAG_GCS_BUCKET#gs://}"
  RAG_GCS_BUCKET="${RAG_GCS_BUCKET%/}"
  if [[ -z "$RAG_TPU_RUNTIME" ]]; then
    RAG_TPU_RUNTIME="$(rag_default_runtime "$RAG_TPU_TYPE")"
  fi
}

# The TPU software version Google recommends for JAX on each TPU generation (cloud.google.com/tpu/docs/runtimes).
rag_default_runtime() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "" ;;
  esac
}

# Fails, naming the variable and its flag, unless every named RAG_* variable is non-empty.
rag_require() {
  local var
  for var in "$@"; do
    if [[ -z "${!var:-}" ]]; then
      rag_die "$var is not set: export $var=${RAG_EXAMPLE_OF[$var]:-VALUE} or pass ${RAG_FLAG_OF[$var]:---?}=VALUE" \
        "(see tpu_setup/common.sh and tpu_setup/README.md)"
    fi
  done
}

# Fails on arguments the calling script does not take.
rag_no_extra_args() {
  if ((${#RAG_ARGS[@]} + ${#RAG_PASSTHRU[@]})); then
    rag_die "unexpected argument(s): ${RAG_ARGS[*]} ${RAG_PASSTHRU[*]} (try --help)"
  fi
}

# Quotes words for a POSIX shell, readably: safe words bare, others in single quotes. For display only.
rag_show() {
  local word out=()
  for word in "$@"; do
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# Quotes words with bash's printf %q so that a remote bash re-splits them exactly as given.
rag_quote() {
  local quoted=""
  if (($#)); then
    printf -v quoted '%q ' "$@"
    quoted="${quoted% }"
  fi
  printf '%s' "$quoted"
}

# Runs a command, or prints it under --dry-run.
rag_run() {
  if [[ "$RAG_DRY_RUN" == 1 ]]; then
    rag_show "$@"
  else
    "$@"
  fi
}

# gcloud compute tpus tpu-vm SUBCOMMAND ARGS... --zone=... [--project=...]
rag_gcloud_tpu() {
  local cmd=(gcloud compute tpus tpu-vm "$@" "--zone=$RAG_TPU_ZONE")
  if [[ -n "$RAG_GCP_PROJECT" ]]; then
    cmd+=("--project=$RAG_GCP_PROJECT")
  fi
  rag_run "${cmd[@]}"
}

# Runs a bash script on one worker (0, 1, ...) or on all of them at once (all).
rag_ssh() {
  local worker="$1" script="$2"
  rag_gcloud_tpu ssh "$RAG_TPU_NAME" "--worker=$worker" "--command=$script"
}

# A path on the workers as a bash word: "~/x" and relative paths mean under $HOME, absolute ones stay.
rag_remote_path() {
  local path="$1"
  if [[ "$path" == "~" ]]; then
    path=""
  elif [[ "$path" == \~/* ]]; then
    path="${path#\~/}"
  fi
  # shellcheck disable=SC2016  # "$HOME" is meant literally: the worker's shell expands it
  if [[ "$path" == /* ]]; then
    rag_quote "$path"
  elif [[ -z "$path" ]]; then
    printf '%s' '"$HOME"'
  else
    printf '"$HOME"/%s' "$(rag_quote "$path")"
  fi
}
