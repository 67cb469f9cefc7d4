"""The device mesh and the one table that maps logical axis names onto it.

Every parameter and key activation of the models carries logical axis names (see rag_jax/models/layers.py):
  batch, length, embed, mlp, heads, kv, vocab, position, token_type,
plus RAG's own: docs (the K retrieved documents of a question) and corpus (the rows of the passage index).
`RULES` says which mesh axis each of them is split over. Mesh axis names ("data", "model") appear only in this
file; everything else asks for logical specs and turns them into shardings with the helpers below.

Data parallelism runs over `data` (the batch), tensor parallelism over `model` (vocabulary, MLP and attention
heads), and the passage index is split over every device of the mesh (both axes) so that a 21M-row index fits.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)

# Logical axis -> mesh axis (or axes, or None for replicated). Flax's rule semantics: per array dimension the first
# rule whose mesh axes are still free in that array is used.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", DATA),
    ("docs", None),
    ("length", None),
    ("embed", None),
    ("vocab", MODEL),
    ("mlp", MODEL),
    ("heads", MODEL),
    ("kv", None),
    ("position", None),
    ("token_type", None),
    ("corpus", (DATA, MODEL)),
)


class MeshError(ValueError):
    """The mesh asked for by the config cannot be built on these devices; the message names the field."""


def make_mesh(data: int = -1, model: int = 1, *, dcn_data: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: every device of every process).

    data = -1 takes all devices left after `model`. On TPU the device order follows the physical topology
    (mesh_utils.create_device_mesh); `dcn_data` > 1 spreads the data axis over that many slices of a multi-slice
    job (the model axis always stays within a slice). Axes are `Auto`: the compiler (GSPMD) propagates the
    shardings that the logical constraints pin down.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or n % model:
        raise MeshError(f"config mesh.model={model} must be a positive divisor of the {n} devices")
    if data == -1:
        data = n // model
    if data * model != n:
        raise MeshError(
            f"config mesh.data={data} x mesh.model={model} = {data * model} devices, but there are {n}; "
            "set mesh.data=-1 to use all devices"
        )
    if dcn_data > 1:
        if data % dcn_data:
            raise MeshError(f"config mesh.dcn_data={dcn_data} must divide mesh.data={data}")
        grid = mesh_utils.create_hybrid_device_mesh((data // dcn_data, model), (dcn_data, 1), devices)
    elif devices[0].platform == "tpu":
        grid = mesh_utils.create_device_mesh((data, model), devices)
    else:
        # Device order as given: on CPU/GPU (and in tests with a subset of devices) the ids are the layout, and
        # each process's devices come out as one contiguous block of the data axis.
        grid = np.asarray(devices, dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`make_mesh` from the `mesh` section of a run config (fields data, model, dcn_data)."""
    return make_mesh(
        int(mesh_config.data), int(mesh_config.model), dcn_data=int(mesh_config.get("dcn_data", 1)), devices=devices
    )


def data_size(mesh: Mesh) -> int:
    """How many ways the batch is split (the product of the mesh axes that `batch` maps to)."""
    return _axes_size(mesh, logical_to_spec(("batch",))[0])


def _axes_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    """The mesh PartitionSpec of an array whose dimensions have these logical names."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), RULES)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fit_spec(mesh: Mesh, spec: PartitionSpec, shape: Sequence[int]) -> PartitionSpec:
    """`spec` with the mesh axes that do not divide their dimension dropped (that dimension is replicated).

    jit needs evenly split arguments; BART's vocabulary (50,265 rows) cannot be split 2 ways, for example, so its
    embedding is replicated over `model` instead (activations may still be split unevenly: XLA pads those).
    """
    axes = tuple(spec) + (None,) * (len(shape) - len(spec))
    return PartitionSpec(*(a if a is None or size % _axes_size(mesh, a) == 0 else None for a, size in zip(axes, shape)))


def tree_shardings(mesh: Mesh, logical_specs: Any, shapes: Any) -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs (as `nn.get_partition_spec` returns them) of arrays
    with the matching `shapes` (a pytree of arrays or ShapeDtypeStructs), fitted with `fit_spec`."""
    mesh_specs = nn.logical_to_mesh(logical_specs, RULES)
    return jax.tree_util.tree_map(lambda spec, x: NamedSharding(mesh, fit_spec(mesh, spec, x.shape)),
                                  mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def corpus_axes() -> tuple[str, ...]:
    """The mesh axes the passage index rows are split over."""
    axes = logical_to_spec(("corpus",))[0]
    return axes if isinstance(axes, tuple) else (axes,)


def corpus_size(mesh: Mesh) -> int:
    return _axes_size(mesh, corpus_axes())


@contextlib.contextmanager
def use(mesh: Mesh) -> Iterator[None]:
    """Makes `mesh` and the rules current, so that the models' logical constraints apply when jit traces them."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


def host_local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (each row once, whatever the replication).

    The inverse of data/pipeline.make_global_batch: the rows this host fed in come back out.
    """
    shards: dict[int, Any] = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0 if shard.index else 0
        shards.setdefault(start, shard)
    return np.concatenate([np.asarray(jax.device_get(shards[s].data)) for s in sorted(shards)], axis=0)
