"""Training checkpoints with orbax: the train state, the data position and the run config, saved together.

Layout: WORKDIR/checkpoints/<step>/ with five items
  params      the trained parameters {"question_encoder", "generator"} (what inference needs, readable alone)
  opt_state   {"step", "opt_state"}: the optimizer state and the step counter
  data        the input pipeline position (TrainPipeline.get_state(), JSON)
  config      the run config (JSON), so a checkpoint says how it was trained and can be rebuilt from itself
  index       {"version": v}: the index version (workdir.index_version_dir) the next step searches (JSON; absent
              from checkpoints saved before index refreshes: version 0)
Saves are asynchronous: the arrays are copied off the devices, then written in the background while training goes
on; a step directory appears only once complete, so a killed run resumes from the last complete one. A save that
fails (no space left, permissions) raises CheckpointSaveError at the next `check` (the loop checks every step), naming
the path, the cause and the last good checkpoint, which is kept. A checkpoint that does not restore (a damaged file)
is skipped for the newest one that does (`restore_newest`). All processes of a multi-host job take part in every
save and restore (each writes and reads its own shards).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import warnings
from typing import Any, Callable, TypeVar

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from rag_jax.runs import workdir as workdir_lib

ITEMS = ("params", "opt_state", "data", "config", "index")
T = TypeVar("T")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names its path, the cause and the last good checkpoint."""


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of a workdir restores; the message names each one and why."""


def describe(error: BaseException) -> str:
    """A one-line cause: the operating system's message when there is one (tensorstore appends it to its own as
    `...: No space left on device [os_error_code='28']`), else the first line without tensorstore's spec dumps."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f" ({error.filename})" if error.filename else "")
    text = str(error)
    os_error = re.search(r"([^:\"\[]+?)\s*\[os_error_code=", text)
    if os_error:
        return os_error.group(1).strip()
    text = text.split("\n")[0].split(" [tensorstore_spec")[0].strip() or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _quiet_abandoned_reads() -> None:
    """A restore that fails leaves tensorstore reads in flight whose completions reach orbax's closed event loop;
    Python reports each as an unraisable 'Event loop is closed' (a hundred tracebacks that say nothing about the
    checkpoint). While restoring (and after: they may come late) those are dropped; every other one is reported."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_abandoned_reads", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.quiets_abandoned_reads = True
    sys.unraisablehook = hook


def _quiet_abandoned_writes() -> None:
    """A save that fails abandons orbax's other writes of that checkpoint before they start; when the process then
    exits, Python warns of each one's coroutine 'was never awaited' (whether any had started is a matter of timing),
    lines that say nothing the save error does not. Dropped once a save has failed."""
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{leaf path: shape}, paths spelt alike for arrays and orbax's metadata (namedtuple fields saved as dict keys)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {tuple(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


class Checkpointer:
    """Saves and restores (state, data position, config) under WORKDIR/checkpoints, keeping the last `keep`."""

    def __init__(self, workdir: str, *, keep: int | None = 3, async_save: bool = True, read_only: bool = False):
        self.directory = workdir_lib.checkpoints_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,  # (what orbax sets for read_only, with a warning)
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # leftovers of a save that was killed
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self.workdir = workdir
        self._pending: int | None = None  # the step being saved in the background
        self._failed = False

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state, data_state: dict[str, Any], config: ml_collections.ConfigDict, *,
             index_version: int = 0) -> None:
        """Starts saving `state` (a step.TrainState) at `step`; returns once the arrays are off the devices.
        index_version: the index version the run searches after this step. Raises CheckpointSaveError if this save
        or the previous one failed."""
        self.wait()
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                    data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(config_to_json(config)),
                    index=ocp.args.JsonSave({"version": int(index_version)}),
                ),
                force=True,
            )
        except Exception as e:  # pylint: disable=broad-except (disk full, permissions, a failed earlier save)
            raise self._save_error(step, describe(e)) from e
        self._pending = step

    def check(self) -> None:
        """Raises CheckpointSaveError if the background save has finished and failed (cheap: call every step)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until a background save has finished; raises CheckpointSaveError if it failed."""
        step, self._pending = self._pending, None
        if step is None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
            raise self._save_error(step, describe(e)) from e
        if not epath.Path(self.step_dir(step)).exists():  # orbax logs some failures instead of raising them
            raise self._save_error(step, "the save did not complete (see the log above)")

    def _save_error(self, step: int, cause: str) -> CheckpointSaveError:
        self._failed = True
        _quiet_abandoned_writes()
        kept = [s for s in self.manager.all_steps() if s != step and epath.Path(self.step_dir(s)).exists()]
        last = self.step_dir(max(kept)) if kept else "none (none saved)"
        return CheckpointSaveError(
            f"could not write checkpoint {self.step_dir(step)}: {cause}. The last good checkpoint is {last}; free "
            f"space or fix the permissions of {self.directory}, then rerun the same command to resume from it")

    def restore_newest(self, restore: Callable[[int], T], *, fatal: tuple[type[Exception], ...] = ()
                       ) -> tuple[int, T, list[tuple[int, str]]]:
        """(step, restore(step), skipped) for the newest step whose `restore` succeeds; `skipped` holds (step,
        cause) of the newer ones that failed. An error of a `fatal` type is raised at once (it is not damage that an
        older checkpoint could get round). Raises CheckpointRestoreError when none restores."""
        _quiet_abandoned_reads()
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, restore(step), skipped
            except fatal:
                raise
            except Exception as e:  # pylint: disable=broad-except (damaged files fail in many ways)
                skipped.append((step, describe(e)))
        if not skipped:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint; train first "
                                    "(python -m experiments.train_nq --workdir=...)")
        raise CheckpointRestoreError(
            f"{self.directory}: no checkpoint restores ("
            + "; ".join(f"{self.step_dir(s)}: {cause}" for s, cause in skipped)
            + "); restore the files from a copy, or start over in a new --workdir")

    def restore_step(self, step: int, restore: Callable[[int], T], *, fatal: tuple[type[Exception], ...] = ()) -> T:
        """restore(step) for a step the user chose; a failure is a CheckpointRestoreError naming the other steps."""
        if step not in self.all_steps():
            raise FileNotFoundError(f"{self.step_dir(step)}: no such checkpoint; the workdir has steps "
                                    f"{self.all_steps() or 'none'}")
        _quiet_abandoned_reads()
        try:
            return restore(step)
        except fatal:
            raise
        except Exception as e:  # pylint: disable=broad-except (damaged files fail in many ways)
            raise CheckpointRestoreError(f"{self.step_dir(step)} does not restore ({describe(e)}); choose another step "
                                         f"of {self.all_steps()}") from e

    def shape_mismatch(self, step: int, abstract_state) -> str | None:
        """Where checkpoint `step` holds other arrays than `abstract_state` (a TrainState of ShapeDtypeStructs)
        would restore, or None when every path and shape agrees (read from the checkpoint's metadata only)."""
        handler = ocp.StandardCheckpointHandler()
        for item, want in (("params", abstract_state.params),
                           ("opt_state", {"step": abstract_state.step, "opt_state": abstract_state.opt_state})):
            saved = _shapes(handler.metadata(epath.Path(self.step_dir(step)) / item))
            now = _shapes(want)
            for path in sorted(set(saved) | set(now)):
                if saved.get(path) != now.get(path):
                    name = ".".join((item,) + path)
                    there = "missing" if path not in saved else saved[path]
                    here = "missing" if path not in now else now[path]
                    return f"{name}: {there} in the checkpoint, {here} in this run"
        return None

    def set_aside(self, step: int) -> str:
        """Moves checkpoint `step` out of the way (to WORKDIR/checkpoints_skipped/), so that the run can save that
        step again; returns where it went. Process 0 only (then every process reloads)."""
        target = os.path.join(workdir_lib.skipped_checkpoints_dir(self.workdir), str(step))
        suffix = 1
        while epath.Path(target).exists():
            target = os.path.join(workdir_lib.skipped_checkpoints_dir(self.workdir), f"{step}.{suffix}")
            suffix += 1
        epath.Path(target).parent.mkdir(parents=True, exist_ok=True)
        epath.Path(self.step_dir(step)).rename(target)
        return target

    def reload(self) -> None:
        """Rereads which steps exist (after set_aside)."""
        self.manager.reload()

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        """(state, data position) of checkpoint `step`, laid out like `abstract_state` (ShapeDtypeStructs with
        shardings, e.g. from jax.eval_shape plus the run's shardings)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state.params),
                opt_state=ocp.args.StandardRestore({"step": abstract_state.step,
                                                    "opt_state": abstract_state.opt_state}),
                data=ocp.args.JsonRestore(),
            ),
        )
        opt = restored["opt_state"]
        state = abstract_state.replace(params=restored["params"], step=opt["step"], opt_state=opt["opt_state"])
        return state, restored["data"]

    def restore_params(self, step: int, abstract_params) -> Any:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return restored["params"]

    def index_version(self, step: int) -> int:
        """The index version checkpoint `step` was saved with (0 for one saved before index refreshes)."""
        if not epath.Path(self.step_dir(step), "index").exists():
            return 0
        restored = self.manager.restore(step, args=ocp.args.Composite(index=ocp.args.JsonRestore()))
        return int(restored["index"]["version"])

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return ml_collections.ConfigDict(restored["config"])

    def close(self, *, quiet: bool = False) -> None:
        """Waits for a background save and closes. Raises CheckpointSaveError if that save failed, unless `quiet`
        (the run is stopping for another error, which is the one to report)."""
        try:
            if not quiet:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # pylint: disable=broad-except (the failed save again, already reported or not ours)
                # orbax's close stops at that error before closing its writers; close them, so that no background
                # write outlives the run (and fails noisily at interpreter exit).
                for part in ("_checkpointer", "_non_blocking_metadata_store", "_blocking_metadata_store",
                             "_checkpoint_deleter"):
                    with contextlib.suppress(Exception):
                        getattr(self.manager, part).close()
                if not (quiet or self._failed):
                    raise
