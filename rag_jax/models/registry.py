"""The generator architectures RAG can use, by name: what every place that builds, imports, exports, sizes or counts
a generator asks instead of switching on "bart" / "t5".

A run config names one (`model.generator.architecture`); its entry (`Generator`) carries the config class, the
flax module, the Hugging Face import/export tables, the FLOP formula and the config checks. A built-in name is the
module that registers it (BUILTIN, imported on first use, so that this module stays light: the config checks use it
before jax loads). Adding an architecture = one new module that calls `register` plus one line in BUILTIN. An entry
registered elsewhere (a test, a user's package) is named `package.module:name`: the module is imported, it registers
`name`, and every process that reads the config (training, eval_nq, export) finds it the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from rag_jax import named

# name -> the module that registers it
BUILTIN = {"bart": "rag_jax.models.bart_generator", "t5": "rag_jax.models.t5_generator"}



@dataclasses.dataclass(frozen=True)
class TokenizerKind:
    """How to recognise and load the tokenizer family an architecture's checkpoints come with."""

    cls: str  # transformers class name, e.g. "BartTokenizerFast"
    file_sets: tuple[tuple[str, ...], ...]  # one of these sets of files must be in a local tokenizer directory
    probe: str  # a token every real vocabulary of the family has (checked after loading)
    what: str  # for messages: "Generator (BART)"
    matches: Callable[[str], bool] | None = None  # whether a directory / hub id holds this family; None: the default


@dataclasses.dataclass(frozen=True)
class Generator:
    """One generator architecture. The module class takes the config and has BART's methods (encode, decode,
    __call__, init_cache, decode_step, lm_head_arrays: rag_jax/models/bart.py's docstring)."""

    name: str  # config model.generator.architecture
    config_class: type  # frozen dataclass with vocab_size, pad/bos/eos/decoder_start token ids, dtype
    module_class: type  # flax module built from a config_class instance
    hf_model_type: str  # config.json model_type of its Hugging Face checkpoints
    hf_config_class: str  # the transformers config class an export writes, e.g. "BartConfig"
    # From a run config's model.generator section (random init) and the compute dtype to a config_class instance.
    config_from_run: Callable[[Any, Any], Any]
    # Writes an instance's sizes into a model.generator section (compile_nq compiles checkpoints' sizes, no weights).
    sizes_to_run: Callable[[Any, Any], None]
    # A run config's problem for this architecture (naming the field), or None; checked before the model builds.
    check_run_config: Callable[[Any], str | None]
    config_from_hf: Callable[..., Any]  # (config.json dict, **overrides) -> config: sizes only
    # (tensors, prefix, config.json dict, source, used names, **overrides) -> (config, numpy params); adds the tensor
    # names it read to `used`.
    params_from_hf: Callable[..., tuple[Any, Any]]
    load: Callable[..., Any]  # (checkpoint directory, **overrides) -> hf.Loaded of a standalone checkpoint
    hf_table: Callable[[Any], list]  # config -> hf_tables.Entry list (import and export)
    hf_config_dict: Callable[[Any], dict[str, Any]]  # config -> fields of hf_config_class
    hf_export_extras: Callable[[Any, str], dict[str, Any]]  # (config, context prefix) -> fields said explicitly
    forward_flops: Callable[[Any, int, int, int], int]  # (config, rows, source length, target length) -> matmul FLOPs
    tokenizer: TokenizerKind


_REGISTRY = named.Registry(BUILTIN, "generator architecture", "rag_jax.models.registry")
register, known, names, get = _REGISTRY.register, _REGISTRY.known, _REGISTRY.names, _REGISTRY.get


def for_config(config: Any) -> Generator:
    """The entry whose config class `config` is an instance of (exactly that class)."""
    for name in BUILTIN:
        get(name)
    for entry in _REGISTRY.entries():
        if type(config) is entry.config_class:
            return entry
    raise ValueError(f"no generator architecture is registered for {type(config).__name__}")


def for_hf(model_type: str | None) -> Generator | None:
    """The entry for a Hugging Face checkpoint's model_type: the built-in of that name, else a registered entry that
    imports it; None for none."""
    if model_type in BUILTIN:
        return get(model_type)
    return next((e for e in _REGISTRY.entries() if e.hf_model_type == model_type), None)


def hf_model_types() -> list[str]:
    """The model_types the registered (and built-in) architectures import."""
    for name in BUILTIN:
        get(name)
    return sorted({e.hf_model_type for e in _REGISTRY.entries()})


def tokenizer_kind(path: str) -> TokenizerKind:
    """The tokenizer family of a generator tokenizer at `path` (a directory or hub id): the first whose `matches`
    says so, else the default family (the one with no `matches`: BART's byte-level BPE)."""
    for name in BUILTIN:
        get(name)
    kinds = list({id(e.tokenizer): e.tokenizer for e in _REGISTRY.entries()}.values())
    for kind in kinds:
        if kind.matches is not None and kind.matches(path):
            return kind
    return next(kind for kind in kinds if kind.matches is None)
