"""retriever_step: one DPR training step of train_retriever (both encoders forward and backward over the global
batch, in-batch negatives plus one hard negative a question, clipped AdamW) vs the same step in PyTorch with
transformers' DPRQuestionEncoder / DPRContextEncoder on the same weights and batch (DPR's BiEncoderNllLoss)."""

from __future__ import annotations

import tempfile

import jax
import numpy as np
import optax

from experiments.bench.common import Options, paired_median_seconds, relative

LEARNING_RATE, MAX_GRAD_NORM = 2e-5, 2.0  # DPR's


def run(opts: Options) -> list[dict]:
    import torch
    import transformers

    from rag_jax.models import hf
    from rag_jax.training import contrastive

    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if opts.quick else dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)  # fmt: skip
    questions, q_len, p_len = (4, 16, 32) if opts.quick else (16, 32, 128)
    hard = 1
    dpr = transformers.DPRConfig(vocab_size=30522, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **sizes)
    torch.manual_seed(0)
    q_ref, d_ref = transformers.DPRQuestionEncoder(dpr).train(), transformers.DPRContextEncoder(dpr).train()
    with tempfile.TemporaryDirectory() as tmp:
        q_ref.save_pretrained(f"{tmp}/q")
        d_ref.save_pretrained(f"{tmp}/d")
        q_ours, d_ours = hf.load_encoder(f"{tmp}/q"), hf.load_encoder(f"{tmp}/d")

    rng = np.random.default_rng(0)
    batch = {"question_ids": rng.integers(1000, 30000, (questions, q_len)).astype(np.int32),
             "question_mask": np.ones((questions, q_len), np.int32),
             "passage_ids": rng.integers(1000, 30000, (questions * (1 + hard), p_len)).astype(np.int32),
             "passage_mask": np.ones((questions * (1 + hard), p_len), np.int32)}
    torch_batch = {k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()}
    positives = torch.arange(questions) * (1 + hard)

    # rag_jax: the step train_retriever runs (contrastive.make_update), jitted, parameters donated.
    tx = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM), optax.adamw(LEARNING_RATE, weight_decay=0.0))
    update = contrastive.make_update(q_ours.module(), d_ours.module(), tx, shared_encoder=False)
    step = jax.jit(update, donate_argnums=(0, 1))
    params = jax.device_put({"question": q_ours.params, "document": d_ours.params})
    state = [params, jax.jit(tx.init)(params)]
    device_batch = jax.device_put(batch)
    key = jax.random.key(0)
    losses = {}

    def ours():
        state[0], state[1], metrics = step(state[0], state[1], device_batch, key)
        losses.setdefault("ours", float(metrics["loss"]))

    optimizer = torch.optim.AdamW(list(q_ref.parameters()) + list(d_ref.parameters()), lr=LEARNING_RATE,
                                  weight_decay=0.0)

    def theirs():
        optimizer.zero_grad()
        q = q_ref(torch_batch["question_ids"], attention_mask=torch_batch["question_mask"]).pooler_output
        d = d_ref(torch_batch["passage_ids"], attention_mask=torch_batch["passage_mask"]).pooler_output
        loss = torch.nn.functional.nll_loss(torch.log_softmax(q @ d.T, dim=-1), positives)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(q_ref.parameters()) + list(d_ref.parameters()), MAX_GRAD_NORM)
        optimizer.step()
        losses.setdefault("reference", loss.item())

    ours()  # the first step of each from the same weights: the losses must agree
    theirs()
    t_ours, t_ref = paired_median_seconds(ours, theirs, opts.repeats)
    return [dict(model=f"2x {sizes['num_hidden_layers']}L-{sizes['hidden_size']}", questions=questions,
                 passages=questions * (1 + hard), question_len=q_len, passage_len=p_len, ours_s=t_ours,
                 reference_s=t_ref, speedup=t_ref / t_ours,
                 first_loss_rel_diff=relative(losses["ours"], losses["reference"]))]
