#!/usr/bin/env bash
# Starts `python -m experiments.train_nq ARGS...` on every worker at once, in the background.
#
# Usage: tpu_setup/run.sh [--run-name=NAME] [--gcs-workdir] [--env=KEY=VALUE]... [common flags] [--] ARGS...
#   ARGS            passed to experiments.train_nq on every worker exactly as given (spaces, quotes and all);
#                   unknown flags before `--` count as ARGS too, e.g.
#                     tpu_setup/run.sh --config=experiments/configs/nq.py:paper --workdir=gs://B/runs/paper
#                   Training flags are documented in experiments/configs/nq.py.
#   --run-name=NAME names the log files (default: the current time, e.g. 20250101-120000).
#   --gcs-workdir   appends --workdir=gs://RAG_GCS_BUCKET/runs/NAME to ARGS, so that checkpoints and metrics
#                   outlive the VMs and a re-run with the same name resumes.
#   --env=KEY=VALUE exported on the workers before starting (repeatable), e.g. --env=LIBTPU_INIT_ARGS=...
# Each worker writes RAG_REMOTE_LOG_DIR/train_nq-NAME-HOSTNAME.log (with a train_nq.log link to the latest)
# and a pid file that tpu_setup/stop.sh uses. It refuses to start while a previous job is still running.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
rag_parse_args "$@"

run_name="$(date +%Y%m%d-%H%M%S)"
gcs_workdir=0
env_exports=""
train_args=()
set -- "${RAG_ARGS[@]}"
while (($#)); do
  case "$1" in
    --run-name=*) run_name="${1#*=}" ;;
    --gcs-workdir) gcs_workdir=1 ;;
    --env=*)
      kv="${1#*=}"
      key="${kv%%=*}"
      [[ "$kv" == *=* && "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || rag_die "--env needs KEY=VALUE, got '$1'"
      env_exports+="export $key=$(rag_quote "${kv#*=}")"$'\n'
      ;;
    *) train_args+=("$1") ;;
  esac
  shift
done
train_args+=("${RAG_PASSTHRU[@]}")
[[ "$run_name" =~ ^[A-Za-z0-9._-]+$ ]] || rag_die "--run-name may use only letters, digits, '.', '_', '-': '$run_name'"
rag_require RAG_TPU_NAME RAG_TPU_ZONE
if [[ "$gcs_workdir" == 1 ]]; then
  rag_require RAG_GCS_BUCKET
  train_args+=("--workdir=gs://$RAG_GCS_BUCKET/runs/$run_name")
fi

log_dir="$(rag_remote_path "$RAG_REMOTE_LOG_DIR")"
remote_dir="$(rag_remote_path "$RAG_REMOTE_DIR")"
python="$(rag_remote_path "$RAG_REMOTE_VENV")/bin/python"
# setsid: the job leads its own process group, so stop.sh can end it with all its children; nohup and the
# redirections let it outlive the ssh session.
run_script="set -eu
cd \"\$HOME\"
mkdir -p $log_dir
log_dir=\$(cd $log_dir && pwd)
pid_file=\"\$log_dir/train_nq.pid\"
if [ -f \"\$pid_file\" ] && kill -0 \"\$(cat \"\$pid_file\")\" 2>/dev/null; then
  echo \"\$(hostname): train_nq is already running (pid \$(cat \"\$pid_file\")); run tpu_setup/stop.sh first\" >&2
  exit 1
fi
if [ ! -x $python ]; then
  echo \"\$(hostname): no python at\" $python \"- run tpu_setup/install.sh first\" >&2
  exit 1
fi
log=\"\$log_dir/train_nq-$run_name-\$(hostname).log\"
cd $remote_dir
${env_exports}setsid nohup $python -m experiments.train_nq $(rag_quote "${train_args[@]}") >\"\$log\" 2>&1 </dev/null &
echo \$! >\"\$pid_file\"
ln -sfn \"\$log\" \"\$log_dir/train_nq.log\"
echo \"\$(hostname): started train_nq (pid \$!), log \$log\""

rag_info "starting run '$run_name' on all workers of '$RAG_TPU_NAME': train_nq $(rag_show "${train_args[@]}")"
rag_ssh all "$run_script"
if [[ "$RAG_DRY_RUN" != 1 ]]; then
  rag_info "follow it with tpu_setup/logs.sh (worker 0) or tpu_setup/logs.sh --worker=all; stop it with tpu_setup/stop.sh"
fi
