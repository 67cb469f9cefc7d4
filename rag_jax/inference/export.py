"""Export of a RAG model out of rag_jax: to the Hugging Face layout that transformers' RagSequenceForGeneration /
RagTokenForGeneration `from_pretrained` loads (config.json, generation_config.json, model.safetensors, and the
tokenizer subfolders), or to a parameters-only orbax checkpoint.

A trained run's export carries what answering with it needs besides the weights, so that it behaves exactly like
its workdir: the run's generation settings (generation_config.json, which transformers' RagTokenForGeneration
`generate` reads, and the generator's decoder start, which RagSequenceForGeneration's per-document `generate`
reads), how the run tokenised answers and the identity of the index it was trained with (config.json key RUN_KEY).
model_dir.load_hf_rag reads them back: a directory with RUN_KEY is answered with generation_config.json's settings by
every reader, as its workdir is, and refuses an index of another identity. Exports appear only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import transformers
from safetensors.numpy import save_file

from rag_jax import files, rag
from rag_jax.data import tokenizers
from rag_jax.models import bert, hf, registry
from rag_jax.readers import registry as readers
from rag_jax.readers.generation import GenerationConfig

# config.json: {"answer_prefix_space": bool, "index_identity": {...}, "ctx_encoder_index_identity": {...}} of an
# exported run; the last, the identity of the index CTX_ENCODER_SUBDIR makes, is accepted besides the first (they
# differ when the run trained its document encoder past its last index refresh).
RUN_KEY = "rag_jax_run"
GENERATION_CONFIG_FILE = "generation_config.json"
# <export>/ctx_encoder/: the run's document encoder (a DPRContextEncoder, or a sentence-transformers directory for
# pooling DPR lacks). Inside the RAG directory, which transformers' from_pretrained reads by file name only, so that
# one directory holds the run and appears at once; RagRetriever takes it as `set_ctx_encoder_tokenizer`'s tokenizer.
CTX_ENCODER_SUBDIR = "ctx_encoder"


def refuse_to_overwrite(directory: str) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory}: is a file; give a directory path to export into")
    if os.path.exists(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory}: exists and is not empty; export writes into a new directory only "
                              "(pass --overwrite to replace it once the new export is complete)")


def new_directory(directory: str, *, overwrite: bool = False) -> contextlib.AbstractContextManager[str]:
    """A directory that appears at `directory` only when complete (files.new_directory). An existing non-empty one
    is refused, or with `overwrite` replaced once the new one is complete; an interrupted export leaves `directory`
    as it was."""
    if overwrite and os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory}: is a file; give a directory path to export into")
    if not overwrite:
        refuse_to_overwrite(directory)
    return files.new_directory(directory)


def save_hf_rag(
    directory: str,
    model: rag.Rag,
    params: dict[str, Any],
    reader: str,
    question_tokenizer,
    generator_tokenizer,
    *,
    generation: GenerationConfig | None = None,
    answer_prefix_space: bool | None = None,
    index_identity: dict[str, Any] | None = None,
    doc_encoder: tuple[bert.BertConfig, dict[str, Any]] | None = None,
    ctx_index_identity: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Writes `params` as a Hugging Face RAG checkpoint of the transformers class of `reader` (a reader name: its
    hf_architecture, RagSequenceForGeneration or RagTokenForGeneration). `generation` (the settings to answer with)
    goes to generation_config.json and the generator's decoder start; `answer_prefix_space` records how gold answers
    were tokenised in training, `index_identity` the index it was trained with. `doc_encoder` (config, params), the
    document encoder that embeds the run's index, goes to CTX_ENCODER_SUBDIR as `save_hf_encoder` writes it, with
    the question tokenizer (build_index tokenises passages with it); `ctx_index_identity` is the identity of the
    index it makes. Refuses a non-empty `directory` unless `overwrite`, a reader without a transformers class, and
    a document encoder with no Hugging Face layout (check_hf_encoder) before writing anything; the directory
    appears only when complete (`new_directory`)."""
    rag_class = readers.get(reader).hf_architecture
    if rag_class is None:
        raise hf.CheckpointError(f"the {readers.get(reader).name} reader has no Hugging Face RAG class; export the "
                                 "parameters alone (experiments.export --format=orbax)")
    if doc_encoder is not None:
        check_hf_encoder(doc_encoder[0])
    with new_directory(directory, overwrite=overwrite) as partial:
        _write_hf_rag(partial, model, params, rag_class, question_tokenizer, generator_tokenizer, generation,
                      answer_prefix_space, index_identity, doc_encoder, ctx_index_identity)
    return directory


def hf_generator(model: rag.Rag, generation: GenerationConfig | None):
    """(transformers config, tensor table) of the model's generator as its own Hugging Face class (BART or T5 for
    conditional generation), starting to decode as `generation` does."""
    cfg = model.config
    g = model.generator_config
    generator = registry.for_config(g)
    generator_fields = generator.hf_config_dict(g)
    if generation is not None:
        generator_fields["decoder_start_token_id"] = generation.decoder_start_token_id
    generator_config = getattr(transformers, generator.hf_config_class)(
        **generator_fields, **generator.hf_export_extras(g, cfg.context.prefix))
    generator_table = generator.hf_table(g)
    return generator_config, generator_table


def run_record(answer_prefix_space: bool | None, index_identity: dict[str, Any] | None,
               ctx_index_identity: dict[str, Any] | None) -> dict[str, Any]:
    """The RUN_KEY record of an exported run (see RUN_KEY)."""
    run = {} if answer_prefix_space is None else {"answer_prefix_space": bool(answer_prefix_space)}
    if index_identity is not None:
        run["index_identity"] = dict(index_identity)
    if ctx_index_identity is not None:
        run["ctx_encoder_index_identity"] = dict(ctx_index_identity)
    return run


def _write_hf_rag(directory, model, params, rag_class, question_tokenizer, generator_tokenizer, generation,
                  answer_prefix_space, index_identity, doc_encoder, ctx_index_identity) -> None:
    cfg = model.config
    generator_config, generator_table = hf_generator(model, generation)
    run = run_record(answer_prefix_space, index_identity, ctx_index_identity)
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        transformers.DPRConfig(**hf.dpr_config_dict(model.question_encoder_config)),
        generator_config,
        n_docs=cfg.n_docs, max_combined_length=cfg.context.max_combined_length, title_sep=cfg.context.title_sep,
        doc_sep=cfg.context.doc_sep, label_smoothing=cfg.label_smoothing, exclude_bos_score=cfg.exclude_bos_score,
        reduce_loss=cfg.reduce_loss, do_deduplication=cfg.do_deduplication, **({RUN_KEY: run} if run else {}),
    )  # fmt: skip
    config.architectures = [rag_class]
    config.save_pretrained(directory)
    if generation is not None:
        transformers.GenerationConfig(**generation.to_hf()).save_pretrained(directory)

    tensors = hf.encoder_tensors(model.question_encoder_config, params["question_encoder"],
                                 hf.RAG_QUESTION_ENCODER_PREFIX)  # fmt: skip
    tensors.update(hf.export_tensors(params["generator"], generator_table, hf.RAG_GENERATOR_PREFIX))
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    question_tokenizer.save_pretrained(os.path.join(directory, tokenizers.RAG_QUESTION_SUBDIR))
    generator_tokenizer.save_pretrained(os.path.join(directory, tokenizers.RAG_GENERATOR_SUBDIR))
    if doc_encoder is not None:
        write_hf_encoder(os.path.join(directory, CTX_ENCODER_SUBDIR), *doc_encoder, "ctx", question_tokenizer)


def save_params_orbax(directory: str, params: dict[str, Any], run_config: dict[str, Any], *,
                      overwrite: bool = False) -> str:
    """A parameters-only orbax checkpoint (no optimizer state) for serving, with the run's config beside it; the
    directory appears only when complete (`new_directory`)."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top (only this export needs orbax)

    with new_directory(directory, overwrite=overwrite) as partial:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(partial, "params"), params)
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(run_config, f, indent=2, sort_keys=True)
    return directory


def load_params_orbax(directory: str) -> dict[str, Any]:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(os.path.abspath(directory), "params"))


# ---------------------------------------------------------------------------------------------------- encoders

DPR_ROLES = {"question": ("DPRQuestionEncoder", "question_encoder."), "ctx": ("DPRContextEncoder", "ctx_encoder.")}


def save_hf_encoder(directory: str, cfg, params: dict[str, Any], role: str, tokenizer, *,
                    overwrite: bool = False) -> str:
    """One trained retriever encoder as a directory that transformers and rag_jax load (hf.load_encoder, and so
    build_index --encoder and train_nq's model.*_encoder.init), as `write_hf_encoder` lays it out; the directory
    appears only when complete (`new_directory`)."""
    with new_directory(directory, overwrite=overwrite) as partial:
        write_hf_encoder(partial, cfg, params, role, tokenizer)
    return directory


def check_hf_encoder(cfg) -> None:
    """Refuses, naming the pooling, an encoder that no Hugging Face layout computes as rag_jax does."""
    if cfg.pooling not in ("cls", "mean") or (cfg.projection_dim and (cfg.pooling != "cls" or cfg.normalize)):
        raise hf.CheckpointError(f"an encoder with {cfg.pooling!r} pooling"
                                 f"{' and a projection' if cfg.projection_dim else ''} has no Hugging Face layout "
                                 "that keeps it; export the parameters alone (--format=orbax)")


def write_hf_encoder(directory: str, cfg, params: dict[str, Any], role: str, tokenizer, *,
                     sentence_transformers: bool = False, max_seq_length: int | None = None) -> None:
    """A DPRQuestionEncoder (`role` "question") or DPRContextEncoder ("ctx") for [CLS] pooling without
    normalisation, DPR's only kind; otherwise, or with `sentence_transformers`, (e.g. a fine-tuned
    all-MiniLM-L6-v2: mean pooling, L2 normalised) a sentence-transformers directory (BertModel + Pooling
    [+ Normalize]) that keeps the pooling, with `max_seq_length` (the length rag_jax cut its inputs at) in its
    sentence_bert_config.json. The tokenizer is saved beside the weights."""
    check_hf_encoder(cfg)
    if sentence_transformers and cfg.projection_dim:
        raise hf.CheckpointError("a DPR encoder with a projection has no sentence-transformers layout; export it "
                                 "as a DPR encoder")
    os.makedirs(directory, exist_ok=True)
    if cfg.pooling == "cls" and not cfg.normalize and not sentence_transformers:
        architecture, prefix = DPR_ROLES[role]
        config = transformers.DPRConfig(**hf.dpr_config_dict(cfg))
        config.architectures = [architecture]
        config.save_pretrained(directory)
        tensors = hf.encoder_tensors(cfg, params, prefix)
    else:
        _write_sentence_transformers_modules(directory, cfg, max_seq_length)
        tensors = hf.export_tensors(params, hf.bert_table(cfg), "")
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


def _write_sentence_transformers_modules(directory: str, cfg, max_seq_length: int | None = None) -> None:
    """config.json of a BertModel, and modules.json with the pooling (and normalisation) rag_jax trained with."""
    fields = hf.dpr_config_dict(dataclasses.replace(cfg, pooling="cls", normalize=False))
    fields.pop("projection_dim")
    config = transformers.BertConfig(**fields)
    config.architectures = ["BertModel"]
    config.save_pretrained(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if cfg.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(directory, "2_Normalize"))
    os.makedirs(os.path.join(directory, "1_Pooling"))
    with open(os.path.join(directory, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": cfg.hidden_size, "pooling_mode_cls_token": cfg.pooling == "cls",
                   "pooling_mode_mean_tokens": cfg.pooling == "mean", "pooling_mode_max_tokens": False}, f, indent=2)
    with open(os.path.join(directory, "modules.json"), "w") as f:
        json.dump(modules, f, indent=2)
    if max_seq_length is not None:
        with open(os.path.join(directory, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": int(max_seq_length), "do_lower_case": False}, f, indent=2)
