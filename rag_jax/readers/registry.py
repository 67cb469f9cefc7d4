"""The readers RAG can answer with, by name: what the training step, dev evaluation, eval_nq, ask, export,
compile_nq and the benchmarks ask instead of branching on "sequence" / "token".

A run config names one (`model.reader`); a reader (base.Reader) owns its loss, its decoding and its provenance
terms. A built-in name is the module that registers it (BUILTIN, imported on first use, so that this module stays
light: the config checks use it before jax loads). Adding a reader = one new module that calls `register` plus one
line in BUILTIN. A reader registered elsewhere (a test, a user's package) is named `package.module:name`: the module
is imported, it registers `name`, and every process that reads the config finds it the same way.

`model.loss` ("sequence" / "token") and eval_nq's --model_type are the old names of model.reader and --reader:
ALIASES maps their values, and `note_deprecated` says so once.
"""

from __future__ import annotations

import sys
from typing import Any

from rag_jax import named

# name -> the module that registers it
BUILTIN = {"rag_sequence": "rag_jax.readers.rag_sequence", "rag_token": "rag_jax.readers.rag_token",
           "fid": "rag_jax.readers.fid"}
# model.loss / --model_type values -> reader names
ALIASES = {"sequence": "rag_sequence", "token": "rag_token"}

_NOTED: set[str] = set()


_REGISTRY = named.Registry(BUILTIN, "reader named", "rag_jax.readers.registry", ALIASES)
register, known, names, get = _REGISTRY.register, _REGISTRY.known, _REGISTRY.names, _REGISTRY.get


def for_hf_architecture(architecture: str | None) -> Any:
    """The reader a Hugging Face RAG checkpoint's `architectures` entry stands for; RAG-Sequence when it names none
    (transformers' RagModel)."""
    for name in BUILTIN:
        if architecture is not None and get(name).hf_architecture == architecture:
            return get(name)
    return get("rag_sequence")


def note_deprecated(what: str, instead: str) -> None:
    """One line on stderr, once per process, that `what` is an old name and `instead` says it now."""
    if what not in _NOTED:
        _NOTED.add(what)
        print(f"note: {what} is deprecated; use {instead}", file=sys.stderr, flush=True)


def configured_name(model_config: Any) -> str:
    """The reader a run config's model section selects: model.reader, or model.loss where it is set (the old field;
    configs saved before model.reader existed have only it, and a note is printed when a config with model.reader
    sets it)."""
    loss = model_config.get("loss")
    if loss is None:
        return model_config.get("reader", "rag_sequence")
    if "reader" in model_config:
        note_deprecated(f"config model.loss={loss!r}", f"model.reader={ALIASES.get(loss, loss)!r}")
    return ALIASES.get(loss, loss)


def from_config(config: Any) -> Any:
    """The reader of a run config (`configured_name` of config.model)."""
    return get(configured_name(config.model))
