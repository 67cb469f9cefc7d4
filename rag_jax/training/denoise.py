"""A denoising warm-up of a randomly initialised generator on the run's passages, before RAG training starts.

BART's own pre-training objective (text infilling, Lewis et al. 2019): spans of a passage, with Poisson-distributed
lengths covering about 30% of its tokens, are each replaced by one <mask>, and the generator reconstructs the whole
passage. Most target tokens are in the input, so the decoder learns to find and copy tokens of the encoder's input:
the skill a RAG generator needs to answer from a retrieved passage, and one that RAG's loss alone does not teach a
small BART trained from scratch. Measured on the bundled knowledge task (rag_jax/data/knowledge_task.py, 3,000
training entities, the gold passage as the only context, a 128-wide 2+2-layer BART, 1,500 steps of 16 questions):
held-out exact match 3% without the warm-up, the loss resting at the entropy of the answers' marginal (the model
learns which kind of answer a question wants, not to read it); 85% after 300 warm-up steps. The warm-up's length
and rate matter more than RAG's: on the test's small version (240 entities, a 1,200-entry vocabulary, K=1, 300 RAG
steps at 1e-3) held-out exact match was 48% after 300 warm-up steps at 1e-3 and 78% after 200 at 2e-3, while RAG
training itself at 2e-3 stayed at chance. A pretrained BART
(model.generator.init) needs none of this: it is for generators that start from random weights (config
`denoise.steps`, 0 turns it off).

The warm-up trains only the generator, with its own AdamW (linear warm-up, then linear decay to 10%), data parallel
over the run's mesh; it is a deterministic function of the seed, so a run that is interrupted before its first
checkpoint redoes it exactly.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rag_jax import rag, sharding
from rag_jax.readers import rag_sequence
from rag_jax.retrieval import contexts, corpus
from rag_jax.runs import streams


def applies(config: ml_collections.ConfigDict) -> bool:
    """Whether the run warms its generator up: denoise.steps > 0 and the generator starts from random weights."""
    return int(config.denoise.steps) > 0 and config.model.init_from_rag is None and config.model.generator.init == "random"


def infill(ids_L: np.ndarray, rng: np.random.Generator, *, mask_id: int, mask_ratio: float,
           mean_span: float) -> np.ndarray:
    """BART text infilling of one tokenised passage `<s> tokens </s>` (no padding): spans of Poisson(mean_span)
    tokens (at least 1), started at a rate that masks about mask_ratio of the tokens, each become one <mask>."""
    inner = list(ids_L[1:-1])
    out = [ids_L[0]]
    start_rate = mask_ratio / max(mean_span, 1.0)
    i = 0
    while i < len(inner):
        if rng.random() < start_rate:
            out.append(mask_id)
            i += max(1, int(rng.poisson(mean_span)))
        else:
            out.append(inner[i])
            i += 1
    out.append(ids_L[-1])
    return np.asarray(out, np.int32)


def passage_texts(path: str, fmt: contexts.ContextFormat) -> list[str]:
    """Each passage as the generator sees it in its inputs, without a question: `title / text` (FiD's layout:
    `title: {title} context: {text}`)."""
    if fmt.layout == "fid":
        return [f"title: {p.title} context: {p.text}" for p in corpus.read_passages(path)]
    return [contexts.combine(p.title, p.text, "", fmt).rstrip().removesuffix(fmt.doc_sep.strip()).rstrip()
            for p in corpus.read_passages(path)]


def batches(texts: list[str], tokenizer, config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
    """Endless (source ids, source mask, labels) batches of denoise.batch_size passages, (B, denoise.max_length)."""
    d = config.denoise
    length = int(d.max_length)
    # T5 has no BOS: its decoder inputs get the start token (pad) in front, as in RAG training (decoder_labels), and
    # no <mask> either: spans become its first sentinel, <extra_id_0>.
    start = [] if tokenizer.bos_token_id is not None else [tokenizer.pad_token_id]
    targets = tokenizer(texts, truncation=True, max_length=length - len(start))["input_ids"]
    mask_id = tokenizer.mask_token_id
    mask_id = tokenizer.convert_tokens_to_ids("<extra_id_0>") if mask_id is None else mask_id
    rng = np.random.default_rng(np.asarray(streams.key(config.seed, streams.DENOISE)))
    pad = tokenizer.pad_token_id
    while True:
        rows = rng.integers(0, len(targets), int(d.batch_size))
        source = np.full((len(rows), length), pad, np.int32)
        labels = np.full((len(rows), length), pad, np.int32)
        for i, row in enumerate(rows):
            target = np.asarray(targets[row], np.int32)
            corrupted = infill(target, rng, mask_id=mask_id, mask_ratio=float(d.mask_ratio),
                               mean_span=float(d.mean_span))
            source[i, :len(corrupted)] = corrupted
            target = np.asarray(start + list(target), np.int32)
            labels[i, :len(target)] = target
        yield {"ids": source, "mask": (source != pad).astype(np.int32), "labels": labels}


def _optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    d = config.denoise
    steps, peak = int(d.steps), float(d.learning_rate)
    warm = max(1, min(100, steps // 5))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warm),
                                     optax.linear_schedule(peak, 0.1 * peak, max(1, steps - warm))], [warm])
    return optax.chain(optax.clip_by_global_norm(float(config.optim.max_grad_norm) or 1.0),
                       optax.adamw(schedule, weight_decay=0.0))


def make_step(model: rag.Rag, tx: optax.GradientTransformation, mesh, param_shardings) -> Callable:
    """Jitted (generator params, opt state, batch) -> (params, opt state, loss): the seq2seq NLL of the passage
    (summed over tokens, averaged over the batch), decoder inputs = labels as in RAG training."""
    pad, bos = model.generator_config.pad_token_id, model.generator_config.bos_token_id

    def loss_fn(generator, batch):
        logits = model.generator_logits({"generator": generator}, batch["ids"], batch["mask"], batch["labels"])
        no_prior = jnp.zeros((batch["labels"].shape[0], 1), jnp.float32)  # one "document": the plain seq2seq NLL
        return rag_sequence.nll(logits, no_prior, batch["labels"], pad_token_id=pad, bos_token_id=bos).mean()

    def step(generator, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(generator, batch)
        updates, opt_state = tx.update(grads, opt_state, generator)
        return optax.apply_updates(generator, updates), opt_state, loss

    rows = sharding.named_sharding(mesh, ("batch", "length"))
    return jax.jit(step, in_shardings=(param_shardings, None, {"ids": rows, "mask": rows, "labels": rows}),
                   out_shardings=(param_shardings, None, sharding.replicated(mesh)), donate_argnums=(0, 1))


def warm_up(model: rag.Rag, generator: Any, config: ml_collections.ConfigDict, tokenizer, mesh, param_shardings, *,
            log: Callable[[str], None] = print) -> Any:
    """The generator's parameters after denoise.steps of text infilling on data.passages."""
    steps = int(config.denoise.steps)
    tx = _optimizer(config)
    opt_state = jax.jit(tx.init, out_shardings=None)(generator)
    step = make_step(model, tx, mesh, param_shardings)
    texts = passage_texts(config.data.passages, model.config.context)
    data = batches(texts, tokenizer, config)
    rows = sharding.named_sharding(mesh, ("batch", "length"))
    log(f"generator warm-up: {steps} steps of BART text infilling on {len(texts)} passages")
    start, losses = time.time(), []
    with sharding.use(mesh):
        for i in range(steps):
            batch = {k: jax.make_array_from_callback(v.shape, rows, lambda idx, v=v: v[idx]) for k, v in next(data).items()}
            generator, opt_state, loss = step(generator, opt_state, batch)
            losses.append(loss)
            if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
                mean = float(np.mean(jax.device_get(losses)))
                losses = []
                log(f"warm-up step {i + 1}/{steps} | passage NLL {mean:.1f} | {time.time() - start:.0f}s")
    return generator
