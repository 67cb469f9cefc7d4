"""Deterministic, host-sharded training input: NQ-open examples -> tokenised batches -> global jax.Arrays.

Sampling is defined on global batches, independent of how many hosts read them:
  epoch e visits the examples in the order `permutation(seed, e)`; global step s is the slice
  [i*G, (i+1)*G) of epoch s // steps_per_epoch's order (i = s % steps_per_epoch, G = global batch size, the
  incomplete last batch of an epoch is dropped); host h of H reads the contiguous rows [h*G/H, (h+1)*G/H) of it.
So the position is just the global step: `get_state()` / `set_state()` (or `start_step`) resume exactly, also on
a different number of hosts.

Why not grain's IndexSampler: it shards records per host before shuffling, so the hosts' batches together are not
one global batch of a single-host run, and its position is not a plain step count. The per-step work here is a
numpy slice plus one batched call to each (Rust) tokenizer, far below a RAG training step.

Batch layout (local, per host; B = global_batch_size / num_shards):
  question_input_ids      int32 [B, max_question_length]  BERT ids of the question ([CLS] q [SEP], pad 0)
  question_attention_mask int32 [B, max_question_length]
  labels                  int32 [B, max_target_length]    `<s> answer </s>` (BART), `<pad> answer </s>` (T5), padded
  gold_passage_id         int32 [B]                        -1 where unknown
  example_index           int32 [B]                        row in the data source (for audits)
  question                list[str] (host only)            raw question text
  answers                 list[list[str]] (host only)      all gold answers, for exact-match evaluation
"""

import copy
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rag_jax.data import tokenizers

ANSWER_CHOICES = ("first", "random")
HOST_KEYS = ("question", "answers")  # Kept as Python objects; never sent to devices.


class TrainPipeline:
    """Iterator over this host's slice of deterministic global training batches (see module docstring).

    Args:
      source: random access examples, `len(source)` and `source[i] -> {"question", "answers", "gold_passage_id"}`
        (e.g. rag_jax.data.nq_open.get_data_source); an optional `__getitems__(indices)` is used for batch reads.
      question_tokenizer: BERT WordPiece tokenizer (question encoder input).
      generator_tokenizer: BART tokenizer (labels).
      global_batch_size: examples per step over all hosts.
      seed: sampling seed (non-negative int); the same seed gives the same batches.
      max_question_length: question encoder input length (questions are truncated / padded to it).
      max_target_length: label length (the paper recipe uses 25); long answers are cut keeping `</s>` last.
      answer_choice: "first" trains on answers[0] (the HF research project's data); "random" draws one answer per
        (seed, epoch, example), a fresh draw every epoch.
      answer_prefix_space: tokenise " answer" rather than "answer". The HF research project's encode_line adds a
        prefix space for BART targets, and the public rag-*-nq checkpoints generate answers with a leading space.
      shard_index, num_shards: this host's position; default jax.process_index() / jax.process_count().
      start_step: the global step of the first batch (same as set_state({"step": start_step})).
      num_epochs: stop after this many epochs (None: run forever).
    """

    def __init__(
        self,
        source: Any,
        question_tokenizer: Any,
        generator_tokenizer: Any,
        *,
        global_batch_size: int,
        seed: int,
        max_question_length: int = 64,
        max_target_length: int = 25,
        answer_choice: str = "first",
        answer_prefix_space: bool = True,
        shard_index: int | None = None,
        num_shards: int | None = None,
        start_step: int = 0,
        num_epochs: int | None = None,
    ):
        self.shard_index = jax.process_index() if shard_index is None else int(shard_index)
        self.num_shards = jax.process_count() if num_shards is None else int(num_shards)
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index={self.shard_index} must lie in [0, num_shards={self.num_shards}).")
        if global_batch_size <= 0 or global_batch_size % self.num_shards:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of the number of hosts "
                f"(num_shards={self.num_shards}); each host reads global_batch_size / num_shards examples."
            )
        if answer_choice not in ANSWER_CHOICES:
            raise ValueError(f"answer_choice={answer_choice!r}; choose one of {ANSWER_CHOICES}.")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer.")
        if max_target_length < 2:
            raise ValueError(f"max_target_length={max_target_length} must leave room for <s> and </s>.")
        self.num_examples = len(source)
        self.steps_per_epoch = self.num_examples // global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"The data source has {self.num_examples} examples, fewer than one global batch of "
                f"{global_batch_size}; lower the batch size."
            )
        self.source = source
        self.question_tokenizer = question_tokenizer
        self.generator_tokenizer = generator_tokenizer
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // self.num_shards
        self.seed = int(seed)
        self.max_question_length = int(max_question_length)
        self.max_target_length = int(max_target_length)
        self.answer_choice = answer_choice
        self.answer_prefix_space = answer_prefix_space
        self.num_epochs = num_epochs
        self._step = int(start_step)
        self._perm_epoch, self._perm = -1, None  # Cache of the current epoch's permutation.

    # ---- position -------------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, int]:
        """The position as a small JSON-serialisable dict (the step is the whole state; the rest is checked)."""
        return self.state_at(self._step)

    def state_at(self, step: int) -> dict[str, int]:
        """`get_state()` at position `step` (the state to save with batch `step - 1`, whatever has been read ahead)."""
        return {
            "step": int(step),
            "epoch": int(step) // self.steps_per_epoch,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_examples": self.num_examples,
        }

    def set_state(self, state: Mapping[str, int]) -> None:
        """Continues from a `get_state()` dict; refuses one recorded with a different seed, batch size or data."""
        for key in ("seed", "global_batch_size", "num_examples"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"Pipeline state has {key}={state[key]} but this pipeline has {key}={getattr(self, key)}; "
                    "resuming would not reproduce the original batches."
                )
        self._step = int(state["step"])

    def with_tokenizers(self, question_tokenizer: Any, generator_tokenizer: Any) -> "TrainPipeline":
        """The same batches read with these tokenizers (a thread's own copies: a fast tokenizer is not thread-safe,
        its truncation and padding settings live in the shared Rust object). The position is the copy's own."""
        other = copy.copy(self)
        other.question_tokenizer, other.generator_tokenizer = question_tokenizer, generator_tokenizer
        return other

    # ---- sampling -------------------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> np.ndarray:
        """Source rows of global batch `step`, int64 [global_batch_size]."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[i * self.global_batch_size : (i + 1) * self.global_batch_size]

    def local_indices(self, step: int) -> np.ndarray:
        """This host's contiguous slice of `global_indices(step)`, int64 [local_batch_size]."""
        lo = self.shard_index * self.local_batch_size
        return self.global_indices(step)[lo : lo + self.local_batch_size]

    # ---- batches --------------------------------------------------------------------------------------------

    def _read(self, indices: np.ndarray) -> list[dict[str, Any]]:
        if hasattr(self.source, "__getitems__"):
            return list(self.source.__getitems__(indices.tolist()))
        return [self.source[int(i)] for i in indices]

    def _pick_answer(self, example: dict[str, Any], index: int, epoch: int) -> str:
        answers = example["answers"]
        if not answers:
            raise ValueError(f"Example {index} of the data source has no answers: {example!r}; cannot make labels.")
        if self.answer_choice == "first" or len(answers) == 1:
            return answers[0]
        return answers[int(np.random.default_rng((self.seed, epoch, index)).integers(len(answers)))]

    def batch_at(self, step: int) -> dict[str, Any]:
        """This host's batch for global step `step` (pure: does not move the position)."""
        indices = self.local_indices(step)
        epoch = step // self.steps_per_epoch
        examples = self._read(indices)
        questions = [ex["question"] for ex in examples]
        targets = [self._pick_answer(ex, int(i), epoch) for ex, i in zip(examples, indices)]
        if self.answer_prefix_space:
            # transformers 5 ignores add_prefix_space at call time, so the space goes into the text.
            targets = [t if t.startswith(" ") else " " + t for t in targets]
        q = self.question_tokenizer(
            questions, max_length=self.max_question_length, truncation=True, padding="max_length"
        )
        return {
            "question_input_ids": np.asarray(q["input_ids"], np.int32),
            "question_attention_mask": np.asarray(q["attention_mask"], np.int32),
            "labels": tokenizers.decoder_labels(self.generator_tokenizer, targets, max_length=self.max_target_length),
            "gold_passage_id": np.asarray([ex.get("gold_passage_id", -1) for ex in examples], np.int32),
            "example_index": indices.astype(np.int32),
            "question": questions,
            "answers": [list(ex["answers"]) for ex in examples],
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.num_epochs is not None and self._step >= self.num_epochs * self.steps_per_epoch:
            raise StopIteration
        batch = self.batch_at(self._step)
        self._step += 1
        return batch


def _batch_shards(mesh: Mesh, spec: PartitionSpec) -> int:
    """How many ways `spec` splits the leading (batch) axis over `mesh`."""
    if len(spec) == 0 or spec[0] is None:
        return 1
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return int(np.prod([mesh.shape[a] for a in axes]))


def make_global_batch(
    local_batch: Mapping[str, Any],
    mesh: Mesh,
    partition_spec: PartitionSpec | Mapping[str, PartitionSpec],
) -> dict[str, Any]:
    """Assembles every host's local batch into global jax.Arrays sharded along the batch axis.

    Numeric numpy arrays [B_local, ...] become jax.Arrays [B_local * process_count, ...] with
    NamedSharding(mesh, spec); host-only entries (strings, lists) are returned unchanged. `partition_spec` is one
    spec for all arrays (e.g. PartitionSpec("data")) or a dict key -> spec. Each process's rows land on the devices
    it addresses, so every global row comes from exactly one host.
    """
    num_processes = jax.process_count()
    out: dict[str, Any] = {}
    for key, value in local_batch.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            out[key] = value
            continue
        spec = partition_spec[key] if isinstance(partition_spec, Mapping) else partition_spec
        local_rows = value.shape[0]
        global_shape = (local_rows * num_processes,) + value.shape[1:]
        shards = _batch_shards(mesh, spec)
        if global_shape[0] % shards:
            raise ValueError(
                f"make_global_batch: {key!r} has a global batch of {global_shape[0]} rows ({local_rows} per host x "
                f"{num_processes} hosts), not divisible by the {shards} batch shards of {spec} on mesh "
                f"{dict(mesh.shape)}; choose a global batch size that is a multiple of {shards}."
            )
        sharding = NamedSharding(mesh, spec)
        # Rows this process's devices hold; differs from local_rows when hosts replicate the batch axis.
        index_map = sharding.addressable_devices_indices_map(global_shape)
        row_slices = {idx[0].indices(global_shape[0]) for idx in index_map.values()}
        wanted_rows = sum(stop - start for start, stop, _ in row_slices)
        if wanted_rows != local_rows:
            raise ValueError(
                f"make_global_batch: {key!r} has {local_rows} rows on this host but its devices hold {wanted_rows} "
                f"rows of the {global_shape[0]}-row global batch under {spec} on mesh {dict(mesh.shape)}; the batch "
                "axis must split the hosts evenly (one distinct slice per host)."
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
