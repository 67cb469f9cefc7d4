"""Index refresh (REALM, RAG-end2end): the corpus re-embedded with the current document encoder between steps.

Every `index.refresh_every` steps (or on an Atlas-style schedule, config_check.refresh_schedule) every host embeds its
own rows of the corpus with the document encoder of that step on the training mesh's local devices, with
build_index's jitted embedding, into a new index version WORKDIR/index_versions/<step>/ (runs/workdir.py). Retrieval
moves to it only once build_index has returned, i.e. once index.json says it is complete on every host: host mode
swaps the exact searcher's embeddings (no recompilation) or loads the rebuilt ScaNN searcher; device mode replaces
the corpus embeddings on the devices in place, with the same shape, dtype and sharding, so the step does not
recompile.

Each checkpoint records the version the run searches after its step (runs/checkpoint.py); a resumed run searches that
version, and a refresh that was killed half-way is redone (resumed from its whole shards when the encoder is the
same) when the run reaches its step again, so no search ever reads a half-written index. A version is deleted once
neither the run nor any kept checkpoint needs it (version 0, WORKDIR/index, which may link to a shared index, is
kept).

The current document encoder is state.params["doc_encoder"] when the document encoder is trained, else the run's
frozen one (build.doc_encoder), whose refreshes rebuild the same index.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from rag_jax.retrieval import code_search, embed, exact, index_codes, index_io, multihost, scann_backend
from rag_jax.runs import build, checkpoint, config_check, workdir as workdir_lib
from rag_jax.training.lifecycle import log as _log


def due(schedule: list[tuple[int, int | None, int]], step: int) -> bool:
    """Whether a refresh follows step `step` (steps done) under a config_check.refresh_schedule."""
    for start, stop, every in schedule:
        if start <= step and (stop is None or step < stop):
            return every > 0 and step > 0 and step % every == 0
    return False


def _host_copy(tree: Any) -> Any:
    """A parameter tree as numpy on this host (gathered from the other hosts' devices when sharded over them)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


class IndexRefresher:
    """The run's index versions: refreshes them, moves retrieval to them, records and prunes them."""

    def __init__(self, run, checkpointer: checkpoint.Checkpointer):
        self.run, self.checkpointer = run, checkpointer
        config = run.config
        self.schedule = config_check.refresh_schedule(config.index.get("refresh_every", "0"))
        self.enabled = any(every for _, _, every in self.schedule)
        self.version = 0  # the step whose document encoder embedded the index searched now
        self.seconds = 0.0  # spent refreshing in this process
        self._versions: dict[int, int] = {}  # checkpoint step -> the version it records
        if self.enabled:
            self.doc_config, self.frozen_doc_params = build.doc_encoder(config)

    def doc_encoder_params(self, state) -> Any:
        """The document encoder of `state`: its trained params when the run trains it, else the frozen ones."""
        params = state.params
        if isinstance(params, dict) and "doc_encoder" in params:
            return _host_copy(params["doc_encoder"])
        return self.frozen_doc_params

    # ------------------------------------------------------------------------------------------------ versions

    def resume(self, step: int) -> None:
        """Searches the version checkpoint `step` recorded (it was complete when that checkpoint was saved)."""
        version = self.checkpointer.index_version(step)
        self._versions[step] = version
        if version != self.version:
            where = workdir_lib.index_version_dir(self.run.workdir, version)
            try:
                index = index_io.load_index(where, check_shards=jax.process_count() == 1)
            except index_io.IndexFormatError as e:
                raise build.ConfigError(
                    f"{self.checkpointer.step_dir(step)} was trained against index version {version}, which does not "
                    f"load ({e}); restore {where} from a copy, or train into a new --workdir") from None
            self._search(index, version)
            _log(f"searching index version {version} ({where}), recorded by checkpoint {step}")

    def maybe_refresh(self, done: int, state, before_swap: Callable[[], None] = lambda: None) -> bool:
        """Refreshes the index after step `done` when the schedule says so (a collective on several hosts);
        `before_swap` runs once the new version is complete, before retrieval moves to it."""
        if not self.enabled or not due(self.schedule, done):
            return False
        t0 = time.time()
        target = workdir_lib.index_version_dir(self.run.workdir, done)
        index = self._build(target, self.doc_encoder_params(state))
        before_swap()
        self._search(index, done)
        seconds = time.time() - t0
        self.seconds += seconds
        _log(f"index refreshed after step {done}: {index.num_passages} passages re-embedded into {target} in "
             f"{seconds:.1f}s")
        return True

    def _build(self, target: str, doc_params: Any) -> index_io.Index:
        """The index of `doc_params` in `target`, resumed from its whole shards when a killed refresh left some."""
        c = self.run.config
        identity = build.index_identity(c, self.doc_config, doc_params, self.run.tokenizers.question)
        if _recorded_encoders(target) - {identity["encoder_id"]}:
            # Left by a run of another encoder (a workdir trained over again): nothing there to resume.
            self._barrier("index refresh: old version checked")
            if jax.process_index() == 0:
                shutil.rmtree(target, ignore_errors=True)
            self._barrier("index refresh: old version removed")
        mesh_devices = [d for d in self.run.mesh.devices.flat if d.process_index == jax.process_index()]
        index = embed.build_index(
            self.doc_config, doc_params, self.run.tokenizers.question, c.data.passages, target,
            encoder_id=identity["encoder_id"], batch_size=c.index.batch_size, max_length=c.index.max_length,
            shard_size=c.index.shard_size, dtype=c.index.dtype, backend="exact", progress=False, all_hosts=True,
            devices=mesh_devices)
        old_codes = self.run.index.metadata.get("codes")
        if old_codes:  # the codes re-encoded with the same codebooks (never retrained), so code scores stay comparable
            if jax.process_index() == 0:
                index_codes.write_codes(index, index_codes.spec_of(self.run.index.metadata),
                                        sample_size=old_codes["sample_size"], seed=old_codes["seed"],
                                        codebooks=index_codes.load_codebooks(self.run.index))
            self._barrier("index refresh: codes written")
            index = index_io.load_index(target, check_shards=False)
        if isinstance(self.run.retriever.searcher, scann_backend.ScannSearcher):
            # As build.ensure_index does for the first index: one searcher over the whole index, built once.
            if jax.process_index() == 0:
                scann_backend.build_scann_index(index)
            self._barrier("index refresh: ScaNN searcher built")
            index = index_io.load_index(target, check_shards=False)
        return index

    def _barrier(self, name: str) -> None:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"rag_jax {name}")

    def _search(self, index: index_io.Index, version: int) -> None:
        """Moves the run's retrieval (host searcher, device corpus) to a complete `index`."""
        run = self.run
        retriever = run.retriever
        if isinstance(retriever.searcher, (exact.ExactSearcher, code_search.CodeSearcher)):
            retriever.searcher.swap_index(index)  # the same N x D and dtype (codes, codebooks): no recompilation
        elif isinstance(retriever.searcher, scann_backend.ScannSearcher):
            retriever.searcher = scann_backend.load_scann_index(index)
        else:
            raise TypeError(f"index refresh cannot move a {type(retriever.searcher).__name__} to a new index")
        retriever.index = run.index = index
        if "codes" in run.corpus:  # device retrieval of codes: the same capacity, so no recompilation
            code_search.replace_code_arrays(index, run.corpus)
        if "embeddings" in run.corpus:  # device retrieval: the same shape, dtype and sharding, so no recompilation
            old = run.corpus["embeddings"]
            run.corpus["embeddings"] = multihost.device_put_rows(index, old.sharding, old.shape[0], old.dtype)
        self.version = version

    # ------------------------------------------------------------------------------------------------ records

    def saved(self, step: int) -> None:
        """Notes that checkpoint `step` records the current version, then deletes versions nobody needs."""
        self._versions[step] = self.version
        self.prune()

    def prune(self) -> None:
        """Deletes the versions older than the current one that no kept checkpoint records (process 0)."""
        if not self.enabled:
            return
        needed = {self.version}
        for kept in self.checkpointer.all_steps():
            if kept not in self._versions:
                try:
                    self._versions[kept] = self.checkpointer.index_version(kept)
                except Exception:  # pylint: disable=broad-except (a damaged record: delete nothing this time)
                    return
            needed.add(self._versions[kept])
        if jax.process_index() != 0:
            return
        for version in workdir_lib.index_versions(self.run.workdir):
            if version != 0 and version not in needed and version < self.version:
                shutil.rmtree(workdir_lib.index_version_dir(self.run.workdir, version), ignore_errors=True)

    def metrics(self, done: int, wall_seconds: float) -> tuple[dict[str, float], dict[str, float]]:
        """(the index age in steps since its embeddings were made, for metrics.jsonl; the seconds spent refreshing
        in this process and their share of its wall time, timings for TensorBoard only)."""
        if not self.enabled:
            return {}, {}
        return ({"index_age": float(done - self.version)},
                {"index_refresh_seconds": self.seconds, "index_refresh_share": self.seconds / max(wall_seconds, 1e-9)})

    def progress(self, done: int, wall_seconds: float) -> str:
        """The progress line's part: ' | index age 3 (refresh 12s, 4% of wall time)', or '' without refreshes."""
        if not self.enabled:
            return ""
        share = self.seconds / max(wall_seconds, 1e-9)
        return f" | index age {done - self.version} (refresh {self.seconds:.0f}s, {share:.0%} of wall time)"


def _recorded_encoders(index_dir: str) -> set[str]:
    """The encoder_ids that index.json and the hosts' progress files of `index_dir` record."""
    if not os.path.isdir(index_dir):
        return set()
    found = set()
    for name in os.listdir(index_dir):
        if name.startswith("index") and name.endswith(".json"):
            record = index_io.read_json(os.path.join(index_dir, name))
            if isinstance(record, dict) and "encoder_id" in record:
                found.add(record["encoder_id"])
    return found
