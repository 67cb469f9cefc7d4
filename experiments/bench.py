"""Benchmarks against the references, each measured in the same process on the same machine.

  python -m experiments.bench --benchmarks=train_step,decode,embed,mips,mfu [--quick] [--sizes=tiny,small]
      [--results=bench_results.jsonl]

Sub-benchmarks:
  train_step  one RAG-Sequence training step (forward, backward, clipped AdamW), rag_jax's real jitted step vs
              transformers' RagSequenceForGeneration + torch.optim.AdamW on the same weights and batch
  decode      RAG-Token greedy / beam 4 and RAG-Sequence thorough beam 4 decoding vs the reference's `generate`
  embed       document encoder passages/second vs DPRContextEncoder
  mips        exact top-k vs faiss IndexFlatIP; ScaNN
  mfu         accelerators only: the `paper` config step in bf16 as a fraction of the device's peak FLOP/s
              (model FLOPs from rag_jax/flops.py), and exact MIPS bytes/second as a fraction of HBM bandwidth

Every sub-benchmark prints a table and appends one JSON line per row to --results. Figures are steady-state
(after warm-up, so compilation is excluded) medians of repeats; ratios are reference time / rag_jax time, so > 1
means rag_jax is faster. --quick runs everything at tiny sizes, to check that it still runs (not for figures).
"""

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
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

_ALL = ["train_step", "decode", "embed", "mips", "mfu"]
_BENCHMARKS = flags.DEFINE_list("benchmarks", _ALL, f"Which sub-benchmarks to run, of {_ALL}.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes: checks that every benchmark still runs.")
_RESULTS = flags.DEFINE_string("results", "bench_results.jsonl", "JSON lines file to append results to.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement (median reported).")
_SIZES = flags.DEFINE_list("sizes", ["tiny", "small"], "Model sizes for train_step and decode (tiny, small).")
_MFU_BATCH = flags.DEFINE_integer("mfu_batch_per_device", 8, "mfu: questions per device in the paper-config step.")
_MFU_MIPS_ROWS = flags.DEFINE_integer("mfu_mips_rows", 4_000_000, "mfu: corpus rows (x 768 float32) on the device.")


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
    for _ in range(warmup):
        ours()
        reference()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ours, times[0]), (reference, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.device_count()}x "
            f"{jax.devices()[0].device_kind} (jax), torch {torch.get_num_threads()} threads")  # fmt: skip


def report(name: str, rows: list[dict]) -> None:
    """Prints rows as a table and appends them to the results file (with the 1-minute load average, since other
    jobs on the machine skew the timings)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    widths = [max(len(k), *(len(_fmt(r.get(k, ""))) for r in rows)) for k in keys]
    print(f"\n== {name} ({machine()}, load {os.getloadavg()[0]:.1f})")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for row in rows:
        print("  ".join(_fmt(row.get(k, "")).ljust(w) for k, w in zip(keys, widths)))
    with open(_RESULTS.value, "a") as f:
        for row in rows:
            record = {"benchmark": name, "machine": machine(), "load": os.getloadavg()[0], "quick": _QUICK.value}
            f.write(json.dumps({**record, **row}) + "\n")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------- shared models


def model_config(size: str) -> ml_collections.ConfigDict:
    """The run config of a benchmark model: experiments/configs/nq.py `tiny`, or `small` (4-layer 256-wide
    encoders, 3+3-layer 256-wide BART, K=5, 128 source tokens, batch 8). Real vocabulary sizes (30,522 / 50,265).
    Dropout is 0 everywhere, on both sides, so that both compute the same function (the first step's losses are
    compared)."""
    from experiments.configs import nq

    if size not in ("tiny", "small"):
        raise app.UsageError(f"--sizes: unknown size {size!r}; choose tiny or small")
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
    for enc in (c.model.question_encoder, c.model.doc_encoder):
        enc.dropout = 0.0
    c.model.generator.dropout = c.model.generator.attention_dropout = 0.0
    c.model.label_smoothing = 0.0
    return c


@dataclasses.dataclass
class Twins:
    """One random RAG model in rag_jax (its initial sharded train state) and exported for the reference."""

    config: ml_collections.ConfigDict
    model: Any  # rag_jax.rag.Rag
    mesh: Any
    tx: Any  # the run's optax optimizer
    state: Any  # rag_jax.train.TrainState, initial
    hf_dir: str  # the same weights in the Hugging Face RAG layout
    hf_config: dict[str, Any]


_TWINS: dict[str, Twins] = {}
_SCRATCH: list[tempfile.TemporaryDirectory] = []


def twins(size: str) -> Twins:
    """The Twins of `size`, built once per process (in a temporary directory removed at exit)."""
    if size not in _TWINS:
        if not _SCRATCH:
            _SCRATCH.append(tempfile.TemporaryDirectory(prefix="rag_jax_bench_"))
        _TWINS[size] = make_twins(size, _SCRATCH[0].name)
    return _TWINS[size]


def jax_model(config: ml_collections.ConfigDict) -> Twins:
    """The rag_jax side alone (no export): model, mesh over every available device, optimizer, initial state."""
    from rag_jax import experiment, sharding, train

    model = experiment.build_rag(config, load_weights=False).rag
    mesh = sharding.mesh_from_config(config.mesh)
    tx = experiment.make_optimizer(config)
    state = train.create_train_state(model, tx, mesh, jax.random.PRNGKey(config.seed))
    return Twins(config, model, mesh, tx, state, hf_dir="", hf_config={})


def make_twins(size: str, directory: str) -> Twins:
    """Builds the model of `size` with rag_jax's own initialisation and exports it to `directory`/hf-`size`."""
    from rag_jax import experiment, export

    pair = jax_model(model_config(size))
    tokenizers = experiment.load_tokenizers(pair.config)
    pair.hf_dir = os.path.join(directory, f"hf-{size}")
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(pair.state.params))
    export.save_hf_rag(pair.hf_dir, pair.model, params, "sequence", tokenizers.question, tokenizers.generator)
    with open(os.path.join(pair.hf_dir, "config.json")) as f:
        pair.hf_config = json.load(f)
    return pair


def _padded(rng: np.random.Generator, rows: int, length: int, low: int, high: int, pad: int, min_len: int):
    """Random ids in [low, high) (rows, length), right-padded with `pad` to random lengths >= min_len; 0/1 mask."""
    ids = rng.integers(low, high, size=(rows, length), dtype=np.int32)
    lengths = rng.integers(min_len, length + 1, size=rows)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return np.where(mask > 0, ids, pad).astype(np.int32), mask


def contexts(rng: np.random.Generator, model, rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Generator inputs as the retriever makes them: `<s> ...` padded to max_combined_length (rows, S)."""
    g = model.generator_config
    ids, mask = _padded(rng, rows, length, 3, g.vocab_size, g.pad_token_id, length // 2)
    ids[:, 0] = g.bos_token_id
    return ids, mask


def train_batch(config: ml_collections.ConfigDict, model, seed: int = 0) -> dict[str, np.ndarray]:
    """One global host-retrieval batch (HOST_KEYS of the step) of random tokens with realistic padding."""
    rng = np.random.default_rng(seed)
    b, k = config.train.global_batch_size, config.model.n_docs
    lq, s, t = config.data.max_question_length, config.model.max_combined_length, config.data.max_target_length
    g = model.generator_config
    q_ids, q_mask = _padded(rng, b, lq, 1000, model.question_encoder_config.vocab_size, 0, lq // 2)
    q_ids[:, 0] = 101  # [CLS]
    ctx_ids, ctx_mask = contexts(rng, model, b * k, s)
    labels, label_mask = _padded(rng, b, t, 3, g.vocab_size, g.pad_token_id, 3)  # <s> answer </s> pad...
    labels[:, 0] = g.bos_token_id
    labels[np.arange(b), label_mask.sum(1) - 1] = g.eos_token_id
    d = model.question_encoder_config.output_dim
    return {
        "question_input_ids": q_ids, "question_attention_mask": q_mask, "labels": labels,
        "gold_row": np.full((b,), -1, np.int32),
        "context_input_ids": ctx_ids.reshape(b, k, s), "context_attention_mask": ctx_mask.reshape(b, k, s),
        "doc_embeds": rng.normal(size=(b, k, d)).astype(np.float32), "doc_rows": np.tile(np.arange(k, dtype=np.int32), (b, 1)),
    }  # fmt: skip


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


# ----------------------------------------------------------------------------------------------- train_step


class JaxTrainer:
    """rag_jax's real training step (rag_jax.train.make_train_step, host retrieval) stepping a donated state."""

    def __init__(self, pair: Twins, batch: dict[str, np.ndarray]):
        from rag_jax import sharding, train, train_inputs

        self.mesh = pair.mesh
        _, state_shardings = train.state_layout(pair.model, pair.tx, self.mesh)
        self.step_fn = train.make_train_step(pair.model, pair.tx, pair.config, self.mesh, state_shardings,
                                             train_inputs.HOST_KEYS)  # fmt: skip
        self.state = jax.tree_util.tree_map(lambda x: x.copy(), pair.state)  # the step donates its state
        axes = train_inputs.BATCH_AXES
        self.batch = {key: jax.device_put(value, sharding.named_sharding(self.mesh, axes[key]))
                      for key, value in batch.items()}  # fmt: skip
        self.rng = jax.device_put(jax.random.PRNGKey(1), sharding.replicated(self.mesh))

    def compile(self):
        """The lowered and compiled step (for XLA's cost analysis); stepping uses the same executable."""
        from rag_jax import sharding

        with sharding.use(self.mesh):
            self.step_fn = self.step_fn.lower(self.state, self.batch, self.rng, {}).compile()
        return self.step_fn

    def step(self) -> float:
        """One step; returns its loss (blocks until the step is done)."""
        from rag_jax import sharding

        with sharding.use(self.mesh):  # the models' logical constraints apply when the step is traced
            self.state, metrics = self.step_fn(self.state, self.batch, self.rng, {})
        return float(metrics["loss"])


class TorchTrainer:
    """The reference's training step: RagSequenceForGeneration with the retriever bypassed (context ids and doc
    scores from the question encoder, as the reference computes them with a retriever), loss.backward(), the
    same gradient clipping, torch.optim.AdamW."""

    def __init__(self, pair: Twins, batch: dict[str, np.ndarray]):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.RagSequenceForGeneration.from_pretrained(pair.hf_dir).train()
        o = pair.config.optim
        self.max_grad_norm = float(o.max_grad_norm)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2),
                                           eps=o.eps, weight_decay=o.weight_decay)  # fmt: skip
        b, k, s = batch["context_input_ids"].shape
        as_long = lambda key: torch.as_tensor(batch[key], dtype=torch.long)
        self.inputs = dict(question_input_ids=as_long("question_input_ids"),
                           question_attention_mask=as_long("question_attention_mask"), labels=as_long("labels"),
                           context_input_ids=as_long("context_input_ids").reshape(b * k, s),
                           context_attention_mask=as_long("context_attention_mask").reshape(b * k, s),
                           doc_embeds=torch.as_tensor(batch["doc_embeds"]))  # fmt: skip

    def step(self) -> float:
        x = self.inputs
        self.optimizer.zero_grad(set_to_none=True)
        q_BxD = self.model.question_encoder(x["question_input_ids"], attention_mask=x["question_attention_mask"])
        scores_BxK = self.torch.bmm(q_BxD.pooler_output.unsqueeze(1), x["doc_embeds"].transpose(1, 2)).squeeze(1)
        out = self.model(context_input_ids=x["context_input_ids"], context_attention_mask=x["context_attention_mask"],
                         doc_scores=scores_BxK, labels=x["labels"])  # fmt: skip
        loss = out.loss.mean()  # per-example NLLs (reduce_loss False), averaged as rag_jax's step does
        loss.backward()
        if self.max_grad_norm > 0:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return float(loss.detach())


def bench_train_step(quick: bool, repeats: int) -> list[dict]:
    """Seconds per RAG-Sequence training step, rag_jax vs the reference, per model size; with the analytic model
    FLOPs of the step (rag_jax/flops.py) and the rate each side achieves."""
    from rag_jax import flops

    rows = []
    for size in ["tiny"] if quick else _SIZES.value:
        pair = twins(size)
        batch = train_batch(pair.config, pair.model)
        ours, theirs = JaxTrainer(pair, batch), TorchTrainer(pair, batch)
        # The first step of each starts from the same weights: the same loss means the same computation.
        loss_ours, loss_ref = ours.step(), theirs.step()
        t_ours, t_ref = paired_median_seconds(ours.step, theirs.step, repeats, warmup=0 if quick else 1)
        c = pair.config
        gflop = flops.rag_train_step_flops(pair.model, c.train.global_batch_size, c.model.n_docs,
                                           c.data.max_question_length, c.model.max_combined_length,
                                           c.data.max_target_length) / 1e9  # fmt: skip
        rows.append(dict(size=size, batch=c.train.global_batch_size, n_docs=c.model.n_docs,
                         source_len=c.model.max_combined_length, target_len=c.data.max_target_length,
                         devices=pair.mesh.size, ours_s=t_ours, reference_s=t_ref, speedup=t_ref / t_ours,
                         model_gflop=gflop, ours_gflop_per_s=gflop / t_ours, reference_gflop_per_s=gflop / t_ref,
                         first_loss_rel_diff=_relative(loss_ours, loss_ref)))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------- decode


def _decode_cases(pair: Twins, max_length: int) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, rag_jax GenerationConfig, the reference's generate kwargs). min_length = max_length bans EOS until
    the end, so every row generates max_length - 1 new tokens on both sides (fixed work, not the random weights'
    EOS timing)."""
    from rag_jax import decode

    length = dict(max_length=max_length, min_length=max_length)
    token = lambda beams: decode.GenerationConfig.from_hf(pair.hf_config, num_beams=beams, **length)
    sequence = decode.GenerationConfig.for_rag_sequence(pair.hf_config, num_beams=4, **length)
    return [
        ("rag_token greedy", token(1), dict(num_beams=1, **length)),
        ("rag_token beam 4", token(4), dict(num_beams=4, **length)),
        ("rag_sequence thorough beam 4", sequence, dict(num_beams=4, do_deduplication=True, **length)),
    ]


def bench_decode(quick: bool, repeats: int) -> list[dict]:
    """Seconds per decoding call over a batch of questions with their K contexts, rag_jax (jitted, compiled
    during warm-up) vs RagTokenForGeneration / RagSequenceForGeneration `generate` on the same weights."""
    import torch
    import transformers

    from rag_jax import decode

    batch, new_tokens = (4, 3) if quick else (16, 20)
    rows = []
    for size in ["tiny"] if quick else _SIZES.value:
        pair = twins(size)
        params = pair.state.params
        references = {"token": transformers.RagTokenForGeneration.from_pretrained(pair.hf_dir).eval(),
                      "sequence": transformers.RagSequenceForGeneration.from_pretrained(pair.hf_dir).eval()}
        k, s = pair.config.model.n_docs, pair.config.model.max_combined_length
        rng = np.random.default_rng(1)
        ids, mask = contexts(rng, pair.model, batch * k, s)
        scores = rng.normal(size=(batch, k)).astype(np.float32)
        jax_inputs = tuple(map(jnp.asarray, (ids, mask, scores)))
        torch_inputs = dict(context_input_ids=torch.as_tensor(ids, dtype=torch.long),
                            context_attention_mask=torch.as_tensor(mask, dtype=torch.long),
                            doc_scores=torch.as_tensor(scores), n_docs=k)  # fmt: skip
        for name, gen, kwargs in _decode_cases(pair, new_tokens + 1):
            if name.startswith("rag_token"):
                run_ours = lambda: decode.rag_token_generate(pair.model, params, *jax_inputs, gen)
                reference = references["token"]
            else:
                run_ours = lambda: decode.rag_sequence_generate(pair.model, params, *jax_inputs, gen,
                                                                mode="thorough", do_deduplication=True)
                reference = references["sequence"]

            def run_reference():
                with torch.no_grad():
                    return reference.generate(**torch_inputs, **kwargs).numpy()

            out_ours, out_ref = np.asarray(run_ours()), run_reference()  # also the warm-up (compilation)
            agree = float(np.mean(np.all(out_ours[:, : out_ref.shape[1]] == out_ref, axis=1)))
            t_ours, t_ref = paired_median_seconds(lambda: run_ours().block_until_ready(), run_reference, repeats,
                                                  warmup=0)  # fmt: skip
            rows.append(dict(size=size, decoding=name, batch=batch, n_docs=k, new_tokens=new_tokens, ours_s=t_ours,
                             reference_s=t_ref, speedup=t_ref / t_ours, same_output=agree))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------- embed


def bench_embed(quick: bool, repeats: int) -> list[dict]:
    """Passages/second of the document encoder over the bundled corpus, rag_jax vs DPRContextEncoder (torch).

    Two rows: `same batches` runs both encoders on identical padded batches (the model alone); `own pipeline`
    runs each side's embedding job from passages to vectors, tokenisation included: rag_jax's embed_passages
    (batches of similar length, as build_index runs it) against the reference as Hugging Face's RAG example
    (use_own_knowledge_dataset.py) embeds, batches in corpus order padded to their longest passage."""
    import itertools

    import torch
    import transformers

    from experiments.configs import nq
    from rag_jax import tokenizers
    from rag_jax.models import hf
    from rag_jax.retrieval import corpus, embed

    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if quick else dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)  # fmt: skip
    batch, n_batches, max_length = (16, 2, 256) if quick else (64, 16, 256)
    reference = transformers.DPRContextEncoder(transformers.DPRConfig(vocab_size=30522, **sizes)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        loaded = hf.load_encoder(tmp)
    tokenizer = tokenizers.load_question_tokenizer()
    passages = list(itertools.islice(corpus.read_passages(nq.BUNDLED_PASSAGES), batch * n_batches))
    chunks = [passages[i : i + batch] for i in range(0, len(passages), batch)]
    encode = embed.make_encode_fn(loaded.config)
    params = jax.device_put(loaded.params)

    same = [embed.tokenize_passages(tokenizer, chunk, batch, max_length) for chunk in chunks]
    same_torch = [{k: torch.as_tensor(v, dtype=torch.long) for k, v in b.items()} for b in same]

    def ours_same():
        jax.block_until_ready([encode(params, b) for b in same])

    def theirs_same():
        with torch.no_grad():
            for b in same_torch:
                reference(**b)

    def ours_pipeline():
        embed.embed_passages(encode, params, tokenizer, passages, batch, max_length)

    def theirs_pipeline():
        with torch.no_grad():
            for chunk in chunks:
                inputs = tokenizer([p.title for p in chunk], [p.text for p in chunk], truncation="longest_first",
                                   max_length=max_length, padding="longest", return_tensors="pt")  # fmt: skip
                reference(**inputs).pooler_output.numpy()

    ours_pipeline()  # compiles every length bucket
    rows = []
    for name, ours, theirs in (("same batches", ours_same, theirs_same), ("own pipeline", ours_pipeline,
                                                                          theirs_pipeline)):  # fmt: skip
        t_ours, t_ref = paired_median_seconds(ours, theirs, repeats)
        n = len(passages)
        rows.append(dict(model=f"{sizes['num_hidden_layers']}L-{sizes['hidden_size']}", batching=name, passages=n,
                         batch=batch, ours_psg_per_s=n / t_ours, reference_psg_per_s=n / t_ref,
                         speedup=t_ref / t_ours))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------- mips


def _clustered(rng: np.random.Generator, centers_CxD: np.ndarray, rows: int, chunk: int = 65_536) -> np.ndarray:
    """rows float32 vectors around random centers (ScaNN's partitioning needs structure; uniform noise has none),
    generated in chunks so that a 1M x 768 corpus needs no float64 temporaries."""
    out = np.empty((rows, centers_CxD.shape[1]), np.float32)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        out[start : start + n] = centers_CxD[rng.integers(0, len(centers_CxD), n)]
        out[start : start + n] += 0.5 * rng.standard_normal((n, centers_CxD.shape[1]), dtype=np.float32)
    return out


def _recall(rows_QxK: np.ndarray, exact_QxK: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(rows_QxK, exact_QxK)]))


def bench_mips(quick: bool, repeats: int) -> list[dict]:
    """Exact top-k queries/second: rag_jax on device vs faiss IndexFlatIP; ScaNN at recall >= 0.95. One index in
    memory at a time (a 1M x 768 float32 corpus is 3 GB; each index keeps its own copy)."""
    import gc

    import faiss

    from rag_jax.retrieval import exact, prescreen, scann_backend

    n, dim, n_queries, k = (50_000, 128, 256, 10) if quick else (1_000_000, 768, 1024, 10)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((256, dim), dtype=np.float32)
    corpus_NxD = _clustered(rng, centers, n)
    queries = _clustered(rng, centers, n_queries)

    searcher = exact.ExactSearcher(corpus_NxD, prescreen=False)
    t_plain = median_seconds(lambda: searcher.search(queries, k), repeats)
    exact_rows, _ = searcher.search(queries, k)
    del searcher
    gc.collect()

    searcher = exact.ExactSearcher(corpus_NxD, prescreen=True)
    t_ours = median_seconds(lambda: searcher.search(queries, k), repeats)
    prescreened_rows, _ = searcher.search(queries, k)
    emb_NxD = searcher.embeddings_NxD
    del searcher
    gc.collect()
    certified = np.asarray(jax.jit(prescreen.prescreened_topk, static_argnames="k")(
        jnp.asarray(queries), emb_NxD, prescreen.tables(emb_NxD), k=k)[2])  # queries the search had to redo  # fmt: skip
    del emb_NxD
    gc.collect()

    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus_NxD)
    t_faiss = median_seconds(lambda: flat.search(queries, k), repeats)
    faiss_rows = flat.search(queries, k)[1]
    del flat
    gc.collect()
    agreement = _recall(faiss_rows, exact_rows)

    scann = scann_backend.ScannSearcher.build(corpus_NxD)
    t_scann = median_seconds(lambda: scann.search(queries, k), repeats)
    scann_rows, _ = scann.search(queries, k)
    recall = _recall(scann_rows, exact_rows)
    base = dict(corpus=n, dim=dim, queries=n_queries, k=k)
    return [
        dict(**base, method="rag_jax exact, float32 matmul + top_k", qps=n_queries / t_plain, recall_vs_exact=1.0,
             speedup_vs_faiss=t_faiss / t_plain),
        dict(**base, method="rag_jax exact, certified bfloat16 pre-selection", qps=n_queries / t_ours,
             recall_vs_exact=_recall(prescreened_rows, exact_rows), speedup_vs_faiss=t_faiss / t_ours,
             certified=float(np.mean(certified))),
        dict(**base, method="faiss IndexFlatIP", qps=n_queries / t_faiss, recall_vs_exact=agreement,
             speedup_vs_faiss=1.0),
        dict(**base, method="ScaNN (tree + AH + reorder)", qps=n_queries / t_scann, recall_vs_exact=recall,
             speedup_vs_faiss=t_faiss / t_scann),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------- mfu


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    name: str
    bf16_flops: float  # dense peak FLOP/s per device (jax device)
    hbm_bytes_per_s: float


# Matched in order against jax's device_kind (TPU v5e reports "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite"), so
# the more specific names come first. Vendor datasheet figures; H100/H200 are the SXM parts, dense (no sparsity).
PEAKS: tuple[tuple[tuple[str, ...], DevicePeak], ...] = (
    (("v6 lite", "v6e"), DevicePeak("TPU v6e", 918e12, 1640e9)),
    (("v5 lite", "v5e"), DevicePeak("TPU v5e", 197e12, 819e9)),
    (("v5p", "tpu v5"), DevicePeak("TPU v5p", 459e12, 2765e9)),
    (("tpu v4",), DevicePeak("TPU v4", 275e12, 1228e9)),
    (("h200",), DevicePeak("H200", 989e12, 4800e9)),
    (("h100 pcie",), DevicePeak("H100 PCIe", 756e12, 2000e9)),
    (("h100",), DevicePeak("H100 SXM", 989e12, 3350e9)),
    (("a100-sxm4-40gb", "a100-pcie-40gb"), DevicePeak("A100 40GB", 312e12, 1555e9)),
    (("a100",), DevicePeak("A100 80GB", 312e12, 2039e9)),
)


def device_peak(device_kind: str) -> DevicePeak | None:
    """The peak bf16 FLOP/s and HBM bandwidth of a jax device kind, or None when it is not in PEAKS."""
    kind = device_kind.lower()
    for names, peak in PEAKS:
        if any(name in kind for name in names):
            return peak
    return None


def paper_config(batch_per_device: int) -> ml_collections.ConfigDict:
    """experiments/configs/nq.py `paper` with its networks' sizes (BERT-base encoders, BART-large, K=10, 128
    question / 300 source / 25 target tokens, bf16) and random weights; the batch is per device."""
    from experiments.configs import nq
    from rag_jax import aot

    config = aot.sizes_only(nq.get_config("paper"))
    config.train.global_batch_size = batch_per_device * jax.device_count()
    return config


def mfu_rows(config: ml_collections.ConfigDict, peak: DevicePeak, repeats: int, mips_rows: int,
             mips_queries: tuple[int, ...] = (8, 64)) -> list[dict]:  # fmt: skip
    """Training-step MFU of `config` on all devices, and exact MIPS bytes/second on one, against `peak`."""
    from rag_jax import flops
    from rag_jax.retrieval import exact

    pair = jax_model(config)
    model, mesh = pair.model, pair.mesh
    trainer = JaxTrainer(pair, train_batch(config, model))
    pair.state = None  # the trainer steps its own copy; one state in device memory, not two
    xla_cost = trainer.compile().cost_analysis()
    xla_cost = xla_cost[0] if isinstance(xla_cost, (list, tuple)) else xla_cost
    seconds = median_seconds(trainer.step, repeats, warmup=1)  # compiled above; warm-up runs one step
    c = config
    b, k = c.train.global_batch_size, c.model.n_docs
    model_flops = flops.rag_train_step_flops(model, b, k, c.data.max_question_length, c.model.max_combined_length,
                                             c.data.max_target_length)  # fmt: skip
    devices = mesh.size
    rows = [dict(measure="train_step", device=peak.name, devices=devices, dtype=c.model.compute_dtype, batch=b,
                 n_docs=k, seconds=seconds, model_tflops=model_flops / 1e12,
                 xla_tflops=float(xla_cost.get("flops", 0.0)) * devices / 1e12,
                 achieved_tflops_per_s=model_flops / seconds / 1e12,
                 fraction_of_peak=model_flops / seconds / (peak.bf16_flops * devices))]  # fmt: skip
    del trainer, pair  # free the device memory for the corpus

    dim = 768
    corpus_NxD = jax.random.normal(jax.random.PRNGKey(2), (mips_rows, dim), jnp.float32)
    search = jax.jit(exact.exact_topk, static_argnames=("k",))
    for q in mips_queries:
        queries = jax.random.normal(jax.random.PRNGKey(3), (q, dim), jnp.float32)
        seconds = median_seconds(lambda: jax.block_until_ready(search(queries, corpus_NxD, k=10)), repeats)
        corpus_bytes = corpus_NxD.size * corpus_NxD.dtype.itemsize  # read once per search
        rows.append(dict(measure=f"exact MIPS {mips_rows}x{dim} f32, {q} queries, top-10", device=peak.name,
                         devices=1, seconds=seconds, achieved_gb_per_s=corpus_bytes / seconds / 1e9,
                         fraction_of_peak=corpus_bytes / seconds / peak.hbm_bytes_per_s))  # fmt: skip
    return rows


def bench_mfu(quick: bool, repeats: int) -> list[dict]:
    """The paper config's training-step MFU in bf16 and exact MIPS bandwidth, on an accelerator only."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        reason = "no accelerator (jax.devices() is CPU): MFU is measured on TPU/GPU only"
        print(f"mfu: skipped: {reason}")
        return [dict(status="skipped", reason=reason)]
    peak = device_peak(device.device_kind)
    if peak is None:
        reason = f"device kind {device.device_kind!r} is not in experiments/bench.py PEAKS; add its peak figures"
        print(f"mfu: skipped: {reason}")
        return [dict(status="skipped", reason=reason)]
    if quick:
        return mfu_rows(model_config("tiny"), peak, repeats, mips_rows=100_000)
    return mfu_rows(paper_config(_MFU_BATCH.value), peak, repeats, mips_rows=_MFU_MIPS_ROWS.value)


BENCHMARKS = {"train_step": bench_train_step, "decode": bench_decode, "embed": bench_embed, "mips": bench_mips,
              "mfu": bench_mfu}  # fmt: skip


def main(argv):
    del argv
    unknown = [b for b in _BENCHMARKS.value if b not in BENCHMARKS]
    if unknown:
        raise app.UsageError(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    repeats = 1 if _QUICK.value else _REPEATS.value
    for name in _BENCHMARKS.value:
        report(name, BENCHMARKS[name](_QUICK.value, repeats))


if __name__ == "__main__":
    app.run(main)
