"""Training checkpoints with orbax: the train state, the data position and the run config, saved together.

Layout: WORKDIR/checkpoints/<step>/ with four items
  params      the trained parameters {"question_encoder", "generator"} (what inference needs, readable alone)
  opt_state   {"step", "opt_state"}: the optimizer state and the step counter
  data        the input pipeline position (TrainPipeline.get_state(), JSON)
  config      the run config (JSON), so a checkpoint says how it was trained and can be rebuilt from itself
Saves are asynchronous: the arrays are copied off the devices, then written in the background while training goes
on; a step directory appears only once complete, so a killed run resumes from the last complete one. All processes
of a multi-host job take part in every save and restore (each writes and reads its own shards).
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from rag_jax.training import workdir as workdir_lib

ITEMS = ("params", "opt_state", "data", "config")


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


class Checkpointer:
    """Saves and restores (state, data position, config) under WORKDIR/checkpoints, keeping the last `keep`."""

    def __init__(self, workdir: str, *, keep: int | None = 3, async_save: bool = True, read_only: bool = False):
        self.directory = workdir_lib.checkpoints_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # leftovers of a save that was killed
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict[str, Any], config: ml_collections.ConfigDict) -> None:
        """Starts saving `state` (a step.TrainState) at `step`; returns once the arrays are off the devices."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config_to_json(config)),
            ),
            force=True,
        )

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

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return ml_collections.ConfigDict(restored["config"])

    def wait(self) -> None:
        """Blocks until a background save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
