"""train_step: one RAG-Sequence training step (forward, backward, clipped AdamW), rag_jax's real jitted step vs
transformers' RagSequenceForGeneration + torch.optim.AdamW on the same weights and batch, with a BART and with a
T5 (v1.1 / Flan-T5 style) generator; and the end-to-end step (model.doc_encoder.trainable: the K passages embedded
again by the trained document encoder; BART) vs transformers' RAG in context-encoder training mode
(`set_context_encoder_for_training`)."""

from __future__ import annotations

import jax
import numpy as np

import dataclasses
import os

from experiments.bench.common import (Options, Twins, interleaved_median_seconds, jax_model, model_config, padded,
                                      paired_median_seconds, reference_autocast, relative, train_batch, twins,
                                      with_compute_dtype)  # fmt: skip


class JaxTrainer:
    """rag_jax's real training step (rag_jax.training.step.make_train_step, host retrieval) stepping a donated state."""

    def __init__(self, pair: Twins, batch: dict[str, np.ndarray]):
        from rag_jax import sharding
        from rag_jax.training import inputs, step

        self.mesh = pair.mesh
        _, state_shardings = step.state_layout(pair.model, pair.tx, self.mesh)
        self.step_fn = step.make_train_step(pair.model, pair.tx, pair.config, self.mesh, state_shardings,
                                            tuple(batch))  # fmt: skip
        self.state = jax.tree_util.tree_map(lambda x: x.copy(), pair.state)  # the step donates its state
        axes = inputs.BATCH_AXES
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
    same gradient clipping, torch.optim.AdamW. dtype "bfloat16": the forward and the loss under
    torch.autocast(cpu, bfloat16), backward and optimizer outside it (torch's recipe; weights stay float32)."""

    def __init__(self, pair: Twins, batch: dict[str, np.ndarray], model=None, dtype: str = "float32"):
        import torch
        import transformers

        self.torch = torch
        self.dtype = dtype
        self.model = model or transformers.RagSequenceForGeneration.from_pretrained(pair.hf_dir).train()
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
        with reference_autocast(self.dtype):
            q_BxD = self.model.question_encoder(x["question_input_ids"], attention_mask=x["question_attention_mask"])
            scores_BxK = self.torch.bmm(q_BxD.pooler_output.unsqueeze(1), x["doc_embeds"].transpose(1, 2)).squeeze(1)
            out = self.model(context_input_ids=x["context_input_ids"],
                             context_attention_mask=x["context_attention_mask"], doc_scores=scores_BxK,
                             labels=x["labels"])  # fmt: skip
            loss = out.loss.float().mean()  # per-example NLLs (reduce_loss False), averaged as rag_jax's step does
        loss.backward()
        if self.max_grad_norm > 0:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return float(loss.detach())


class _FixedRetriever:
    """transformers' RagRetriever call, answering with the batch's passages (generator inputs and context-encoder
    tokens), as RagRetriever does after `set_ctx_encoder_tokenizer`: the search itself is not timed."""

    def __init__(self, out):
        self.out = out

    def __call__(self, question_input_ids, question_hidden_states, prefix=None, n_docs=None, return_tensors=None):
        import transformers

        return transformers.BatchEncoding(self.out)


class TorchEnd2EndTrainer(TorchTrainer):
    """The reference's end-to-end step: RagSequenceForGeneration after `set_context_encoder_for_training`, which
    embeds the retrieved passages' context-encoder tokens with the trained DPRContextEncoder inside forward."""

    def __init__(self, pair: Twins, batch: dict[str, np.ndarray], dtype: str = "float32"):
        import torch
        import transformers

        model = transformers.RagSequenceForGeneration.from_pretrained(pair.hf_dir)
        model.set_context_encoder_for_training(
            transformers.DPRContextEncoder.from_pretrained(os.path.join(pair.hf_dir, "ctx_encoder")))
        super().__init__(pair, batch, model.train(), dtype)  # the optimizer gets the context encoder's parameters too
        b, k, length = batch["doc_input_ids"].shape
        as_long = lambda key, n: torch.as_tensor(batch[key], dtype=torch.long).reshape(b * k, n)
        s = batch["context_input_ids"].shape[-1]
        self.model.set_retriever(_FixedRetriever(dict(
            context_input_ids=as_long("context_input_ids", s), context_attention_mask=as_long("context_attention_mask", s),
            retrieved_doc_embeds=torch.as_tensor(batch["doc_embeds"]), doc_ids=torch.zeros(b, k),
            tokenized_doc_ids=as_long("doc_input_ids", length),
            tokenized_doc_attention_mask=as_long("doc_attention_mask", length))))

    def step(self) -> float:
        x = self.inputs
        self.optimizer.zero_grad(set_to_none=True)
        with reference_autocast(self.dtype):
            out = self.model(input_ids=x["question_input_ids"], attention_mask=x["question_attention_mask"],
                             labels=x["labels"])
            loss = out.loss.float().mean()
        loss.backward()
        if self.max_grad_norm > 0:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return float(loss.detach())


_END2END: dict[str, Twins] = {}


def end2end_twins(size: str, directory: str) -> Twins:
    """The model of `size` with a trained document encoder (its own random weights), exported for the reference:
    the RAG checkpoint and a DPRContextEncoder beside it (`ctx_encoder/`)."""
    from rag_jax.inference import export
    from rag_jax.runs import build

    if size not in _END2END:
        config = model_config(size)
        config.model.doc_encoder.trainable = True
        pair = jax_model(config)
        tokenizers = build.load_tokenizers(config)
        hf_dir = os.path.join(directory, f"hf-end2end-{size}")
        params = jax.tree_util.tree_map(np.asarray, jax.device_get(pair.state.params))
        export.save_hf_rag(hf_dir, pair.model, params, "rag_sequence", tokenizers.question, tokenizers.generator)
        export.save_hf_encoder(os.path.join(hf_dir, "ctx_encoder"), pair.model.doc_encoder_config,
                               params["doc_encoder"], "ctx", tokenizers.question)
        _END2END[size] = dataclasses.replace(pair, hf_dir=hf_dir)
    return _END2END[size]


def end2end_batch(config, model, seed: int = 0) -> dict[str, np.ndarray]:
    """train_batch plus the passages' document-encoder tokens ([CLS]-led, padded to index.max_length from half of it
    up). Token types are 0: transformers passes its context encoder none in this mode."""
    batch = train_batch(config, model, seed)
    b, k = batch["doc_rows"].shape
    length = config.index.max_length
    ids, mask = padded(np.random.default_rng(seed + 1), b * k, length, 1000, model.doc_encoder_config.vocab_size, 0,
                       length // 2)
    ids[:, 0] = 101  # [CLS]
    return {**batch, "doc_input_ids": ids.reshape(b, k, length), "doc_attention_mask": mask.reshape(b, k, length),
            "doc_token_type_ids": np.zeros((b, k, length), np.int32)}


def run(opts: Options) -> list[dict]:
    """Seconds per RAG-Sequence training step, rag_jax vs the reference, per model size and generator; with the
    analytic model FLOPs of the step (rag_jax/training/flops.py, BART or T5) and the rate each side achieves. Each
    of `opts.dtypes` other than float32 adds a row per case (bfloat16_rows); --quick adds one, tiny BART."""
    import tempfile

    rows = []
    scratch = tempfile.TemporaryDirectory(prefix="rag_jax_bench_end2end_")
    sizes = ["tiny"] if opts.quick else opts.sizes
    cases = [(size, "rag", generator) for size in sizes for generator in opts.generators]
    cases += [(size, "end2end", "bart") for size in sizes]
    for size, mode, generator in cases:
        pair, batch, trainers = _case(size, mode, generator, scratch.name)
        ours, theirs = trainers(pair, "float32")
        # The first step of each starts from the same weights: the same loss means the same computation.
        loss_ours, loss_ref = ours.step(), theirs.step()
        t_ours, t_ref = paired_median_seconds(ours.step, theirs.step, opts.repeats, warmup=0 if opts.quick else 1)
        row = dict(_shape_fields(pair, size, mode, generator), dtype="float32", ours_s=t_ours, reference_s=t_ref,
                   speedup=t_ref / t_ours)  # fmt: skip
        rows.append(dict(_with_flops(row, pair, mode), first_loss_rel_diff=relative(loss_ours, loss_ref)))
        low = [d for d in opts.dtypes if d != "float32"]
        if opts.quick and (size, mode, generator) == ("tiny", "rag", "bart"):
            low = low or ["bfloat16"]  # one cheap row, so that the tests cover the path
        for dtype in low:
            rows.append(_low_precision_row(pair, size, mode, generator, dtype, trainers, (loss_ours, ours, theirs),
                                           opts))  # fmt: skip
    return [_with_cost_over_frozen(row, rows) for row in rows]


def _case(size: str, mode: str, generator: str, scratch: str):
    """The float32 Twins, batch and a `trainers(pair, dtype) -> (ours, reference)` maker of one case."""
    if mode == "rag":
        pair = twins(size, generator)
        batch = train_batch(pair.config, pair.model)
        return pair, batch, lambda p, dtype: (JaxTrainer(p, batch), TorchTrainer(p, batch, dtype=dtype))
    pair = end2end_twins(size, scratch)
    batch = end2end_batch(pair.config, pair.model)
    return pair, batch, lambda p, dtype: (JaxTrainer(p, batch), TorchEnd2EndTrainer(p, batch, dtype=dtype))


def _low_precision_row(pair: Twins, size: str, mode: str, generator: str, dtype: str, trainers, float32: tuple,
                       opts: Options) -> dict:  # fmt: skip
    """rag_jax's step with model.compute_dtype=`dtype` (parameters and optimizer state float32) timed in turn
    with the reference's float32 step, its step under torch.autocast(`dtype`) and rag_jax's float32 step
    (`float32`: its first loss, rag_jax's and the reference's float32 trainers), from the same weights and batch.
    first_loss_rel_diff is against rag_jax's float32 first loss (what the lower precision costs);
    reference_autocast_loss_rel_diff the reference's autocast loss against the same."""
    loss_float32, ours_float32, reference_float32 = float32
    low_pair = with_compute_dtype(pair, dtype)
    ours, autocast = trainers(low_pair, dtype)
    loss_ours, loss_autocast = ours.step(), autocast.step()
    t_ours, t_ref, t_autocast, t_float32 = interleaved_median_seconds(
        (ours.step, reference_float32.step, autocast.step, ours_float32.step), opts.repeats,
        warmup=0 if opts.quick else 1)  # fmt: skip
    row = dict(_shape_fields(pair, size, mode, generator), dtype=dtype, ours_s=t_ours, reference_s=t_ref,
               reference_autocast_s=t_autocast, ours_float32_s=t_float32, speedup_vs_reference_float32=t_ref / t_ours,
               speedup_vs_reference_autocast=t_autocast / t_ours, speedup_vs_ours_float32=t_float32 / t_ours)
    return dict(_with_flops(row, pair, mode), first_loss_rel_diff=relative(loss_ours, loss_float32),
                reference_autocast_loss_rel_diff=relative(loss_autocast, loss_float32))


def _shape_fields(pair: Twins, size: str, mode: str, generator: str) -> dict:
    c = pair.config
    return dict(size=size, mode=mode, generator=generator, batch=c.train.global_batch_size, n_docs=c.model.n_docs,
                source_len=c.model.max_combined_length, target_len=c.data.max_target_length, devices=pair.mesh.size)


def step_gflop(pair: Twins, mode: str = "rag") -> float:
    """The analytic model GFLOP of one training step of `pair` (mode "end2end": the trained document encoder's
    forward and backward over the K passages included)."""
    from rag_jax.training import flops

    c = pair.config
    gflop = flops.rag_train_step_flops(pair.model, c.train.global_batch_size, c.model.n_docs,
                                       c.data.max_question_length, c.model.max_combined_length,
                                       c.data.max_target_length) / 1e9  # fmt: skip
    if mode == "end2end":  # + the K passages through the document encoder, forward and backward
        gflop += flops.trained_doc_encoder_flops(pair.model.doc_encoder_config, c.train.global_batch_size,
                                                 c.model.n_docs, c.index.max_length) / 1e9
    return gflop


def _with_flops(row: dict, pair: Twins, mode: str) -> dict:
    """The row with the step's analytic model FLOPs and the rate each side achieves."""
    gflop = step_gflop(pair, mode)
    return dict(row, model_gflop=gflop, ours_gflop_per_s=gflop / row["ours_s"],
                reference_gflop_per_s=gflop / row["reference_s"])


def _with_cost_over_frozen(row: dict, rows: list[dict]) -> dict:
    """An end2end row with its cost over the frozen-d(z) step of the same size (the BART `rag` row): measured
    (rag_jax's seconds) and in model FLOPs; what the extra FLOPs justify is the second (issue 32)."""
    frozen = [r for r in rows if (r["mode"], r["generator"], r["size"], r["dtype"]) == ("rag", "bart", row["size"],
                                                                                       row["dtype"])]
    if row["mode"] != "end2end" or not frozen:
        return row
    return dict(row, measured_over_frozen=row["ours_s"] / frozen[0]["ours_s"],
                flops_over_frozen=row["model_gflop"] / frozen[0]["model_gflop"])
