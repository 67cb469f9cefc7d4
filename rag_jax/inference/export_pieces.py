"""Export of a run whose question encoder transformers' RAG classes cannot express (mean pooling or L2
normalisation, e.g. all-MiniLM-L6-v2: DPR, RAG's question encoder, has [CLS] pooling only), as pieces that
transformers loads one by one:

  OUT/rag_jax_export.json   what ties the pieces together: the layout, the run's model type (RAG-Sequence/-Token),
                            the RAG settings (rag.RagConfig: n_docs, the context format, ...) and export.RUN_KEY's
                            record (answer tokenisation, the identity of the index the run was trained with)
  OUT/generator/            BartForConditionalGeneration / T5ForConditionalGeneration (save_pretrained layout, with
                            the run's generation settings in generation_config.json) and the generator's tokenizer
  OUT/question_encoder/     a sentence-transformers directory (modules.json, config.json of a BertModel, the
                            weights, 1_Pooling/config.json, 2_Normalize/, sentence_bert_config.json) and the
                            question tokenizer
  OUT/ctx_encoder/          the run's document encoder in the same layout (as export.save_hf_rag's ctx_encoder/)
  OUT/index/                the run's index (index_io layout) with the passages file it was built from, which its
                            index.json names relative to it; files are hard-linked where the filesystem allows

model_dir.load answers from such a directory exactly as from the run's workdir (eval_nq --model=OUT, its own index
by default). docs/export.md shows how to load the pieces with transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import transformers
from safetensors.numpy import save_file

from rag_jax import files, rag
from rag_jax.inference import export
from rag_jax.readers import registry as readers
from rag_jax.readers.generation import GenerationConfig
from rag_jax.models import bert, hf
from rag_jax.retrieval import corpus, index_io
from rag_jax.retrieval.contexts import ContextFormat

SPEC_FILE = "rag_jax_export.json"
SCORE_SCALE_KEY = "question_score_scale"  # the retrieval score scale of the run (retrieval.score_scale)
LAYOUT = "transformers-pieces"
GENERATOR_SUBDIR = "generator"
QUESTION_ENCODER_SUBDIR = "question_encoder"
INDEX_SUBDIR = "index"


def rag_layout_fits(model: rag.Rag) -> bool:
    """Whether transformers' RAG classes compute the model's question encoder (DPR: [CLS], not normalised, scores
    on their own scale)."""
    q = model.question_encoder_config
    return q.pooling == "cls" and not q.normalize and q.score_scale == 1.0 and not q.learn_score_scale


def is_pieces(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SPEC_FILE))


def rag_config_to_json(config: rag.RagConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def rag_config_from_json(fields: dict[str, Any]) -> rag.RagConfig:
    return rag.RagConfig(**{**fields, "context": ContextFormat(**fields["context"])})


def save_hf_pieces(
    directory: str,
    model: rag.Rag,
    params: dict[str, Any],
    reader: str,
    question_tokenizer,
    generator_tokenizer,
    *,
    generation: GenerationConfig,
    question_max_length: int,
    answer_prefix_space: bool | None = None,
    index_identity: dict[str, Any] | None = None,
    doc_encoder: tuple[bert.BertConfig, dict[str, Any]] | None = None,
    ctx_index_identity: dict[str, Any] | None = None,
    index_dir: str | None = None,
    overwrite: bool = False,
) -> str:
    """Writes the model as the pieces above (arguments as export.save_hf_rag's; `question_max_length`: the length
    questions were cut at, for sentence_bert_config.json; `index_dir`: the run's index, copied in when given). The
    directory appears only when complete (export.new_directory)."""
    export.check_hf_encoder(model.question_encoder_config)
    if doc_encoder is not None:
        export.check_hf_encoder(doc_encoder[0])
    with export.new_directory(directory, overwrite=overwrite) as partial:
        _write_generator(os.path.join(partial, GENERATOR_SUBDIR), model, params["generator"], generation,
                         generator_tokenizer)
        export.write_hf_encoder(os.path.join(partial, QUESTION_ENCODER_SUBDIR), model.question_encoder_config,
                                params["question_encoder"], "question", question_tokenizer,
                                sentence_transformers=True, max_seq_length=question_max_length)
        if doc_encoder is not None:
            cfg = doc_encoder[0]
            max_length = (index_identity or {}).get("max_length")
            export.write_hf_encoder(os.path.join(partial, export.CTX_ENCODER_SUBDIR), *doc_encoder, "ctx",
                                    question_tokenizer, sentence_transformers=not cfg.projection_dim,
                                    max_seq_length=max_length)
        if index_dir is not None:
            copy_index(index_dir, os.path.join(partial, INDEX_SUBDIR))
        # The retrieval score scale (retrieval.score_scale, learnt or fixed): sentence-transformers' files have no
        # place for it, and the priors p(z|x) of the run are softmaxes of scale x q(x)·d(z).
        scale = bert.effective_score_scale(model.question_encoder_config, params["question_encoder"])
        spec = {"layout": LAYOUT, "reader": readers.get(reader).name, "rag": rag_config_to_json(model.config),
                SCORE_SCALE_KEY: scale,
                export.RUN_KEY: export.run_record(answer_prefix_space, index_identity, ctx_index_identity)}
        files.write_json(os.path.join(partial, SPEC_FILE), spec)
    return directory


def _write_generator(directory: str, model: rag.Rag, params: dict[str, Any], generation: GenerationConfig,
                     tokenizer) -> None:
    config, table = export.hf_generator(model, generation)
    config.architectures = [{"bart": "BartForConditionalGeneration", "t5": "T5ForConditionalGeneration"}[
        config.model_type]]
    config.save_pretrained(directory)
    transformers.GenerationConfig(**generation.to_hf()).save_pretrained(directory)
    save_file(hf.export_tensors(params, table, ""), os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (index files are replaced by renames, never rewritten in place, so the two stay the same), or a
    copy across filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_index(index_dir: str, target: str) -> None:
    """The complete index at `index_dir` and its passages file into `target`, which names the passages relative to
    itself, so that the copy can move."""
    index = index_io.load_index(index_dir, check_shards=False)  # complete, and its passages file where it says
    source = os.path.realpath(index_dir)
    for root, _, names in os.walk(source):
        os.makedirs(os.path.join(target, os.path.relpath(root, source)), exist_ok=True)
        for name in names:
            if name != index_io.METADATA_FILE or root != source:
                _link_or_copy(os.path.join(root, name), os.path.join(target, os.path.relpath(root, source), name))
    passages = "passages." + corpus.corpus_format(index.passages.path)  # an uncompressed .tsv or .jsonl
    _link_or_copy(index.passages.path, os.path.join(target, passages))
    index_io.write_metadata(target, {**index.metadata, "passages_path": passages})


def read_spec(path: str) -> dict[str, Any]:
    where = os.path.join(path, SPEC_FILE)
    with open(where, encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("layout") != LAYOUT:
        raise hf.CheckpointError(f"{where}: layout {spec.get('layout')!r}; this rag_jax reads {LAYOUT!r}")
    return spec
