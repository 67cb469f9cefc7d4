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
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "data", "config")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


class Checkpointer:
    """Saves and restores (state, data position, config) under WORKDIR/checkpoints, keeping the last `keep`."""

    def __init__(self, workdir: str, *, keep: int | None = 3, async_save: bool = True, read_only: bool = False):
        self.directory = checkpoint_dir(workdir)
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
        """Starts saving `state` (a train.TrainState) at `step`; returns once the arrays are off the devices."""
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


def load_for_inference(workdir: str, *, step: int | None = None, sharding=None):
    """(Rag model, params, run config) of a training run's checkpoint, for evaluation (eval_nq --model=WORKDIR).

    The model is rebuilt from the config saved in the checkpoint (no pretrained weights are read); params come back
    float32 with `sharding` (default: on the first local device). `step` defaults to the latest. The run's index is
    at WORKDIR/index and its tokenizers in WORKDIR/{question_encoder,generator}_tokenizer/.
    """
    from rag_jax import experiment, train  # pylint: disable=g-import-not-at-top (train imports this module)

    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{checkpointer.directory}: no complete checkpoint; train first "
                                    "(python -m experiments.train_nq --workdir=...)")
        config = checkpointer.restore_config(step)
        model = experiment.build_rag(config, load_weights=False).rag
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                          train.abstract_params(model))
        params = checkpointer.restore_params(step, abstract)
    finally:
        checkpointer.close()
    return model, params, config


def load_for_inference_with_defaults(workdir: str, *, step: int | None = None):
    """(model, params, defaults) for experiments/eval_nq: the run's own settings as evaluation defaults.

    defaults: model_type (the training loss), index (WORKDIR/index), generation_hf / generator_hf (a
    decode.GenerationConfig.from_hf dict: the run's greedy dev-evaluation settings, decoding from <s>),
    answer_prefix_space (how the run tokenised its labels) and doc_encoder_id (None: the run checked WORKDIR/index
    against its document encoder when it started).
    """
    from rag_jax import experiment  # pylint: disable=g-import-not-at-top

    model, params, config = load_for_inference(workdir, step=step)
    g = model.generator_config
    # As the run's own dev evaluation (train.dev_generation_config): greedy, starting from <s> like its labels.
    generation = {"max_length": int(config.eval.max_length), "num_beams": 1, "min_length": 0,
                  "decoder_start_token_id": g.bos_token_id, "bos_token_id": g.bos_token_id,
                  "eos_token_id": g.eos_token_id, "pad_token_id": g.pad_token_id}
    defaults = {
        "model_type": config.model.loss,
        "index": experiment.index_dir(os.path.abspath(workdir)),
        "generation_hf": generation,
        "generator_hf": generation,
        "answer_prefix_space": bool(config.data.answer_prefix_space),
        "doc_encoder_id": None,
    }
    return model, params, defaults
