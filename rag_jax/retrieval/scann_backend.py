"""ScaNN approximate MIPS on the host CPU: k-means tree + anisotropic asymmetric hashing + exact reordering.

The RAG paper searched its 21M-passage index with FAISS HNSW on CPU; ScaNN plays that role here. Parameters
follow the ScaNN README's guidance and scale with the corpus size N: about sqrt(N) leaves, 10% of them
searched per query, AH with 2 dimensions per block (threshold 0.2, the usual choice for dot product), and the
best `reorder_k` hashed candidates rescored exactly. Below `brute_force_below` rows a tree has too few points
per leaf to help, so the searcher is plain brute force. On 200k clustered 128-d vectors
(experiments/bench/scann_recall.py) searching 5% of the leaves gave recall@10 0.89, 10% gave 0.95 and 20% 0.98,
while reorder_k above 100 changed nothing. A searcher can cover a slice of the corpus (`row_offset`): one per
host, merged with `merge.merge_topk` (multihost.MultiHostScannSearcher does that across the hosts of a job).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from rag_jax import files
from rag_jax.retrieval import index_io, merge

SCANN_DIR = "scann"
_META_FILE = "rag_jax_scann.json"


@dataclasses.dataclass(frozen=True)
class ScannConfig:
    """How a ScaNN searcher is built and searched."""
    brute_force: bool          # No tree, no hashing: exact dot products over all rows.
    num_leaves: int            # k-means leaves of the tree (partitions of the corpus).
    leaves_to_search: int      # Leaves scored per query.
    reorder_k: int             # Hashed candidates rescored exactly (at least k at search time).
    training_sample_size: int  # Rows used to train the tree and the AH codebooks.
    dims_per_block: int = 2    # AH sub-space size; 2 is ScaNN's recommendation for recall.
    anisotropic_threshold: float = 0.2  # ScaNN's recommended AH noise-shaping threshold for dot product.


def scann_config_for(num_passages: int, *, brute_force_below: int = 10_000, leaves_fraction: float = 0.1,
                     reorder_k: int = 200) -> ScannConfig:
    """ScaNN parameters scaled to the corpus size (sqrt(N) leaves, `leaves_fraction` of them searched)."""
    if num_passages < brute_force_below:
        return ScannConfig(True, 0, 0, 0, 0)
    num_leaves = max(2, round(math.sqrt(num_passages)))
    leaves_to_search = min(num_leaves, max(8, math.ceil(leaves_fraction * num_leaves)))
    return ScannConfig(False, num_leaves, leaves_to_search, reorder_k, min(num_passages, 250_000))


def _scann():
    try:
        import scann  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("the ScaNN backend needs the `scann` package: pip install scann") from e
    return scann


class ScannSearcher:
    """A built or loaded ScaNN searcher over rows [row_offset, row_offset + num_passages) of the corpus."""

    def __init__(self, searcher, config: ScannConfig, num_passages: int, dim: int, row_offset: int = 0):
        self._searcher, self.config = searcher, config
        self.num_passages, self.dim, self.row_offset = num_passages, dim, row_offset

    @classmethod
    def build(cls, embeddings_NxD, config: ScannConfig | None = None, row_offset: int = 0) -> ScannSearcher:
        """Trains and builds a searcher (ScaNN copies the data as float32; this takes ~N*D*4 bytes of RAM)."""
        db = np.ascontiguousarray(np.asarray(embeddings_NxD), dtype=np.float32)
        if db.ndim != 2 or db.shape[0] == 0:
            raise merge.SearchError(f"ScaNN needs a non-empty N x D array, got shape {db.shape}")
        config = config or scann_config_for(db.shape[0])
        builder = _scann().scann_ops_pybind.builder(db, 10, "dot_product")
        if config.brute_force:
            searcher = builder.score_brute_force().build()
        else:
            searcher = (builder
                        .tree(num_leaves=config.num_leaves, num_leaves_to_search=config.leaves_to_search,
                              training_sample_size=config.training_sample_size)
                        .score_ah(config.dims_per_block,
                                  anisotropic_quantization_threshold=config.anisotropic_threshold,
                                  training_sample_size=config.training_sample_size)
                        .reorder(config.reorder_k)
                        .build())
        return cls(searcher, config, db.shape[0], db.shape[1], row_offset)

    def search(self, queries_QxD, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows_QxK int32 global rows, scores_QxK float32 dot products), best first."""
        merge.check_search_args(queries_QxD, k, self.num_passages, self.dim)
        q = np.ascontiguousarray(np.asarray(queries_QxD), dtype=np.float32)
        k = int(k)
        if self.config.brute_force:
            idx, dist = self._searcher.search_batched_parallel(q, final_num_neighbors=k)
        else:
            idx, dist = self._search_tree(q, k, self.config.leaves_to_search)
        return np.asarray(idx, np.int64).astype(np.int32) + np.int32(self.row_offset), np.asarray(dist, np.float32)

    def _search_tree(self, q: np.ndarray, k: int, leaves: int) -> tuple[np.ndarray, np.ndarray]:
        pre_reorder = max(self.config.reorder_k, k)
        idx, dist = self._searcher.search_batched_parallel(
            q, final_num_neighbors=k, pre_reorder_num_neighbors=pre_reorder, leaves_to_search=leaves)
        idx, dist = np.array(idx), np.array(dist)
        # ScaNN pads with NaN when the searched leaves hold fewer than k rows; search those queries wider.
        short = np.isnan(dist).any(axis=1)
        if short.any():
            if leaves >= self.config.num_leaves:
                raise merge.SearchError(f"ScaNN found fewer than k={k} neighbours even searching every leaf")
            idx[short], dist[short] = self._search_tree(q[short], k, min(self.config.num_leaves, 4 * leaves))
        return idx, dist

    def save(self, directory: str | os.PathLike) -> None:
        """Serialises the searcher (relative asset paths, so the directory can move) and our metadata, atomically."""
        with files.new_directory(os.fspath(directory)) as tmp:
            self._searcher.serialize(tmp, relative_path=True)
            with open(os.path.join(tmp, _META_FILE), "w") as f:
                json.dump({"config": dataclasses.asdict(self.config), "num_passages": self.num_passages,
                           "dim": self.dim, "row_offset": self.row_offset}, f, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ScannSearcher:
        """Loads a searcher written by save()."""
        directory = os.fspath(directory)
        meta_path = os.path.join(directory, _META_FILE)
        if not os.path.exists(meta_path):
            raise index_io.IndexFormatError(f"{meta_path} not found: no ScaNN searcher saved in {directory}; build one "
                                            "with build_scann_index")
        with open(meta_path) as f:
            meta = json.load(f)
        searcher = _scann().scann_ops_pybind.load_searcher(directory)
        return cls(searcher, ScannConfig(**meta["config"]), meta["num_passages"], meta["dim"], meta["row_offset"])


def build_scann_index(index: index_io.Index, config: ScannConfig | None = None) -> ScannSearcher:
    """Builds a searcher over a whole loaded index, saves it to `index_dir/scann/`, records it in index.json."""
    searcher = ScannSearcher.build(index.embeddings(np.float32), config)
    searcher.save(os.path.join(index.index_dir, SCANN_DIR))
    index.metadata.setdefault("backends", {})["scann"] = _backend_record(searcher)
    index_io.write_metadata(index.index_dir, index.metadata)
    return searcher


def load_scann_index(index: index_io.Index) -> ScannSearcher:
    """Loads `index_dir/scann/`, refusing a searcher built for a different number of rows or dimension."""
    directory = os.path.join(index.index_dir, SCANN_DIR)
    searcher = ScannSearcher.load(directory)
    if (searcher.num_passages, searcher.dim, searcher.row_offset) != (index.num_passages, index.dim, 0):
        raise index_io.IndexFormatError(
            f"{directory}: ScaNN searcher covers {searcher.num_passages} rows of dim {searcher.dim} from row "
            f"{searcher.row_offset}, the index has {index.num_passages} rows of dim {index.dim}; rebuild it with "
            "build_scann_index")
    recorded = index.metadata.get("backends", {}).get("scann")
    if recorded is not None and recorded != _backend_record(searcher):
        raise index_io.IndexFormatError(f"{directory}: searcher differs from the one recorded in index.json "
                                        f"({recorded}); rebuild it with build_scann_index")
    return searcher


def load_base_scann(index: index_io.Index, base_rows: int) -> ScannSearcher:
    """The ScaNN searcher of an updated index's root directory, which covers its first `base_rows` rows."""
    root = os.path.normpath(os.path.join(index.index_dir, "..", ".."))
    searcher = ScannSearcher.load(os.path.join(root, SCANN_DIR))
    if (searcher.num_passages, searcher.dim, searcher.row_offset) != (base_rows, index.dim, 0):
        raise index_io.IndexFormatError(f"{root}/{SCANN_DIR}: ScaNN searcher covers {searcher.num_passages} rows, the "
                                        f"index before its updates {base_rows}; rebuild it with build_scann_index")
    return searcher


def _backend_record(searcher: ScannSearcher) -> dict[str, Any]:
    return {"dir": SCANN_DIR, "config": dataclasses.asdict(searcher.config), "num_passages": searcher.num_passages}
