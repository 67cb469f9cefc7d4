"""The embedding job: every passage through the document encoder d(z), written into a resumable index directory.

Passages are encoded the DPR way, title and text as a BERT sentence pair, pooled output (the [CLS] state for DPR).
Batches have a fixed number of rows and their length rounded up to a bucket, so the jitted encoder compiles once
per bucket, not once per batch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from rag_jax.models import bert
from rag_jax.retrieval import corpus, index_io, scann_backend

BUCKET = 64  # sequence lengths are rounded up to a multiple of this


def encoder_fingerprint(config: bert.BertConfig, params: Any) -> str:
    """A short identity of an encoder (config and weights): an index records it and refuses other encoders."""
    digest = hashlib.sha256(repr(config).encode())
    for leaf in jax.tree_util.tree_leaves(params):
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return digest.hexdigest()[:16]


def bucketed_length(length: int, max_length: int) -> int:
    return min(max_length, -(-length // BUCKET) * BUCKET)


def tokenize_passages(tokenizer, passages: Sequence[corpus.Passage], rows: int, max_length: int) -> dict[str, np.ndarray]:
    """(title, text) sentence pairs as int32 arrays (rows, L); rows beyond len(passages) are all padding."""
    encoded = tokenizer(
        [p.title for p in passages],
        [p.text for p in passages],
        truncation="longest_first",
        max_length=max_length,
        padding="longest",
        return_tensors="np",
    )
    length = bucketed_length(encoded["input_ids"].shape[1], max_length)
    batch = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        array = np.zeros((rows, length), np.int32)
        value = encoded[key]
        array[: value.shape[0], : value.shape[1]] = value
        batch[key] = array
    return batch


def make_encode_fn(config: bert.BertConfig):
    """A jitted function (params, batch) -> pooled vectors (B, D) float32."""
    module = bert.BertEncoder(config)

    @jax.jit
    def encode(params, batch):
        _, pooled = module.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        )
        return pooled

    return encode


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
) -> index_io.Index:
    """Embeds `passages_path` into `output_dir`, resuming after the last complete shard; returns the loaded index.

    `backend="scann"` also builds and saves a ScaNN searcher in the index directory.
    """
    if backend not in ("exact", "scann"):
        raise ValueError(f"backend must be 'exact' or 'scann', got {backend!r}")
    encoder_id = encoder_id or encoder_fingerprint(config, params)
    writer = index_io.IndexWriter(
        output_dir, encoder_id, config.output_dim, None, shard_size, passages_path, dtype=dtype
    )
    encode = make_encode_fn(config)
    params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, params))
    start = writer.rows_done
    todo = writer.num_passages - start
    bar = tqdm.tqdm(total=todo, desc="embedding passages", unit="psg", disable=not progress or todo == 0)
    for chunk in _batches(writer.passages.iter_passages(start), batch_size):
        batch = tokenize_passages(tokenizer, chunk, batch_size, max_length)
        vectors = np.asarray(encode(params, batch))[: len(chunk)]
        writer.write(vectors)
        bar.update(len(chunk))
    bar.close()
    writer.finalize()
    index = index_io.load_index(output_dir, expected_encoder=encoder_id)
    if backend == "scann":
        scann_backend.build_scann_index(index)
    _record_encoder_config(output_dir, config, max_length)
    return index


def _record_encoder_config(output_dir: str, config: bert.BertConfig, max_length: int) -> None:
    """Keeps how passages were tokenised beside the embeddings (for users; loading does not depend on it)."""
    with open(f"{output_dir}/encoder.json", "w") as f:
        json.dump({"bert_config": {k: str(v) for k, v in vars(config).items()}, "max_length": max_length}, f, indent=2)
