"""What the sub-benchmarks share: timing, the benchmark models (rag_jax and the same weights exported for the
reference) and random batches with realistic padding."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line's settings that sub-benchmarks read."""

    quick: bool = False  # tiny sizes: checks that everything runs (no figures)
    repeats: int = 5  # timed repeats per measurement (median reported)
    sizes: tuple[str, ...] = ("tiny", "small")  # model sizes for train_step and decode
    generators: tuple[str, ...] = ("bart", "t5")  # generator architectures for train_step, decode, eval, host, mfu
    mfu_batch_per_device: int = 8
    mfu_mips_rows: int = 4_000_000
    eval_questions_scale: float = 1.0  # eval: fraction of the 2,620 / 655 questions
    dtypes: tuple[str, ...] = ("float32",)  # model.compute_dtype rows of train_step, decode and embed


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() after `warmup` untimed calls; fn must block until its work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_median_seconds(ours: Callable[[], object], reference: Callable[[], object], repeats: int,
                          warmup: int = 1) -> tuple[float, float]:  # fmt: skip
    """Median wall times of two blocking functions, timed alternately (ours, reference, ours, ...) after `warmup`
    untimed calls of each, so that both see the same background load (other jobs on a shared machine)."""
    ours_s, reference_s = interleaved_median_seconds((ours, reference), repeats, warmup)
    return ours_s, reference_s


def interleaved_median_seconds(fns: tuple[Callable[[], object], ...], repeats: int, warmup: int = 1) -> list[float]:
    """Median wall times of blocking functions, timed in turn (a, b, c, a, b, c, ...) after `warmup` untimed calls
    of each, so that all see the same background load."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def with_compute_dtype(pair: "Twins", dtype: str) -> "Twins":
    """The same model and initial state (float32 parameters) computing in `dtype` (model.compute_dtype): the
    parameter tree does not depend on the compute dtype, so the state and the exported reference are shared."""
    from rag_jax import rag
    from rag_jax.runs import build

    if dtype == pair.config.model.compute_dtype:
        return pair
    config = ml_collections.ConfigDict(pair.config.to_dict())
    config.model.compute_dtype = dtype
    return dataclasses.replace(pair, config=config, model=rag.with_compute_dtype(pair.model, build.DTYPES[dtype]))


def reference_autocast(dtype: str):
    """The context the reference computes a `dtype` row in: torch.autocast(cpu, bfloat16) for "bfloat16" (weights
    and optimizer state stay float32, as ours), nothing for "float32"."""
    import contextlib

    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cpu", dtype=getattr(torch, dtype))


def same_answers(a_BxT: np.ndarray, b_BxT: np.ndarray) -> float:
    """The share of rows whose token ids agree up to the shorter of the two (both padded after EOS)."""
    t = min(a_BxT.shape[1], b_BxT.shape[1])
    return float(np.mean(np.all(a_BxT[:, :t] == b_BxT[:, :t], axis=1)))


def reference_floats_like_xla() -> None:
    """Makes torch flush denormal floats to zero, as XLA:CPU always does (jax on CPU computes 1e-30 * 1e-10 = 0).
    Without it the two sides do different floating-point work: where a random benchmark batch drives values below
    float32's smallest normal (the plain train_step's random doc scores give some documents posteriors ~1e-14, and
    their gradients go denormal), torch's matmuls take a slow path (3.5x on that step) that XLA never takes, and a
    ratio would measure the floating-point mode rather than the implementations."""
    import torch

    torch.set_flush_denormal(True)


def machine() -> str:
    import torch

    flushed = float(torch.tensor([1e-30]) * 1e-10) == 0.0  # as XLA:CPU; see reference_floats_like_xla
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.device_count()}x "
            f"{jax.devices()[0].device_kind} (jax), torch {torch.get_num_threads()} threads, denormals "
            f"{'flushed' if flushed else 'kept'} by torch")  # fmt: skip


# ----------------------------------------------------------------------------------------------- shared models


GENERATORS = ("bart", "t5")
T5_VOCAB = 32128  # T5's and Flan-T5's vocabulary (32,000 pieces, 100 sentinels, padding to a multiple of 128)


def model_config(size: str, generator: str = "bart") -> ml_collections.ConfigDict:
    """The run config of a benchmark model: experiments/configs/nq.py `tiny`, or `small` (4-layer 256-wide
    encoders, 3+3-layer 256-wide generator, K=5, 128 source tokens, batch 8). Real vocabulary sizes (30,522 /
    BART's 50,265 / T5's 32,128). generator "t5": the same sizes as a T5 v1.1 / Flan-T5 (gated GELU, untied head,
    d_kv = d_model / heads) with a SentencePiece tokenizer trained on the bundled passages (`t5_tokenizer_dir`).
    Dropout is 0 everywhere, on both sides, so that both compute the same function (the first step's losses are
    compared)."""
    from experiments.configs import nq

    if size not in ("tiny", "small"):
        raise ValueError(f"--sizes: unknown size {size!r}; choose tiny or small")
    if generator not in GENERATORS:
        raise ValueError(f"--generators: unknown generator {generator!r}; choose from {list(GENERATORS)}")
    c = nq.get_config("tiny")
    if size == "small":
        for enc in (c.model.question_encoder, c.model.doc_encoder):
            enc.hidden_size, enc.num_layers, enc.num_heads, enc.intermediate_size = 256, 4, 4, 1024
            enc.max_position_embeddings = 512
        g = c.model.generator
        g.d_model, g.encoder_layers, g.decoder_layers, g.heads, g.ffn_dim = 256, 3, 3, 4, 1024
        g.max_position_embeddings = 1024
        c.model.n_docs, c.model.max_combined_length = 5, 128
        c.data.max_question_length, c.data.max_target_length = 32, 12
        c.train.global_batch_size = 8
    if generator == "t5":
        g = c.model.generator
        g.architecture, g.vocab_size, g.feed_forward_proj, g.d_kv = "t5", T5_VOCAB, "gated-gelu", g.d_model // g.heads
        c.tokenizers.generator = t5_tokenizer_dir()
        c.data.answer_prefix_space = False  # SentencePiece marks word starts itself
    for enc in (c.model.question_encoder, c.model.doc_encoder):
        enc.dropout = 0.0
    c.model.generator.dropout = c.model.generator.attention_dropout = 0.0
    c.model.label_smoothing = 0.0
    return c


def scratch_dir() -> str:
    """A temporary directory for this process's benchmark files, removed at exit."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="rag_jax_bench_"))
    return _SCRATCH[0].name


def t5_tokenizer_dir() -> str:
    """A T5 tokenizer (SentencePiece unigram, 1,000 pieces + 100 sentinels, T5's special ids) trained once per
    process on the bundled passages: no real T5 tokenizer can be downloaded here, and the timings do not depend on
    which pieces it holds."""
    directory = os.path.join(scratch_dir(), "t5_tokenizer")
    if not os.path.exists(os.path.join(directory, "spiece.model")):
        from rag_jax.data import tokenizers
        from rag_jax.retrieval import corpus

        passages = corpus.read_passages("rag_jax/assets/nq_open_mini/passages.tsv")
        tokenizers.train_sentencepiece((p.title + " " + p.text for p in passages), directory)
    return directory


@dataclasses.dataclass
class Twins:
    """One random RAG model in rag_jax (its initial sharded train state) and exported for the reference."""

    config: ml_collections.ConfigDict
    model: Any  # rag_jax.rag.Rag
    mesh: Any
    tx: Any  # the run's optax optimizer
    state: Any  # rag_jax.training.step.TrainState, initial
    hf_dir: str  # the same weights in the Hugging Face RAG layout
    hf_config: dict[str, Any]


_TWINS: dict[tuple[str, str], Twins] = {}
_SCRATCH: list[tempfile.TemporaryDirectory] = []


def twins(size: str, generator: str = "bart") -> Twins:
    """The Twins of `size` with a `generator` ("bart", "t5"), built once per process (in the scratch directory)."""
    if (size, generator) not in _TWINS:
        _TWINS[size, generator] = make_twins(size, scratch_dir(), generator)
    return _TWINS[size, generator]


def jax_model(config: ml_collections.ConfigDict) -> Twins:
    """The rag_jax side alone (no export): model, mesh over every available device, optimizer, initial state."""
    from rag_jax import sharding
    from rag_jax.runs import build
    from rag_jax.training import optim, step

    model = build.build_rag(config, load_weights=False).rag
    mesh = sharding.mesh_from_config(config.mesh)
    tx = optim.make_optimizer(config)
    state = step.create_train_state(model, tx, mesh, jax.random.PRNGKey(config.seed))
    return Twins(config, model, mesh, tx, state, hf_dir="", hf_config={})


def make_twins(size: str, directory: str, generator: str = "bart",
               config: ml_collections.ConfigDict | None = None) -> Twins:  # fmt: skip
    """Builds the model of `size` (or of `config`, a variant of model_config(size, generator)) with rag_jax's own
    initialisation and exports it (with its tokenizers) to `directory`/hf-`size`-`generator`."""
    from rag_jax.inference import export
    from rag_jax.runs import build

    pair = jax_model(config or model_config(size, generator))
    tokenizers = build.load_tokenizers(pair.config)
    pair.hf_dir = os.path.join(directory, f"hf-{size}-{generator}")
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(pair.state.params))
    export.save_hf_rag(pair.hf_dir, pair.model, params, "rag_sequence", tokenizers.question, tokenizers.generator)
    with open(os.path.join(pair.hf_dir, "config.json")) as f:
        pair.hf_config = json.load(f)
    return pair


def padded(rng: np.random.Generator, rows: int, length: int, low: int, high: int, pad: int, min_len: int):
    """Random ids in [low, high) (rows, length), right-padded with `pad` to random lengths >= min_len; 0/1 mask."""
    ids = rng.integers(low, high, size=(rows, length), dtype=np.int32)
    lengths = rng.integers(min_len, length + 1, size=rows)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return np.where(mask > 0, ids, pad).astype(np.int32), mask


def contexts(rng: np.random.Generator, model, rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Generator inputs as the retriever makes them: `[<s>] ... </s>` padded to max_combined_length (rows, S)."""
    g = model.generator_config
    ids, mask = padded(rng, rows, length, 3, g.vocab_size, g.pad_token_id, length // 2)
    if g.bos_token_id is not None:  # BART; T5 has none
        ids[:, 0] = g.bos_token_id
    ids[np.arange(rows), mask.sum(1) - 1] = g.eos_token_id
    return ids, mask


def train_batch(config: ml_collections.ConfigDict, model, seed: int = 0) -> dict[str, np.ndarray]:
    """One global host-retrieval batch (HOST_KEYS of the step) of random tokens with realistic padding."""
    rng = np.random.default_rng(seed)
    b, k = config.train.global_batch_size, config.model.n_docs
    lq, s, t = config.data.max_question_length, config.model.max_combined_length, config.data.max_target_length
    g = model.generator_config
    q_ids, q_mask = padded(rng, b, lq, 1000, model.question_encoder_config.vocab_size, 0, lq // 2)
    q_ids[:, 0] = 101  # [CLS]
    ctx_ids, ctx_mask = contexts(rng, model, b * k, s)
    labels, label_mask = padded(rng, b, t, 3, g.vocab_size, g.pad_token_id, 3)  # <s> answer </s> pad...
    labels[:, 0] = g.pad_token_id if g.bos_token_id is None else g.bos_token_id  # T5: `<pad> answer </s>`
    labels[np.arange(b), label_mask.sum(1) - 1] = g.eos_token_id
    d = model.question_encoder_config.output_dim
    return {
        "question_input_ids": q_ids, "question_attention_mask": q_mask, "labels": labels,
        "gold_row": np.full((b,), -1, np.int32),
        "context_input_ids": ctx_ids.reshape(b, k, s), "context_attention_mask": ctx_mask.reshape(b, k, s),
        "doc_embeds": rng.normal(size=(b, k, d)).astype(np.float32), "doc_rows": np.tile(np.arange(k, dtype=np.int32), (b, 1)),
    }  # fmt: skip


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def report(name: str, rows: list[dict], results: str, quick: bool, seconds: float) -> None:
    """Prints rows as a table (after the benchmark's own wall time, `seconds`: building, compiling and timing both
    sides) and appends them to the results file (with the 1-minute load average, since other jobs on the machine
    skew the timings)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    widths = [max(len(k), *(len(_fmt(r.get(k, ""))) for r in rows)) for k in keys]
    print(f"\n== {name} ({machine()}, load {os.getloadavg()[0]:.1f}; the benchmark took {seconds:.0f} s)")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for row in rows:
        print("  ".join(_fmt(row.get(k, "")).ljust(w) for k, w in zip(keys, widths)))
    with open(results, "a") as f:
        for row in rows:
            record = {"benchmark": name, "machine": machine(), "load": os.getloadavg()[0], "quick": quick}
            f.write(json.dumps({**record, **row}) + "\n")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
