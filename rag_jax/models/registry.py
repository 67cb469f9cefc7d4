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
import importlib
import importlib.util
from typing import Any, Callable

# name -> the module that registers it
BUILTIN = {"bart": "rag_jax.models.bart_generator", "t5": "rag_jax.models.t5_generator"}

_ENTRIES: dict[str, "Generator"] = {}


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


def register(entry: Generator) -> Generator:
    """Adds (or replaces) `entry` under its name."""
    _ENTRIES[entry.name] = entry
    return entry


def _split(name: str) -> tuple[str | None, str]:
    """("package.module", "entry") of "package.module:entry", (BUILTIN module or None, name) of a plain name."""
    if ":" in name:
        module, _, entry = name.partition(":")
        return module, entry
    return BUILTIN.get(name), name


def known(name: Any) -> bool:
    """Whether `name` can name an architecture, without importing anything heavy (for the config checks)."""
    if not isinstance(name, str) or not name:
        return False
    if name in _ENTRIES:
        return True
    module, entry = _split(name)
    if module is None or not entry:
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def names() -> list[str]:
    """The built-in names and those registered so far."""
    return sorted(set(BUILTIN) | set(_ENTRIES))


def get(name: str) -> Generator:
    """The entry `name` names (a built-in, a registered name, or `package.module:name`). Raises ValueError naming
    the known ones."""
    if name not in _ENTRIES:
        module, entry = _split(name)
        if module is not None:
            importlib.import_module(module)
        name = entry
    if name not in _ENTRIES:
        raise ValueError(f"no generator architecture {name!r}; known: {', '.join(names())} (or 'package.module:name' "
                       "of a module that registers one with rag_jax.models.registry.register)")
    return _ENTRIES[name]


def for_config(config: Any) -> Generator:
    """The entry whose config class `config` is an instance of (exactly that class)."""
    for name in BUILTIN:
        get(name)
    for entry in _ENTRIES.values():
        if type(config) is entry.config_class:
            return entry
    raise ValueError(f"no generator architecture is registered for {type(config).__name__}")


def for_hf(model_type: str | None) -> Generator | None:
    """The entry for a Hugging Face checkpoint's model_type: the built-in of that name, else a registered entry that
    imports it; None for none."""
    if model_type in BUILTIN:
        return get(model_type)
    return next((e for e in _ENTRIES.values() if e.hf_model_type == model_type), None)


def hf_model_types() -> list[str]:
    """The model_types the registered (and built-in) architectures import."""
    for name in BUILTIN:
        get(name)
    return sorted({e.hf_model_type for e in _ENTRIES.values()})


def tokenizer_kind(path: str) -> TokenizerKind:
    """The tokenizer family of a generator tokenizer at `path` (a directory or hub id): the first whose `matches`
    says so, else the default family (the one with no `matches`: BART's byte-level BPE)."""
    for name in BUILTIN:
        get(name)
    kinds = list({id(e.tokenizer): e.tokenizer for e in _ENTRIES.values()}.values())
    for kind in kinds:
        if kind.matches is not None and kind.matches(path):
            return kind
    return next(kind for kind in kinds if kind.matches is None)
