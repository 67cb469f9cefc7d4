"""The tables that map Hugging Face tensor names to rag_jax parameter paths, and the conversion both ways.

Each architecture has one table of (Hugging Face tensor name, rag_jax parameter path, layout); the same table
serves import and export, so the two cannot drift apart. Layouts:
  "copy"   the same array,
  "flat"   Hugging Face keeps it 1-D, rag_jax may split it (attention biases: (H*D,) <-> (H, D)),
  "row"    Hugging Face keeps a (1, N) row, rag_jax a vector (N,) (BART's final_logits_bias),
  "linear" a torch Linear weight (out, in) <-> a kernel (in..., out...); `n_in` input axes on our side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from rag_jax.models.hf_files import CheckpointError

@dataclasses.dataclass(frozen=True)
class Entry:
    hf_name: str  # without the checkpoint's prefix
    path: tuple[str, ...]  # path in the rag_jax parameter tree
    layout: str = "copy"  # "copy", "flat", "row" or "linear"
    n_in: int = 1  # number of input axes of a "linear" kernel on the rag_jax side


def linear(hf: str, path: tuple[str, ...], n_in: int = 1) -> list[Entry]:
    return [Entry(f"{hf}.weight", path + ("kernel",), "linear", n_in), Entry(f"{hf}.bias", path + ("bias",), "flat")]


def norm(hf: str, path: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{hf}.weight", path + ("scale",)), Entry(f"{hf}.bias", path + ("bias",))]


def attention(hf: dict[str, str], path: tuple[str, ...]) -> list[Entry]:
    """hf maps our projection names (query/key/value/out) to the checkpoint's module names."""
    entries = []
    for ours in ("query", "key", "value"):
        entries += linear(hf[ours], path + (ours,))
    return entries + linear(hf["out"], path + ("out",), n_in=2)



_IGNORED_SUFFIXES = ("position_ids", "embeddings.token_type_ids", "_float_tensor")


def expected_shapes(module: nn.Module, *example_args) -> dict[str, Any]:
    """The parameter tree of `module` as ShapeDtypeStructs, without allocating it."""
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *example_args))
    return nn.meta.unbox(variables)["params"]


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _to_hf(array: np.ndarray, entry: Entry) -> np.ndarray:
    """The inverse of `_to_ours`."""
    if entry.layout == "linear":
        return array.reshape(int(np.prod(array.shape[: entry.n_in])), -1).T
    if entry.layout == "flat":
        return array.reshape(-1)
    if entry.layout == "row":
        return array.reshape(1, -1)
    return array


def _to_ours(array: np.ndarray, entry: Entry, shape: tuple[int, ...]) -> np.ndarray:
    transposed = array.T if entry.layout == "linear" else array
    # A transposed kernel of the wrong size can still have the right number of values: compare the split too.
    expected_out = int(np.prod(shape[entry.n_in :])) if entry.layout == "linear" else None
    if array.size != int(np.prod(shape)) or (expected_out is not None and array.shape[0] != expected_out):
        raise ValueError(f"has shape {tuple(array.shape)}, which does not fit rag_jax's {shape}")
    return transposed.reshape(shape)


def convert(
    tensors: dict[str, np.ndarray],
    prefix: str,
    table: list[Entry],
    shapes: dict[str, Any],
    source: str,
    *,
    optional: tuple[str, ...] = (),
    dtype=np.float32,
) -> dict[str, Any]:
    """Builds the rag_jax parameter tree from checkpoint tensors named `prefix + entry.hf_name`.

    Missing tensors (other than `optional` ones, which default to zeros) and shape mismatches raise a
    CheckpointError naming `source` (the weights file) and the tensor.
    """
    params: dict[str, Any] = {}
    for entry in table:
        name = prefix + entry.hf_name
        shape = tuple(_get(shapes, entry.path).shape)
        if name not in tensors:
            if entry.hf_name in optional:
                _set(params, entry.path, np.zeros(shape, dtype))
                continue
            raise CheckpointError(f"{source}: missing weight {name} (for rag_jax parameter {'/'.join(entry.path)})")
        try:
            value = _to_ours(np.asarray(tensors[name]), entry, shape)
        except ValueError as e:
            raise CheckpointError(f"{source}: weight {name} {e} (config.json and weights disagree?)") from None
        _set(params, entry.path, np.asarray(value, dtype))
    return params


def check_unexpected(tensors: dict[str, np.ndarray], used: set[str], source: str) -> None:
    unexpected = [n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected weight(s): {shown}. The checkpoint's architecture does not match "
            "its config.json, or it is not a BERT/DPR/BART/RAG checkpoint."
        )


def export_tensors(params: dict[str, Any], table: list[Entry], prefix: str) -> dict[str, np.ndarray]:
    """{Hugging Face name: array} for rag_jax parameters: the inverse of `convert` (float32; float64 stays float64,
    for the float64 parity tests)."""
    return {prefix + e.hf_name: np.ascontiguousarray(_to_hf(_at_least_float32(_get(params, e.path)), e)) for e in table}


def _at_least_float32(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.promote_types(x.dtype, np.float32))
