"""Export of a RAG model out of rag_jax: to the Hugging Face layout that transformers' RagSequenceForGeneration /
RagTokenForGeneration `from_pretrained` loads (config.json, model.safetensors, and the tokenizer subfolders)."""

from __future__ import annotations

import os
from typing import Any

import transformers
from safetensors.numpy import save_file

from rag_jax import rag, tokenizers
from rag_jax.models import hf

ARCHITECTURES = {"sequence": "RagSequenceForGeneration", "token": "RagTokenForGeneration"}


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
    generation: dict[str, Any] | None = None,
) -> str:
    """Writes `params` as a Hugging Face RAG checkpoint; `generation` adds generation fields to the RAG config
    (num_beams, max_length, ...). Refuses a non-empty `directory`."""
    refuse_to_overwrite(directory)
    os.makedirs(directory, exist_ok=True)
    cfg = model.config
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        transformers.DPRConfig(**hf.dpr_config_dict(model.question_encoder_config)),
        transformers.BartConfig(**hf.bart_config_dict(model.generator_config), forced_eos_token_id=None),
        n_docs=cfg.n_docs, max_combined_length=cfg.context.max_combined_length, title_sep=cfg.context.title_sep,
        doc_sep=cfg.context.doc_sep, label_smoothing=cfg.label_smoothing, exclude_bos_score=cfg.exclude_bos_score,
        reduce_loss=cfg.reduce_loss, do_deduplication=cfg.do_deduplication, **(generation or {}),
    )  # fmt: skip
    config.architectures = [ARCHITECTURES[model_type]]
    config.save_pretrained(directory)

    tensors = hf.encoder_tensors(model.question_encoder_config, params["question_encoder"],
                                 hf.RAG_QUESTION_ENCODER_PREFIX)  # fmt: skip
    tensors.update(hf.export_tensors(params["generator"], hf.bart_table(model.generator_config), hf.RAG_GENERATOR_PREFIX))
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    question_tokenizer.save_pretrained(os.path.join(directory, tokenizers.RAG_QUESTION_SUBDIR))
    generator_tokenizer.save_pretrained(os.path.join(directory, tokenizers.RAG_GENERATOR_SUBDIR))
    return directory



def save_params_orbax(directory: str, params: dict[str, Any], run_config: dict[str, Any]) -> str:
    """A parameters-only orbax checkpoint (no optimizer state) for serving, with the run's config beside it."""
    import json

    import orbax.checkpoint as ocp

    refuse_to_overwrite(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(os.path.abspath(directory), "params"), params)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(run_config, f, indent=2, sort_keys=True)
    return directory


def load_params_orbax(directory: str) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(os.path.abspath(directory), "params"))
