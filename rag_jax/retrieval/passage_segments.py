"""The passages of an updated index: the original passages file followed by the files each `build_index --add`
appended, read through one PassageStore per file as if they were one file (rows numbered across them)."""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Sequence

import numpy as np

from rag_jax.retrieval import corpus, passage_store


class SegmentedStore:
    """PassageStore's reading interface over several stores, rows in segment order."""

    def __init__(self, stores: Sequence[passage_store.PassageStore]):
        self.stores = list(stores)
        self._starts = np.cumsum([0] + [s.num_passages for s in self.stores])
        self.path = self.stores[0].path
        digest = hashlib.sha256("|".join(s.metadata["fingerprint"] for s in self.stores).encode()).hexdigest()[:32]
        self.metadata = {"fingerprint": f"segments={len(self.stores)},sha256={digest}",
                         "num_passages": self.num_passages}

    @property
    def num_passages(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        return self.num_passages

    def _segment(self, row: int) -> tuple[passage_store.PassageStore, int]:
        if not 0 <= row < self.num_passages:
            raise IndexError(f"row {row} out of range for an index of {self.num_passages} passages")
        i = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self.stores[i], row - int(self._starts[i])

    def __getitem__(self, row: int) -> corpus.Passage:
        store, local = self._segment(int(row))
        return store[local]

    def get(self, rows) -> list[corpus.Passage]:
        return [self[r] for r in np.asarray(rows).reshape(-1)]

    def iter_passages(self, start: int = 0, stop: int | None = None) -> Iterator[corpus.Passage]:
        stop = self.num_passages if stop is None else min(stop, self.num_passages)
        for i, store in enumerate(self.stores):
            lo, hi = max(start, int(self._starts[i])), min(stop, int(self._starts[i + 1]))
            if lo < hi:
                yield from store.iter_passages(lo - int(self._starts[i]), hi - int(self._starts[i]))

    def row_for_id(self, passage_id: str | int) -> int:
        for i, store in enumerate(self.stores):
            try:
                return int(self._starts[i]) + store.row_for_id(passage_id)
            except corpus.UnknownPassageIdError:
                continue
        raise corpus.UnknownPassageIdError(
            f"passage id {str(passage_id)!r} is not in {self.path} nor in the {len(self.stores) - 1} file(s) added to "
            f"it ({self.num_passages} passages); check that the ids come from this index's corpus")

    def rows_for_ids(self, passage_ids: Iterable[str | int]) -> np.ndarray:
        return np.asarray([self.row_for_id(p) for p in passage_ids], dtype=np.int64)

    def close(self) -> None:
        for store in self.stores:
            store.close()
