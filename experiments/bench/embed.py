"""embed: document-encoder passages/second vs DPRContextEncoder, on the same batches and as each side's own
embedding pipeline."""

from __future__ import annotations

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import Options, interleaved_median_seconds, paired_median_seconds, reference_autocast


def run(opts: Options) -> list[dict]:
    """Passages/second of the document encoder over the bundled corpus, rag_jax vs DPRContextEncoder (torch).

    Two rows: `same batches` runs both encoders on identical padded batches (the model alone); `own pipeline`
    runs each side's embedding job from passages to vectors, tokenisation included: rag_jax's embed_passages
    (batches of similar length, as build_index runs it) against the reference as Hugging Face's RAG example
    (use_own_knowledge_dataset.py) embeds, batches in corpus order padded to their longest passage. `--dtypes`
    with bfloat16 adds `same batches` rows of rag_jax's encoder in bfloat16 against the reference in float32 and
    under torch.autocast(bfloat16), with the embeddings' cosine to rag_jax's float32 ones (--quick: one row)."""
    import itertools

    import torch
    import transformers

    from experiments.configs import nq
    from rag_jax.data import tokenizers
    from rag_jax.models import hf
    from rag_jax.retrieval import corpus, embed

    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if opts.quick else dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)  # fmt: skip
    batch, n_batches, max_length = (16, 2, 256) if opts.quick else (64, 16, 256)
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
        t_ours, t_ref = paired_median_seconds(ours, theirs, opts.repeats)
        n = len(passages)
        rows.append(dict(model=f"{sizes['num_hidden_layers']}L-{sizes['hidden_size']}", batching=name, passages=n,
                         batch=batch, dtype="float32", ours_psg_per_s=n / t_ours, reference_psg_per_s=n / t_ref,
                         speedup=t_ref / t_ours))  # fmt: skip
    low = [d for d in opts.dtypes if d != "float32"] or (["bfloat16"] if opts.quick else [])
    for dtype in low:
        low_encode = embed.make_encode_fn(dataclasses.replace(loaded.config, dtype=getattr(jnp, dtype)))
        vectors = [np.asarray(low_encode(params, b), np.float32) for b in same]  # also compiles
        exact = [np.asarray(encode(params, b), np.float32) for b in same]
        cosine = min(_min_cosine(a, b) for a, b in zip(vectors, exact))

        def theirs_low():
            with torch.no_grad(), reference_autocast(dtype):
                for b in same_torch:
                    reference(**b)

        t_ours, t_ref, t_autocast = interleaved_median_seconds(
            (lambda: jax.block_until_ready([low_encode(params, b) for b in same]), theirs_same, theirs_low),
            opts.repeats)  # fmt: skip
        n = len(passages)
        same_fields = {key: rows[0][key] for key in ("model", "batching", "passages", "batch")}
        rows.append(dict(same_fields, dtype=dtype, ours_psg_per_s=n / t_ours, reference_psg_per_s=n / t_ref,
                         reference_autocast_psg_per_s=n / t_autocast, speedup_vs_reference_float32=t_ref / t_ours,
                         speedup_vs_reference_autocast=t_autocast / t_ours,
                         min_cosine_to_ours_float32=cosine))  # fmt: skip
    return rows


def _min_cosine(a_NxD: np.ndarray, b_NxD: np.ndarray) -> float:
    """The smallest cosine similarity between matching rows of two (N, D) arrays."""
    dots = (a_NxD * b_NxD).sum(-1)
    return float((dots / (np.linalg.norm(a_NxD, axis=-1) * np.linalg.norm(b_NxD, axis=-1))).min())
