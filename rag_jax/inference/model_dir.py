"""A Hugging Face RAG directory, or an export of a run in pieces (export_pieces.py), read for answering: the model,
its parameters, and the defaults it carries.

The defaults are what eval_nq uses unless a flag says otherwise: the reader (the one whose transformers class
`architectures` names), the generation settings as transformers resolves them for each reader (RAG-Token:
generation_config.json, else config.json; RAG-Sequence: the generator's own `generate`, see
GenerationConfig.for_rag_sequence), and how gold answers are tokenised. A directory exported from a rag_jax run
(export.RUN_KEY in config.json) is answered as its workdir is: with the run's generation settings (its
generation_config.json) for every reader, and the run's answer tokenisation; so is an export in pieces (the
generator's generation_config.json), which also brings the run's index.
"""

from __future__ import annotations

import dataclasses
import json
import os

from rag_jax import rag
from rag_jax.inference import export, export_pieces
from rag_jax.models import hf
from rag_jax.readers import registry
from rag_jax.readers.generation import GenerationConfig


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """Answering defaults of a model directory or a training workdir."""

    reader: str  # the reader it answers with by default (rag_jax/readers/registry.py name)
    generation: dict[str, GenerationConfig]  # reader name -> decoding settings; other readers get `reader`'s
    answer_prefix_space: bool  # gold answers tokenised as " answer" (how rag_jax training labels are made)
    index: str | None = None  # the index the model was trained with, when known (a workdir's own)
    # The identity (index_io.IDENTITY_FIELDS) of the index the model was trained with, when known: a workdir's
    # index records it, an export of a run carries it (export.RUN_KEY); eval_nq refuses an index of another.
    index_identity: dict | None = None
    # A run that trains its document encoder may be past its last index refresh: the identity of the index its
    # checkpoint's d(z) makes (the export's export.CTX_ENCODER_SUBDIR), which eval_nq accepts too.
    ctx_encoder_index_identity: dict | None = None

    def generation_config(self, reader: str, **overrides) -> GenerationConfig:
        """The decoding settings for `reader` (a name or alias), with `overrides`."""
        name = registry.get(reader).name
        return dataclasses.replace(self.generation.get(name, self.generation[registry.get(self.reader).name]),
                                   **overrides)


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load(path: str) -> tuple[rag.Rag, dict, ModelDefaults]:
    """(model, params, defaults) of a Hugging Face RAG directory or an export in pieces."""
    return load_pieces(path) if export_pieces.is_pieces(path) else load_hf_rag(path)


def tokenizer_dirs(path: str) -> dict[str, str] | None:
    """{"question": ..., "generator": ...}: where an export in pieces keeps its tokenizers (None: not one)."""
    if not export_pieces.is_pieces(path):
        return None
    return {"question": os.path.join(path, export_pieces.QUESTION_ENCODER_SUBDIR),
            "generator": os.path.join(path, export_pieces.GENERATOR_SUBDIR)}


def load_pieces(path: str) -> tuple[rag.Rag, dict, ModelDefaults]:
    """(model, params, defaults) of an export in pieces: answered as the run's workdir is, from its own index."""
    spec = export_pieces.read_spec(path)
    question = hf.load_encoder(os.path.join(path, export_pieces.QUESTION_ENCODER_SUBDIR))
    generator_dir = os.path.join(path, export_pieces.GENERATOR_SUBDIR)
    generator = hf.load_generator(generator_dir)
    q_config = dataclasses.replace(question.config, score_scale=float(spec.get(export_pieces.SCORE_SCALE_KEY, 1.0)))
    model = rag.Rag(q_config, generator.config, export_pieces.rag_config_from_json(spec["rag"]))
    params = {"question_encoder": question.params, "generator": generator.params}
    generation = GenerationConfig.from_hf(_read_json(os.path.join(generator_dir, export.GENERATION_CONFIG_FILE)))
    run = spec[export.RUN_KEY]
    index = os.path.join(path, export_pieces.INDEX_SUBDIR)
    reader = registry.get(spec.get("reader") or spec["model_type"]).name  # "model_type": exports before readers
    defaults = ModelDefaults(
        reader=reader, generation={reader: generation},
        answer_prefix_space=bool(run.get("answer_prefix_space", False)), index=index if os.path.isdir(index) else None,
        index_identity=run.get("index_identity"), ctx_encoder_index_identity=run.get("ctx_encoder_index_identity"))
    return model, params, defaults


def load_hf_rag(path: str) -> tuple[rag.Rag, dict, ModelDefaults]:
    """(model, params, defaults) of a Hugging Face RAG directory."""
    loaded = hf.load_rag(path)
    model = rag.Rag(loaded.question_encoder.config, loaded.generator.config, rag.RagConfig.from_hf(loaded.hf_config))
    params = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params}
    reader = registry.for_hf_architecture((loaded.hf_config.get("architectures") or [None])[0])
    generation_file = _read_json(os.path.join(loaded.directory, export.GENERATION_CONFIG_FILE))
    run = loaded.hf_config.get(export.RUN_KEY)
    if run is not None and generation_file is not None:  # a rag_jax export: the run's settings for every reader
        generation = {reader.name: GenerationConfig.from_hf(generation_file)}
    else:
        hf_readers = [registry.get(name) for name in registry.BUILTIN]
        generation = {r.name: r.hf_generation_config(loaded.hf_config, generation_file) for r in hf_readers}
    defaults = ModelDefaults(
        reader=reader.name,
        generation=generation,
        answer_prefix_space=bool((run or {}).get("answer_prefix_space", False)),
        index_identity=(run or {}).get("index_identity"),
        ctx_encoder_index_identity=(run or {}).get("ctx_encoder_index_identity"),
    )
    return model, params, defaults
