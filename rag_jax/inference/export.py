"""Export of a RAG model out of rag_jax: to the Hugging Face layout that transformers' RagSequenceForGeneration /
RagTokenForGeneration `from_pretrained` loads (config.json, generation_config.json, model.safetensors, and the
tokenizer subfolders), or to a parameters-only orbax checkpoint.

A trained run's export carries what answering with it needs besides the weights, so that it behaves exactly like
its workdir: the run's generation settings (generation_config.json, which transformers' RagTokenForGeneration
`generate` reads, and the generator's decoder start, which RagSequenceForGeneration's per-document `generate`
reads) and how the run tokenised answers (config.json key RUN_KEY). model_dir.load_hf_rag reads both back: a
directory with RUN_KEY is answered with generation_config.json's settings by either model type, as its workdir is.
"""

from __future__ import annotations

import json
import os
from typing import Any

import transformers
from safetensors.numpy import save_file

from rag_jax import rag
from rag_jax.data import tokenizers
from rag_jax.inference.generation import GenerationConfig
from rag_jax.models import hf

ARCHITECTURES = {"sequence": "RagSequenceForGeneration", "token": "RagTokenForGeneration"}
RUN_KEY = "rag_jax_run"  # config.json: {"answer_prefix_space": bool} of the trained run that was exported
GENERATION_CONFIG_FILE = "generation_config.json"


def refuse_to_overwrite(directory: str) -> None:
    if os.path.exists(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory}: exists and is not empty; export writes into a new directory only")


def save_hf_rag(
    directory: str,
    model: rag.Rag,
    params: dict[str, Any],
    model_type: str,
    question_tokenizer,
    generator_tokenizer,
    *,
    generation: GenerationConfig | None = None,
    answer_prefix_space: bool | None = None,
) -> str:
    """Writes `params` as a Hugging Face RAG checkpoint. `generation` (the settings to answer with) goes to
    generation_config.json and the generator's decoder start; `answer_prefix_space` records how gold answers were
    tokenised in training. Refuses a non-empty `directory`."""
    refuse_to_overwrite(directory)
    os.makedirs(directory, exist_ok=True)
    cfg = model.config
    generator_fields = hf.bart_config_dict(model.generator_config)
    if generation is not None:
        generator_fields["decoder_start_token_id"] = generation.decoder_start_token_id
    run = {} if answer_prefix_space is None else {"answer_prefix_space": bool(answer_prefix_space)}
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        transformers.DPRConfig(**hf.dpr_config_dict(model.question_encoder_config)),
        transformers.BartConfig(**generator_fields, forced_eos_token_id=None),
        n_docs=cfg.n_docs, max_combined_length=cfg.context.max_combined_length, title_sep=cfg.context.title_sep,
        doc_sep=cfg.context.doc_sep, label_smoothing=cfg.label_smoothing, exclude_bos_score=cfg.exclude_bos_score,
        reduce_loss=cfg.reduce_loss, do_deduplication=cfg.do_deduplication, **({RUN_KEY: run} if run else {}),
    )  # fmt: skip
    config.architectures = [ARCHITECTURES[model_type]]
    config.save_pretrained(directory)
    if generation is not None:
        transformers.GenerationConfig(**generation.to_hf()).save_pretrained(directory)

    tensors = hf.encoder_tensors(model.question_encoder_config, params["question_encoder"],
                                 hf.RAG_QUESTION_ENCODER_PREFIX)  # fmt: skip
    tensors.update(hf.export_tensors(params["generator"], hf.bart_table(model.generator_config), hf.RAG_GENERATOR_PREFIX))
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    question_tokenizer.save_pretrained(os.path.join(directory, tokenizers.RAG_QUESTION_SUBDIR))
    generator_tokenizer.save_pretrained(os.path.join(directory, tokenizers.RAG_GENERATOR_SUBDIR))
    return directory


def save_params_orbax(directory: str, params: dict[str, Any], run_config: dict[str, Any]) -> str:
    """A parameters-only orbax checkpoint (no optimizer state) for serving, with the run's config beside it."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top (only this export needs orbax)

    refuse_to_overwrite(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(os.path.abspath(directory), "params"), params)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(run_config, f, indent=2, sort_keys=True)
    return directory


def load_params_orbax(directory: str) -> dict[str, Any]:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(os.path.abspath(directory), "params"))
