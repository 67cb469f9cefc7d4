#!/usr/bin/env bash
# Stops the train_nq job on all workers: SIGTERM to its process group, SIGKILL if still alive after a wait.
#
# Usage: tpu_setup/stop.sh [--wait=SECONDS] [common flags]
#   --wait=SECONDS  how long to give the job to exit after SIGTERM before SIGKILL (default 30).
# Uses the pid file that tpu_setup/run.sh wrote in RAG_REMOTE_LOG_DIR; workers without a job are skipped.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
rag_parse_args "$@"

wait_s=30
set -- "${RAG_ARGS[@]}"
while (($#)); do
  case "$1" in
    --wait=*) wait_s="${1#*=}" ;;
    *) rag_die "unknown argument: $1 (try --help)" ;;
  esac
  shift
done
((${#RAG_PASSTHRU[@]} == 0)) || rag_die "unexpected arguments after --: ${RAG_PASSTHRU[*]}"
[[ "$wait_s" =~ ^[0-9]+$ ]] || rag_die "--wait must be a number of seconds, got '$wait_s'"
rag_require RAG_TPU_NAME RAG_TPU_ZONE

log_dir="$(rag_remote_path "$RAG_REMOTE_LOG_DIR")"
# kill -- -PID signals the whole process group (run.sh started the job with setsid, so PID leads it).
stop_script="pid_file=$log_dir/train_nq.pid
if [ ! -f \"\$pid_file\" ]; then
  echo \"\$(hostname): no train_nq pid file; nothing to stop\"
  exit 0
fi
pid=\$(cat \"\$pid_file\")
if kill -0 \"\$pid\" 2>/dev/null; then
  kill -TERM -- \"-\$pid\" 2>/dev/null || kill -TERM \"\$pid\"
  waited=0
  while kill -0 \"\$pid\" 2>/dev/null && [ \"\$waited\" -lt $wait_s ]; do sleep 1; waited=\$((waited + 1)); done
  if kill -0 \"\$pid\" 2>/dev/null; then
    kill -KILL -- \"-\$pid\" 2>/dev/null || kill -KILL \"\$pid\"
    echo \"\$(hostname): train_nq (pid \$pid) ignored SIGTERM for ${wait_s}s; killed\"
  else
    echo \"\$(hostname): stopped train_nq (pid \$pid)\"
  fi
else
  echo \"\$(hostname): train_nq (pid \$pid) was not running\"
fi
rm -f \"\$pid_file\""

rag_info "stopping train_nq on all workers of '$RAG_TPU_NAME'"
rag_ssh all "$stop_script"
