"""A training run read back for answering: its model and parameters from the latest (or a given) checkpoint, and
the defaults its config implies for inference.

`generation_config` is the one place that says how a rag_jax-trained model decodes: the periodic dev evaluation
(training/dev_eval.py), eval_nq on a workdir and the Hugging Face export all take it from here.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rag_jax import rag
from rag_jax.data import tokenizers
from rag_jax.inference.model_dir import ModelDefaults
from rag_jax.models.hf_files import CheckpointError
from rag_jax.models import bert
from rag_jax.readers import registry as readers
from rag_jax.readers.generation import GenerationConfig
from rag_jax.retrieval import embed, index_io
from rag_jax.runs import build, checkpoint, workdir as workdir_lib


def generation_config(model: rag.Rag, config: ml_collections.ConfigDict) -> GenerationConfig:
    """Greedy decoding that starts like the training labels: from <s> (bos) at position 0.

    Training feeds `<s> answer </s>` as decoder inputs (the reference's fine-tuning data), so a model trained here
    has learnt p(answer | <s> at position 0). The reference generates from </s> (decoder_start_token_id 2), which
    works for a pretrained BART (it learnt </s> -> <s> in pre-training) but not for one trained from scratch. T5 has
    no BOS: its labels start with its decoder start token (pad), as its generation does.
    """
    g = model.generator_config
    start = g.decoder_start_token_id if g.bos_token_id is None else g.bos_token_id
    return GenerationConfig(max_length=int(config.eval.max_length), num_beams=1, min_length=0,
                            decoder_start_token_id=start, bos_token_id=g.bos_token_id,
                            eos_token_id=g.eos_token_id, pad_token_id=g.pad_token_id)


# Errors of rebuilding a checkpoint's model that an older checkpoint would not get round (a moved init checkpoint).
_NOT_DAMAGE = (build.ConfigError, CheckpointError)


class TrainedModel(NamedTuple):
    model: rag.Rag
    params: Any
    config: ml_collections.ConfigDict  # the run config saved in the checkpoint
    defaults: ModelDefaults


def load(workdir: str, *, step: int | None = None, sharding=None) -> TrainedModel:
    """The run's model (rebuilt from the config saved in the checkpoint; no pretrained weights are read), its
    float32 parameters placed with `sharding` (default: the first local device), and its inference defaults: the
    run's reader (model.reader), `generation_config` (for every reader), the run's answer tokenisation, the run's
    index and its identity: the index version the checkpoint searched when it is complete, else the newest complete one (index_refresh.py;
    WORKDIR/index for a run without refreshes).
    `step` defaults to the newest checkpoint that restores (newer, damaged ones are named on stderr)."""
    if not workdir_lib.is_workdir(workdir):
        raise FileNotFoundError(f"{workdir_lib.checkpoints_dir(workdir)} not found: {workdir} is not a training "
                                "workdir (python -m experiments.train_nq --workdir=... makes one)")
    checkpointer = checkpoint.Checkpointer(workdir, read_only=True)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def restore(at: int):
        config = checkpointer.restore_config(at)
        model = build.build_rag(config, load_weights=False).rag
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                          rag.abstract_params(model))
        return config, model, checkpointer.restore_params(at, abstract)

    try:
        if step is None:  # the newest that restores, as a resumed run does
            step, (config, model, params), skipped = checkpointer.restore_newest(restore, fatal=_NOT_DAMAGE)
            for bad, cause in skipped:
                print(f"skipped checkpoint {checkpointer.step_dir(bad)}, which does not restore ({cause}); using "
                      f"{checkpointer.step_dir(step)}", file=sys.stderr)
        else:
            config, model, params = checkpointer.restore_step(step, restore, fatal=_NOT_DAMAGE)
        index_dir = _index_dir(workdir, checkpointer.index_version(step))
    finally:
        checkpointer.close()
    generation = generation_config(model, config)
    recorded = index_io.read_metadata(index_dir) if os.path.isdir(index_dir) else None
    reader = readers.from_config(config).name
    defaults = ModelDefaults(reader=reader, generation={reader: generation},
                             answer_prefix_space=bool(config.data.answer_prefix_space), index=index_dir,
                             index_identity=index_io.identity(recorded) if recorded else None,
                             ctx_encoder_index_identity=_trained_doc_index_identity(workdir, config, model, params))
    return TrainedModel(model, params, config, defaults)


def _trained_doc_index_identity(workdir: str, config: ml_collections.ConfigDict, model: rag.Rag,
                                params: Any) -> dict[str, Any] | None:
    """The identity of the index the checkpoint's trained d(z) makes (build_index with it, or a refresh at its
    step), which the run's question encoder may search besides the index version it searched (None: d(z) frozen)."""
    if not model.trains_doc_encoder:
        return None
    question = tokenizers.load_question_tokenizer(workdir_lib.tokenizer_dirs(workdir)["question"])
    return build.index_identity(config, *_trained_doc_encoder(model, params), question)


def _trained_doc_encoder(model: rag.Rag, params: Any) -> tuple[bert.BertConfig, Any]:
    cfg = dataclasses.replace(model.doc_encoder_config, dtype=jnp.float32)
    return cfg, jax.tree_util.tree_map(np.asarray, jax.device_get(params["doc_encoder"]))


def _index_dir(workdir: str, version: int) -> str:
    """The index version a checkpoint searched if it is complete, else the newest complete one, else WORKDIR/index."""
    recorded = index_io.read_metadata(workdir_lib.index_version_dir(workdir, version))
    if recorded is None or not recorded.get("complete"):
        latest = workdir_lib.latest_complete_version(workdir)
        version = 0 if latest is None else latest
    return workdir_lib.index_version_dir(workdir, version)


def doc_encoder(trained: TrainedModel) -> tuple[bert.BertConfig, Any]:
    """The run's document encoder d(z), float32 on the host, for the Hugging Face export: the checkpoint's trained
    params["doc_encoder"] when the run trains it (model.doc_encoder.trainable; it embeds the index a refresh at the
    checkpoint's step makes), else the frozen one that embedded the run's index (build.doc_encoder: rebuilt from
    model.doc_encoder.init, or from the seed for a random one) after checking it against the index's encoder_id.
    Raises CheckpointError naming the config field when the frozen one cannot be rebuilt or is not the index's."""
    model, config = trained.model, trained.config
    if model.trains_doc_encoder:
        return _trained_doc_encoder(model, trained.params)
    init = config.model.doc_encoder.init
    try:
        cfg, params = build.doc_encoder(config)
    except (build.ConfigError, CheckpointError, OSError) as e:
        raise CheckpointError(f"config model.doc_encoder.init={init!r}, the run's frozen document encoder, does not "
                              f"load ({e}); restore it there to export it") from None
    recorded = (trained.defaults.index_identity or {}).get("encoder_id")
    if recorded is not None and recorded != embed.encoder_fingerprint(cfg, params):
        raise CheckpointError(f"config model.doc_encoder.init={init!r} is not the encoder that embedded the run's "
                              f"index {trained.defaults.index} (encoder_id {recorded}); restore the checkpoint the "
                              "run was trained with there to export it")
    return cfg, params
