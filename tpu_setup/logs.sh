#!/usr/bin/env bash
# Shows the log of the current/last train_nq job: of one worker, or of all of them with a hostname prefix.
#
# Usage: tpu_setup/logs.sh [--worker=N|all] [--lines=N] [--no-follow] [common flags]
#   --worker=N|all  which worker (default 0, the one that logs metrics); `all` interleaves every worker.
#   --lines=N       how many past lines to show first (default 100).
#   --no-follow     print and exit instead of streaming new lines (streaming stops with Ctrl-C; the job
#                   keeps running).
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
rag_parse_args "$@"

worker=0
lines=100
follow=1
set -- "${RAG_ARGS[@]}"
while (($#)); do
  case "$1" in
    --worker=*) worker="${1#*=}" ;;
    --lines=*) lines="${1#*=}" ;;
    --no-follow) follow=0 ;;
    *) rag_die "unknown argument: $1 (try --help)" ;;
  esac
  shift
done
((${#RAG_PASSTHRU[@]} == 0)) || rag_die "unexpected arguments after --: ${RAG_PASSTHRU[*]}"
[[ "$worker" =~ ^([0-9]+|all)$ ]] || rag_die "--worker must be a worker number or 'all', got '$worker'"
[[ "$lines" =~ ^[0-9]+$ ]] || rag_die "--lines must be a number, got '$lines'"
rag_require RAG_TPU_NAME RAG_TPU_ZONE

tail_cmd="tail -n $lines"
if [[ "$follow" == 1 ]]; then tail_cmd+=" -F"; fi
log="$(rag_remote_path "$RAG_REMOTE_LOG_DIR")/train_nq.log"
# With several workers the output interleaves, so each line says where it came from.
prefix=""
if [[ "$worker" == all ]]; then prefix=" | sed -u \"s/^/\$(hostname): /\""; fi
logs_script="if [ ! -e $log ]; then
  echo \"\$(hostname): no log at\" $log \"- start a job with tpu_setup/run.sh\" >&2
  exit 1
fi
$tail_cmd $log$prefix"

rag_ssh "$worker" "$logs_script"
