#!/usr/bin/env bash
# Puts the project on every worker and installs it there with `pip install -e '.[tpu]'`.
#
# Usage: tpu_setup/install.sh [--source=DIR | --git=URL [--ref=REF]] [--python-version=3.12] [common flags]
#   --source=DIR    (default: this checkout) copied to all workers: git-tracked and untracked-but-not-ignored
#                   files in a git checkout, else everything except .git/.venv/caches; packed locally with tar,
#                   sent with `gcloud compute tpus tpu-vm scp --worker=all`, unpacked over RAG_REMOTE_DIR.
#   --git=URL       instead, clone URL into RAG_REMOTE_DIR on each worker (or fetch, if already cloned) and
#   --ref=REF       check out REF (branch, tag or commit; default: the remote's default branch).
#   --python-version=V  Python for the workers' virtualenv (RAG_REMOTE_VENV). jax, flax and transformers need
#                   Python >= 3.11 and the TPU images ship 3.10, so `uv` (pip-installed for the user) fetches one.
# Re-run it after every local change you want on the workers; it is idempotent.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
rag_parse_args "$@"

source_dir="$RAG_REPO_ROOT"
git_url=""
git_ref="HEAD"
python_version="${RAG_REMOTE_PYTHON_VERSION:-3.12}"
set -- "${RAG_ARGS[@]}"
while (($#)); do
  case "$1" in
    --source=*) source_dir="${1#*=}" ;;
    --git=*) git_url="${1#*=}" ;;
    --ref=*) git_ref="${1#*=}" ;;
    --python-version=*) python_version="${1#*=}" ;;
    *) rag_die "unknown argument: $1 (try --help)" ;;
  esac
  shift
done
((${#RAG_PASSTHRU[@]} == 0)) || rag_die "unexpected arguments after --: ${RAG_PASSTHRU[*]}"
rag_require RAG_TPU_NAME RAG_TPU_ZONE

remote_dir="$(rag_remote_path "$RAG_REMOTE_DIR")"
remote_venv="$(rag_remote_path "$RAG_REMOTE_VENV")"
# shellcheck disable=SC2016  # "$HOME" is expanded on the worker
remote_tarball='"$HOME"/rag_jax_src.tar.gz' # scp puts NAME:rag_jax_src.tar.gz in the home directory

if [[ -n "$git_url" ]]; then
  fetch_source="[ -d $remote_dir/.git ] || git clone $(rag_quote "$git_url") $remote_dir
git -C $remote_dir fetch origin $(rag_quote "$git_ref")
git -C $remote_dir checkout --detach FETCH_HEAD"
else
  [[ -d "$source_dir" ]] || rag_die "--source=$source_dir is not a directory"
  source_dir="$(cd "$source_dir" && pwd)"
  tmp_dir="$(mktemp -d)"
  trap 'rm -rf "$tmp_dir"' EXIT
  tarball="$tmp_dir/rag_jax_src.tar.gz"
  if git -C "$source_dir" rev-parse --show-toplevel >/dev/null 2>&1 &&
    [[ "$(git -C "$source_dir" rev-parse --show-toplevel)" == "$source_dir" ]]; then
    # The files git would consider source: tracked (still present) plus untracked-but-not-ignored.
    file_list="$tmp_dir/files"
    while IFS= read -r -d '' path; do
      if [[ -e "$source_dir/$path" ]]; then printf '%s\0' "$path"; fi
    done < <(git -C "$source_dir" ls-files -z --cached --others --exclude-standard) >"$file_list"
    rag_run tar -czf "$tarball" -C "$source_dir" --null -T "$file_list"
  else
    rag_run tar -czf "$tarball" -C "$source_dir" --exclude=.git --exclude=.venv --exclude='*.egg-info' \
      --exclude=__pycache__ --exclude=.pytest_cache .
  fi
  rag_info "copying $source_dir to all workers of '$RAG_TPU_NAME'"
  rag_gcloud_tpu scp "$tarball" "$RAG_TPU_NAME:rag_jax_src.tar.gz" --worker=all
  fetch_source="mkdir -p $remote_dir
tar -xzf $remote_tarball -C $remote_dir
rm -f $remote_tarball"
fi

install_script="set -eu
cd \"\$HOME\"
$fetch_source
python3 -m pip install --user --quiet --upgrade uv
uv=\"\$HOME/.local/bin/uv\"
\"\$uv\" venv --allow-existing --python $(rag_quote "$python_version") $remote_venv
cd $remote_dir
\"\$uv\" pip install --python $remote_venv/bin/python -e '.[tpu]'
$remote_venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)' ||
  echo \"\$(hostname): installed, but jax could not see the TPU (is another process holding it?)\" >&2
echo \"\$(hostname): rag_jax installed in\" $remote_dir \"with python\" $remote_venv/bin/python"

rag_info "installing on all workers of '$RAG_TPU_NAME'"
rag_ssh all "$install_script"
