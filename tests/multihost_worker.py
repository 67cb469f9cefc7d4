"""One process of a 2-process JAX job on CPU, started by tests/test_index_multihost.py (2 devices each).

  python -m tests.multihost_worker MODE WORKDIR PORT PROCESS_ID

MODE "good": both hosts build WORKDIR/built at once with build_index (a tiny random BERT, the bundled BERT
tokenizer) and search it sharded over the 4 devices; each host loads its own copy WORKDIR/local-PROCESS_ID (which
lacks the other host's shard files) and searches it; then each writes its half of WORKDIR/clustered from the
vectors in WORKDIR/data.npz and searches it with per-host ScaNN merged across hosts. Results go to
WORKDIR/result-PROCESS_ID.npz. MODE "load": loads WORKDIR/index sharded over the 4 devices and searches it (the
test breaks a shard first, so this must fail on both processes, with the same message).
"""

import functools
import os
import sys

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rag_jax.data import tokenizers
from rag_jax.models import bert
from rag_jax.retrieval import embed, exact, index_io, index_writer, multihost, scann_backend

NUM_PROCESSES = 2
TINY_BERT = dict(vocab_size=30522, hidden_size=16, num_layers=1, num_heads=2,
                 intermediate_size=32, max_position_embeddings=64)
SCANN_CONFIG = scann_backend.ScannConfig(False, num_leaves=40, leaves_to_search=8, reorder_k=100,
                                         training_sample_size=4_000)


@functools.lru_cache(maxsize=1)
def tiny_encoder(seed: int = 0):
    """A 1-layer random BERT (config, params): the index build is the point here, not the encoder."""
    config = bert.BertConfig(**TINY_BERT)
    ids = np.zeros((1, 8), np.int32)
    # Shapes from eval_shape, values from numpy: initialising for real would compile (seconds on a busy CPU).
    shapes = nn.unbox(jax.eval_shape(bert.BertEncoder(config).init, jax.random.PRNGKey(0), ids, ids, ids)["params"])
    rng = np.random.default_rng(seed)
    return config, jax.tree_util.tree_map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return tokenizers.load_question_tokenizer(tokenizers.QUESTION_TOKENIZER_DIR)


def build_tiny(passages: str, output_dir: str, **kwargs):
    """build_index with the tiny encoder (kwargs: host_index, num_hosts, ...)."""
    config, params = tiny_encoder()
    return embed.build_index(config, params, _tokenizer(), passages, output_dir, encoder_id="tiny", batch_size=8,
                             max_length=32, shard_size=5, progress=False, **kwargs)


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(50, d))
    return (centers[rng.integers(0, 50, n)] + rng.normal(size=(n, d))).astype(np.float32)


def good(workdir: str) -> None:
    pid = jax.process_index()
    mesh = Mesh(np.asarray(jax.devices()), ("corpus",))
    data = np.load(os.path.join(workdir, "data.npz"))
    results = {}

    # (a) + (b): both hosts embed their half into one directory, then exact search sharded over all 4 devices.
    index = build_tiny(os.path.join(workdir, "small.tsv"), os.path.join(workdir, "built"), all_hosts=True)
    results["built_rows"], results["built_scores"] = exact.ShardedExactSearcher(index, mesh).search(data["small_q"], 5)

    # Hosts with their own disks: each one's copy of the index lacks the other host's shard files.
    local = index_io.load_index(os.path.join(workdir, f"local-{pid}"), check_shards=False)
    results["local_rows"], _ = exact.ShardedExactSearcher(local, mesh).search(data["local_q"], 3)

    # (d): a clustered synthetic index written as two host parts, searched with per-host ScaNN merged over hosts.
    out = os.path.join(workdir, "clustered")
    emb_NxD = data["big_emb"]
    writer = index_writer.IndexWriter(out, "synthetic", emb_NxD.shape[1], None, 2_000, os.path.join(workdir, "big.tsv"),
                                      host_index=pid, num_hosts=NUM_PROCESSES, devices_per_host=2)
    writer.write(emb_NxD[writer.rows_done:writer.stop_row])
    writer.finalize()
    multihost_utils.sync_global_devices("every part written")
    writer.write_index_metadata()
    big = index_io.load_index(out, check_shards=False)
    scann = multihost.MultiHostScannSearcher.load_or_build(big, SCANN_CONFIG)
    results["scann_local"] = np.array([scann.local.row_offset, scann.local.num_passages])
    results["scann_rows"], results["scann_scores"] = scann.search(data["big_q"], 10)
    results["sharded_big_rows"], _ = exact.ShardedExactSearcher(big, mesh).search(data["big_q"], 10)
    np.savez(os.path.join(workdir, f"result-{pid}.npz"), **results)


def load(workdir: str) -> None:
    index = index_io.load_index(os.path.join(workdir, "index"), check_shards=False)
    searcher = exact.ShardedExactSearcher(index, Mesh(np.asarray(jax.devices()), ("corpus",)))
    searcher.search(np.ones((1, index.dim), np.float32), 1)
    print("loaded and searched without error", flush=True)


def main(mode: str, workdir: str, port: str, process_id: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes.
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=NUM_PROCESSES,
                               process_id=int(process_id))
    {"good": good, "load": load}[mode](workdir)


if __name__ == "__main__":
    main(*sys.argv[1:])
