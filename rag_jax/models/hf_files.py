"""Reading Hugging Face checkpoint directories into numpy, without torch.

Supports `model.safetensors`, `pytorch_model.bin` (torch's zip pickle format, read with a restricted unpickler),
and their sharded variants (`*.index.json`). bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and what to do."""


def resolve(path: str) -> str:
    """A local checkpoint directory for `path`; a hub id is downloaded when `huggingface_hub` can reach a hub."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path}: expected a checkpoint directory (config.json + weights), got a file")
    if path.count("/") == 1 and not path.startswith((".", "/")):
        try:
            import huggingface_hub

            return huggingface_hub.snapshot_download(path)
        except Exception as e:  # noqa: BLE001 - any hub failure means "not available here"
            raise CheckpointError(
                f"{path}: no such directory, and downloading it as a hub id failed ({type(e).__name__}: {e}). "
                "Download the checkpoint on a machine with network access and pass its local directory."
            ) from e
    raise CheckpointError(f"{path}: no such checkpoint directory")


def read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing; a Hugging Face checkpoint directory needs config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e


def read_weights(directory: str) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of a checkpoint directory as {name: array}, and the file name they came from (for errors)."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".index.json"):
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            tensors = {}
            for shard in shards:
                tensors.update(_read_file(os.path.join(directory, shard)))
            return tensors, path
        return _read_file(path), path
    raise CheckpointError(f"{directory}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def _read_file(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing (named by the checkpoint's index file)")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return read_torch_pickle(path)


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a .safetensors file (8-byte header size, JSON header, raw little-endian data), memory-mapped."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if header_size is None or 8 + header_size > size:
            raise CheckpointError(f"{path}: truncated ({size} bytes, shorter than its header); copy or download "
                                  "the file again")
        try:
            header = json.loads(f.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size) if size > 8 + header_size else (
        np.zeros(0, np.uint8))  # (numpy cannot map zero bytes)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > len(data):  # a partial copy or download: its header names more data than the file holds
            raise CheckpointError(f"{path}: truncated ({size} bytes; tensor {name} ends at byte "
                                  f"{8 + header_size + end}); copy or download the file again")
        tensors[name] = data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


def _rebuild_tensor(storage, offset, size, stride, *unused):
    itemsize = storage.dtype.itemsize
    if not size:
        return storage[offset : offset + 1].reshape(()).copy()
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    ).copy()


def _rebuild_parameter(data, *unused):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles torch's `data.pkl` allowing only tensors, storages and ordered dicts (no code execution)."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _TORCH_STORAGE_DTYPES[name]
        raise CheckpointError(f"{self.path}: unsupported object {module}.{name} in the pickle")

    def persistent_load(self, pid):
        _, dtype, key, _location, _numel = pid
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        return np.frombuffer(raw, dtype=dtype)


def read_torch_pickle(path: str) -> dict[str, np.ndarray]:
    """Reads a `torch.save` state dict (zip format, torch >= 1.6) into numpy arrays."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a zip-format torch checkpoint (saved by torch < 1.6?). Re-save it with a recent torch "
            "or convert it to model.safetensors."
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not pickles:
            raise CheckpointError(f"{path}: no data.pkl inside; not a torch checkpoint")
        prefix = pickles[0][: -len("/data.pkl")]
        with archive.open(pickles[0]) as f:
            state = _TorchUnpickler(f, archive, prefix, path).load()
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return dict(state)
