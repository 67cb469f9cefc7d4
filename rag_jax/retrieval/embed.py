"""The embedding job: every passage through the document encoder d(z), written into a resumable index directory.

Passages are encoded the DPR way, title and text as a BERT sentence pair, pooled output (the [CLS] state for DPR).
Batches have a fixed number of rows and their length rounded up to a bucket, so the jitted encoder compiles once
per bucket, not once per batch. Within a window of SORT_WINDOW batches, passages are batched by token length, so a
batch pads to its own passages' lengths rather than to the longest of a random sample (on the DPR corpus about a
third fewer tokens to encode); the vectors are written back in corpus order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from rag_jax import files
from rag_jax.models import bert
from rag_jax.retrieval import corpus, index_io, index_writer, multihost, scann_backend

BUCKET = 32  # sequence lengths are rounded up to a multiple of this
SORT_WINDOW = 32  # batches whose passages are grouped by length together
_KEYS = ("input_ids", "attention_mask", "token_type_ids")
# XLA:CPU runs the encoder's matmuls faster without YNNPACK fusions (about 1.2x passages/s on the bench's 4-layer
# 256-wide encoder, the same vectors to 2e-6). Only this executable gets the option: the training step and
# decoding run slower without those fusions.
_CPU_ENCODER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


# BertConfig fields added after indexes were first built, with the value every earlier encoder had. At that value
# they are left out of the fingerprint, so an index built before the field existed still matches its encoder.
_LATER_FIELDS = {"normalize": False, "score_scale": 1.0, "learn_score_scale": False}


def _config_identity(config: bert.BertConfig) -> str:
    """The dataclass repr of `config` (every field: pooling, normalize, sizes, ...), less `_LATER_FIELDS` at their
    old values."""
    fields = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
              if not (f.name in _LATER_FIELDS and getattr(config, f.name) == _LATER_FIELDS[f.name])]  # fmt: skip
    return f"{type(config).__name__}({', '.join(fields)})"


def encoder_fingerprint(config: bert.BertConfig, params: Any) -> str:
    """A short identity of an encoder (config and weights): an index records it and refuses other encoders."""
    digest = hashlib.sha256(_config_identity(config).encode())
    for leaf in jax.tree_util.tree_leaves(params):
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return digest.hexdigest()[:16]


# Texts whose token ids show how a tokenizer normalises (case, accents, punctuation) and splits pairs.
_PROBES = (("Hello World", "Ünïcödé déjà-vu, 1,234.5!"), ("the cat's HAT", "naïve café"))


def tokenizer_fingerprint(tokenizer) -> str:
    """A short identity of a tokenizer: its vocabulary and what it makes of a few probe texts (so lower-casing and
    accent stripping count), not where it was loaded from."""
    digest = hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode())
    for pair in _PROBES:
        digest.update(repr(tokenizer(*pair)["input_ids"]).encode())
    return digest.hexdigest()[:16]


def index_identity(config: bert.BertConfig, tokenizer, max_length: int) -> dict[str, Any]:
    """The index_io.RECORDED_IDENTITY fields of an index this encoder, tokenizer and length make."""
    return {"pooling": config.pooling, "normalize": bool(getattr(config, "normalize", False)),
            "max_length": int(max_length), "tokenizer_id": tokenizer_fingerprint(tokenizer)}


def bucketed_length(length: int, max_length: int) -> int:
    return min(max_length, -(-length // BUCKET) * BUCKET)


def _tokenize_pairs(tokenizer, passages: Sequence[corpus.Passage], max_length: int):
    """(title, text) sentence pairs, truncated, unpadded (lists of token ids per key)."""
    titles, texts = [p.title for p in passages], [p.text for p in passages]
    return tokenizer(titles, texts, truncation="longest_first", max_length=max_length)


def _padded(encoded, picks: Sequence[int], rows: int, max_length: int) -> dict[str, np.ndarray]:
    """int32 arrays (rows, L) of the encoded passages `picks`, L their longest rounded up to a bucket; rows beyond
    len(picks) are all padding."""
    length = bucketed_length(max(len(encoded["input_ids"][i]) for i in picks), max_length)
    batch = {}
    for key in _KEYS:
        array = np.zeros((rows, length), np.int32)
        for row, i in enumerate(picks):
            array[row, : len(encoded[key][i])] = encoded[key][i]
        batch[key] = array
    return batch


def tokenize_passages(tokenizer, passages: Sequence[corpus.Passage], rows: int, max_length: int) -> dict[str, np.ndarray]:
    """(title, text) sentence pairs as int32 arrays (rows, L); rows beyond len(passages) are all padding."""
    return _padded(_tokenize_pairs(tokenizer, passages, max_length), range(len(passages)), rows, max_length)


def doc_token_table(tokenizer, passages: Sequence[corpus.Passage], max_length: int,
                    chunk: int = 4096) -> np.ndarray:
    """Every passage's document-encoder tokens as build_index tokenises them, one int32 row each (N, 1 + 2L):
    column 0 the token count, then L ids, then L token types (L = max_length; 0-padded). Device retrieval keeps it
    on the devices beside the embeddings, so that end-to-end training can embed retrieved passages again."""
    table = np.zeros((len(passages), 1 + 2 * max_length), np.int32)
    for start in range(0, len(passages), chunk):
        encoded = _tokenize_pairs(tokenizer, passages[start:start + chunk], max_length)
        for i, (ids, types) in enumerate(zip(encoded["input_ids"], encoded["token_type_ids"]), start):
            table[i, 0] = len(ids)
            table[i, 1:1 + len(ids)] = ids
            table[i, 1 + max_length:1 + max_length + len(types)] = types
    return table


def split_doc_tokens(table_XxT: jax.Array) -> dict[str, jax.Array]:
    """doc_token_table rows (any leading shape) -> {"doc_input_ids", "doc_attention_mask", "doc_token_type_ids"}."""
    length = (table_XxT.shape[-1] - 1) // 2
    mask = (jnp.arange(length) < table_XxT[..., :1]).astype(jnp.int32)
    return {"doc_input_ids": table_XxT[..., 1:1 + length], "doc_attention_mask": mask,
            "doc_token_type_ids": table_XxT[..., 1 + length:]}


def embed_passages(encode, params, tokenizer, passages: Sequence[corpus.Passage], batch_size: int, max_length: int,
                   on_batch: Callable[[int], object] = lambda n: None) -> np.ndarray:  # fmt: skip
    """Vectors (len(passages), D) in the order given, encoded in batches of passages of similar token length;
    on_batch(n) after each batch of n passages."""
    encoded = _tokenize_pairs(tokenizer, passages, max_length)
    order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
    vectors = None
    for start in range(0, len(order), batch_size):
        picks = order[start : start + batch_size]
        out = np.asarray(encode(params, _padded(encoded, picks, batch_size, max_length)))[: len(picks)]
        if vectors is None:
            vectors = np.empty((len(passages), out.shape[1]), out.dtype)
        vectors[picks] = out
        on_batch(len(picks))
    return vectors


@functools.lru_cache(maxsize=8)
def make_encode_fn(config: bert.BertConfig):
    """A jitted function (params, batch) -> pooled vectors (B, D) float32 (one per config, so its compilations are
    reused by later build_index calls in the same process)."""
    module = bert.BertEncoder(config)

    def encode(params, batch):
        _, pooled = module.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        )
        return pooled

    return jax.jit(encode, compiler_options=_CPU_ENCODER_OPTIONS if jax.default_backend() == "cpu" else None)


def embed_questions(cfg: bert.BertConfig, params, tokenizer, questions: list[str], batch_size: int,
                     max_length: int) -> np.ndarray:
    """Question vectors (Q, D), without dropout, in fixed-shape batches."""
    encode = make_encode_fn(cfg)
    out = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        t = tokenizer(chunk + [""] * (batch_size - len(chunk)), max_length=max_length, truncation=True,
                      padding="max_length", return_tensors="np")
        batch = {k: t[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
        out.append(np.asarray(encode(params, batch))[: len(chunk)])
    return np.concatenate(out)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def build_index(
    config: bert.BertConfig,
    params: Any,
    tokenizer,
    passages_path: str,
    output_dir: str,
    *,
    encoder_id: str | None = None,
    batch_size: int = 128,
    max_length: int = 256,
    shard_size: int = 100_000,
    dtype: str = "float32",
    backend: str = "exact",
    progress: bool = True,
    all_hosts: bool = False,
    host_index: int | None = None,
    num_hosts: int | None = None,
    devices_per_host: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> index_io.Index | None:
    """Embeds `passages_path` into `output_dir`, resuming after the last complete shard; returns the loaded index.

    By default this process embeds every passage. all_hosts=True: every process of the JAX job makes this call
    at once and each embeds and writes only its own rows (index_io.host_rows for host jax.process_index() of
    jax.process_count(), placed for devices_per_host = jax.local_device_count()); the hosts meet at a barrier,
    each writes index.json (identical content, so a shared filesystem and per-host disks both work) and returns
    the index, having checked it can read its own rows. host_index / num_hosts instead build one host's part
    without JAX collectives (separate jobs, or one machine building every part in turn): the call that
    completes the last part writes index.json and returns the index, earlier ones return None.

    `backend="scann"` also builds and saves a ScaNN searcher: over the whole index on one host, over each host's
    own rows (multihost.MultiHostScannSearcher) on several.

    devices: this process's devices to embed on (params replicated, each batch's rows split over them; a training
    run's index refresh passes its mesh's local devices); None: the default device.
    """
    if backend not in ("exact", "scann"):
        raise ValueError(f"backend must be 'exact' or 'scann', got {backend!r}")
    if (host_index is None) != (num_hosts is None) or (all_hosts and host_index is not None):
        raise ValueError("pass host_index and num_hosts together, or all_hosts=True (which takes them from JAX)")
    collective = all_hosts and jax.process_count() > 1
    if all_hosts:
        host_index, num_hosts = jax.process_index(), jax.process_count()
    elif host_index is None:
        host_index, num_hosts = 0, 1
    if devices_per_host is None:
        devices_per_host = jax.local_device_count() if num_hosts > 1 else 1
    if not 1 <= max_length <= config.max_position_embeddings:
        raise index_io.IndexFormatError(
            f"max_length={max_length} must lie in [1, {config.max_position_embeddings}], the document encoder's "
            "positions; lower it (build_index --max_length, config index.max_length)")
    encoder_id = encoder_id or encoder_fingerprint(config, params)
    writer = index_writer.IndexWriter(
        output_dir, encoder_id, config.output_dim, None, shard_size, passages_path, dtype=dtype,
        host_index=host_index, num_hosts=num_hosts, devices_per_host=devices_per_host,
        identity=index_identity(config, tokenizer, max_length),
    )  # fmt: skip
    encode, params = _placed(make_encode_fn(config), params, devices, batch_size)
    start = writer.rows_done
    todo = writer.stop_row - start
    desc = "embedding passages" + (f" (host {host_index} of {num_hosts})" if num_hosts > 1 else "")
    bar = tqdm.tqdm(total=todo, desc=desc, unit="psg", disable=not progress or todo == 0)
    for window in _batches(writer.passages.iter_passages(start, writer.stop_row), batch_size * SORT_WINDOW):
        writer.write(embed_passages(encode, params, tokenizer, window, batch_size, max_length, bar.update))
    bar.close()
    writer.finalize()
    _record_encoder_config(output_dir, config, max_length)
    if collective:
        multihost_utils.sync_global_devices("rag_jax build_index: every host's part is written")
        if not writer.index_written:  # Every host writes it: hosts may not share a filesystem.
            writer.write_index_metadata()
    elif not writer.index_written:
        print(f"build_index: host {host_index} of {num_hosts} wrote rows [{writer.start_row}, {writer.stop_row}) "
              f"of {output_dir}; index.json follows when the last host finishes")
        return None
    if num_hosts == 1:
        index = index_io.load_index(output_dir, expected_encoder=encoder_id)
        if backend == "scann":
            scann_backend.build_scann_index(index)
        return index
    index = index_io.load_index(output_dir, expected_encoder=encoder_id, check_shards=False)
    problem = multihost.local_index_problem(index, [(writer.start_row, writer.stop_row)])
    if collective:
        multihost.agree_or_raise(problem, f"build_index {output_dir}")
    elif problem:
        raise index_io.IndexFormatError(problem)
    if backend == "scann":
        multihost.MultiHostScannSearcher.load_or_build(index, host_index=host_index, num_hosts=num_hosts)
    return index


def _placed(encode, params, devices: Sequence[jax.Device] | None, batch_size: int):
    """(encode, params) on `devices`: params replicated and every batch's rows split over them (when batch_size
    divides evenly; else, or with one device or None, everything on the first or the default device)."""
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if not devices or len(devices) == 1 or batch_size % len(devices):
        return encode, jax.device_put(params, devices[0] if devices else None)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("rows",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return (lambda p, batch: encode(p, jax.device_put(batch, rows))), params


def _record_encoder_config(output_dir: str, config: bert.BertConfig, max_length: int) -> None:
    """Keeps how passages were tokenised beside the embeddings (for users; loading does not depend on it)."""
    files.write_json(  # Atomic: every host of a multi-host build writes the same file.
        f"{output_dir}/encoder.json",
        {"bert_config": {k: str(v) for k, v in vars(config).items()}, "max_length": max_length},
    )
