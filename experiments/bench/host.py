"""host: the host side of host-mode retrieval alone, at the paper config's per-host shapes (the generator's tokenizer,
K=10, 300-token contexts, 16 questions per host per step: a 64-question batch over the 4 hosts of a v4-32 slice),
next to the device step time that experiments.compile_nq's FLOP count implies there at 50% utilisation.

Timed per batch: tokenising the questions for the question encoder, decoding those ids back to text (the
reference's quirk), forming `title / text // question` for each of the K passages and tokenising the 160 strings
for the generator, padded to 300. The search itself is not included (on a pod it runs on the devices).

The second row forms the same generator inputs on the host from the passage token table instead
(contexts.table_generator_inputs: the passages' tokens cached once, only the question parts tokenised per batch;
what eval_nq's --contexts=table does). The third row is what is left on the host in device mode (retrieval.mode="device": contexts assembled on the
devices from a per-passage token table, rag_jax/retrieval/contexts.py): the same question tokenisation and
decoding, and the generator tokens of the 16 question parts only.

With `--generators` holding t5, the same three rows with a T5 (SentencePiece) generator tokenizer, the one the other
T5 rows use (trained on the bundled passages: no real T5 tokenizer can be downloaded here, so its 1,100 pieces
stand in for T5's 32,128), next to the step time compile_nq implies for the `paper_t5` config."""

from __future__ import annotations

import itertools
import json

import numpy as np

from experiments.bench.common import Options, median_seconds, t5_tokenizer_dir

ASSETS = "rag_jax/assets/nq_open_mini"
QUESTIONS_PER_HOST, N_DOCS = 16, 10
# experiments.compile_nq on v4-32, TFLOPs per device per step: `paper` (BART-large) 15.5, `paper_t5` (T5 v1.1-large
# sizes) 31.5 (README's table). A v4 chip's bf16 peak is 275 TFLOP/s, so 50% utilisation implies
# 15.5 / (0.5 * 275) = 0.113 s a step with BART and 0.229 s with T5.
DEVICE_TFLOPS_V4_32 = {"bart": 15.5, "t5": 31.5}
DEVICE_STEP_S = {generator: tflops / (0.5 * 275) for generator, tflops in DEVICE_TFLOPS_V4_32.items()}


def run(opts: Options) -> list[dict]:
    """The three rows per generator in opts.generators (BART: the bundled bart-large tokenizer; T5: SentencePiece)."""
    from rag_jax.data import tokenizers

    rows = []
    for generator in opts.generators:
        gtok = tokenizers.load_generator_tokenizer(*([t5_tokenizer_dir()] if generator == "t5" else []))
        rows += [dict(generator=generator, **row) for row in _rows(opts, gtok, DEVICE_STEP_S[generator])]
    return rows


def _rows(opts: Options, gtok, device_step_s: float) -> list[dict]:
    from rag_jax.data import tokenizers
    from rag_jax.retrieval import contexts, corpus

    qtok = tokenizers.load_question_tokenizer()
    passages = list(itertools.islice(corpus.read_passages(f"{ASSETS}/passages.tsv"), 2000))
    with open(f"{ASSETS}/questions.jsonl") as f:
        questions = [json.loads(line)["question"] for line in f]
    rng = np.random.default_rng(0)
    fmt = contexts.ContextFormat(max_combined_length=300)
    batches = 4 if opts.quick else 40

    def token_table_host_side():
        for b in range(batches):
            batch = questions[b * QUESTIONS_PER_HOST : (b + 1) * QUESTIONS_PER_HOST]
            ids = qtok(batch, truncation=True, max_length=128, padding=True, return_tensors="np")["input_ids"]
            contexts.question_tokens(contexts.decode_questions(ids, qtok), gtok, 64)

    table = contexts.passage_table_rows(passages, gtok, fmt)

    def table_glued_host_side():
        for b in range(batches):
            batch = questions[b * QUESTIONS_PER_HOST : (b + 1) * QUESTIONS_PER_HOST]
            ids = qtok(batch, truncation=True, max_length=128, padding=True, return_tensors="np")["input_ids"]
            rows = rng.choice(len(passages), (len(batch), N_DOCS))
            [[passages[r] for r in row] for row in rows]  # the passages still come back, as from host retrieval
            contexts.table_generator_inputs(contexts.decode_questions(ids, qtok), rows, table, gtok, fmt)

    def host_side():
        for b in range(batches):
            batch = questions[b * QUESTIONS_PER_HOST : (b + 1) * QUESTIONS_PER_HOST]
            ids = qtok(batch, truncation=True, max_length=128, padding=True, return_tensors="np")["input_ids"]
            rows = rng.choice(len(passages), (len(batch), N_DOCS))
            chosen = [[passages[r] for r in row] for row in rows]
            contexts.generator_inputs(contexts.decode_questions(ids, qtok), [[p.title for p in row] for row in chosen],
                                      [[p.text for p in row] for row in chosen], gtok, fmt)  # fmt: skip

    rows = []
    modes = (("host (strings, then the tokenizer)", host_side),
             ("host (glued from the token table)", table_glued_host_side),
             ("device (token table)", token_table_host_side))
    for mode, fn in modes:
        per_batch = median_seconds(fn, opts.repeats) / batches
        rows.append(dict(contexts=mode, questions_per_host=QUESTIONS_PER_HOST, n_docs=N_DOCS, context_tokens=300,
                         host_ms_per_step=per_batch * 1e3, questions_per_s=QUESTIONS_PER_HOST / per_batch,
                         device_step_ms_v4_32=device_step_s * 1e3, host_share_of_step=per_batch / device_step_s))
    return rows
