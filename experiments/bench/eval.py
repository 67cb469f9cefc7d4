"""eval: `python -m experiments.eval_nq` as a user runs it (the whole process: start-up, loading, compilation,
answering) against transformers' evaluation loop alone (as examples/research_projects/rag/eval_rag.py runs it:
batches of 8 questions through `RagRetriever` and `generate`; its model loading and index building not timed), on
the same random weights, the same index contents (a faiss IndexFlatIP over the same vectors) and the same
questions: RAG-Token greedy and RAG-Sequence thorough decoding with beam 2, K=4, max_length 10; with a BART and with
a T5 (v1.0-style, real 32,128-entry vocabulary) generator, whose SentencePiece tokenizer, trained on the bundled
passages, both sides read from the checkpoint's RagTokenizer subfolders."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from experiments.bench.common import Options

ASSETS = "rag_jax/assets/nq_open_mini"
N_DOCS, MAX_LENGTH, BATCH = 4, 10, 8
# T5's real vocabulary: the model can emit ids the small test tokenizer lacks (a real T5, its 28 unused ones)
T5_VOCAB = 32128
# (model class, eval_nq flags, reference generate kwargs, questions as in the measurement)
CASES = {
    "rag_token greedy": ("RagTokenForGeneration", ["--reader=rag_token", "--num_beams=1"], dict(num_beams=1), 2620),
    "rag_sequence thorough beam 2": ("RagSequenceForGeneration", ["--reader=rag_sequence", "--num_beams=2"],
                                     dict(num_beams=2), 655),
}


DPR = dict(vocab_size=30522, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
           max_position_embeddings=512)  # fmt: skip


def _generator_config(generator: str):
    import transformers

    if generator == "t5":
        # bos_token_id None said explicitly (transformers' RAG loss reads it); decoder_start_token_id 0 as real T5
        # checkpoints' config.json says (a T5Config built in transformers 5 has none)
        return transformers.T5Config(vocab_size=T5_VOCAB, d_model=36, d_kv=9, d_ff=37, num_layers=2,
                                     num_decoder_layers=2, num_heads=4, feed_forward_proj="relu", bos_token_id=None,
                                     decoder_start_token_id=0)  # fmt: skip
    return transformers.BartConfig(vocab_size=50265, d_model=36, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                   decoder_ffn_dim=41, max_position_embeddings=320, forced_eos_token_id=None)


def _workspace(directory: str, n_passages: int, n_questions: int):
    """The index of the bundled passages (random-weight DPR context encoder) and the questions."""
    import torch
    import transformers

    from rag_jax.data import tokenizers
    from rag_jax.models import hf
    from rag_jax.retrieval import corpus, embed

    torch.manual_seed(0)
    transformers.DPRContextEncoder(transformers.DPRConfig(**DPR)).save_pretrained(f"{directory}/ctx")
    passages = list(itertools.islice(corpus.read_passages(f"{ASSETS}/passages.tsv"), n_passages))
    corpus.write_passages_tsv(f"{directory}/passages.tsv", passages)
    qtok = tokenizers.load_question_tokenizer()
    ctx = hf.load_encoder(f"{directory}/ctx")
    index = embed.build_index(ctx.config, ctx.params, qtok, f"{directory}/passages.tsv", f"{directory}/index",
                              batch_size=64, progress=False)  # fmt: skip
    with open(f"{ASSETS}/questions.jsonl") as f:
        lines = [json.loads(line) for line in f]
    questions = [lines[i % len(lines)] for i in range(n_questions)]
    with open(f"{directory}/questions.jsonl", "w") as out:
        for q in questions:
            out.write(json.dumps({"question": q["question"], "answers": q["answers"]}) + "\n")
    return passages, index, [q["question"] for q in questions]


def _checkpoints(directory: str, generator: str) -> str:
    """Random-weight DPR + `generator` RAG checkpoints (both classes, the same weights) under
    `directory`/`generator`/; a T5 one holds its tokenizers in the RagTokenizer layout. Returns that directory."""
    import torch
    import transformers

    from experiments.bench.common import t5_tokenizer_dir
    from rag_jax.data import tokenizers

    out = f"{directory}/{generator}"
    for cls in ("RagTokenForGeneration", "RagSequenceForGeneration"):
        torch.manual_seed(1)  # the same weights for both classes
        config = transformers.RagConfig.from_question_encoder_generator_configs(
            transformers.DPRConfig(**DPR), _generator_config(generator), n_docs=N_DOCS, index_name="custom")
        config.architectures = [cls]
        getattr(transformers, cls)(config).eval().save_pretrained(f"{out}/{cls}")
        if generator == "t5":
            tokenizers.load_question_tokenizer().save_pretrained(f"{out}/{cls}/{tokenizers.RAG_QUESTION_SUBDIR}")
            tokenizers.load_generator_tokenizer(t5_tokenizer_dir()).save_pretrained(
                f"{out}/{cls}/{tokenizers.RAG_GENERATOR_SUBDIR}")
    return out


def _reference(directory: str, cls: str, passages, index):
    """transformers' model with a RagRetriever over a faiss IndexFlatIP of the same vectors."""
    import datasets
    import faiss
    import transformers

    from rag_jax.data import tokenizers

    own = f"{directory}/{cls}/{tokenizers.RAG_QUESTION_SUBDIR}"
    pair = tokenizers.load_rag_tokenizers(f"{directory}/{cls}" if os.path.isdir(own) else None)
    qtok, gtok = pair.question, pair.generator
    dataset = datasets.Dataset.from_dict({"title": [p.title for p in passages], "text": [p.text for p in passages],
                                          "embeddings": list(index.embeddings(np.float32))})  # fmt: skip
    dataset.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(index.dim))
    config = transformers.RagConfig.from_pretrained(f"{directory}/{cls}")
    retriever = transformers.RagRetriever(config, question_encoder_tokenizer=qtok, generator_tokenizer=gtok,
                                          index=transformers.models.rag.retrieval_rag.CustomHFIndex(index.dim, dataset))
    model = getattr(transformers, cls).from_pretrained(f"{directory}/{cls}", retriever=retriever).eval()
    return model, qtok, gtok


def _reference_loop(model, qtok, gtok, questions, generate_kwargs) -> list[str]:
    """eval_rag.py's evaluate_batch_e2e over batches of BATCH questions."""
    import torch

    answers = []
    with torch.no_grad():
        for start in range(0, len(questions), BATCH):
            encoded = qtok(questions[start : start + BATCH], return_tensors="pt", padding=True, truncation=True)
            out = model.generate(encoded["input_ids"], attention_mask=encoded["attention_mask"], n_docs=N_DOCS,
                                 max_length=MAX_LENGTH, early_stopping=False, num_return_sequences=1,
                                 **generate_kwargs)  # fmt: skip
            answers += [a.strip() for a in gtok.batch_decode(out, skip_special_tokens=True)]
    return answers


def _eval_nq(directory: str, models: str, cls: str, flags: list[str], n: int) -> tuple[float, list[str]]:
    output = f"{directory}/predictions.jsonl"
    command = [sys.executable, "-m", "experiments.eval_nq", f"--model={models}/{cls}", f"--index={directory}/index",
               f"--questions={directory}/questions.jsonl", f"--output={output}", "--overwrite", f"--limit={n}",
               f"--n_docs={N_DOCS}", f"--max_length={MAX_LENGTH}", *flags]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if done.returncode:
        raise RuntimeError(f"eval_nq failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    seconds = time.perf_counter() - start
    with open(output) as f:
        return seconds, [json.loads(line)["prediction"] for line in f]


def run(opts: Options) -> list[dict]:
    rows = []
    scale = opts.eval_questions_scale
    with tempfile.TemporaryDirectory() as directory:
        passages, index, questions = _workspace(directory, 200 if opts.quick else 2600, 16 if opts.quick else 2620)
        models = {generator: _checkpoints(directory, generator) for generator in opts.generators}
        for generator, (name, (cls, flags, kwargs, n)) in itertools.product(opts.generators, CASES.items()):
            n = 16 if opts.quick else max(8, int(n * scale))
            model, qtok, gtok = _reference(models[generator], cls, passages, index)
            ours, reference = [], []
            for _ in range(opts.repeats):  # alternately, so both see the same background load
                seconds, predictions = _eval_nq(directory, models[generator], cls, flags, n)
                ours.append(seconds)
                start = time.perf_counter()
                answers = _reference_loop(model, qtok, gtok, questions[:n], kwargs)
                reference.append(time.perf_counter() - start)
            ratios = [r / o for o, r in zip(ours, reference)]
            agree = float(np.mean([a == b for a, b in zip(predictions, answers)]))
            rows.append(dict(generator=generator, decoding=name, questions=n, ours_process_s=float(np.median(ours)),
                             reference_loop_s=float(np.median(reference)),
                             speedup=float(np.median(reference) / np.median(ours)),
                             spread=f"{min(ratios):.2f}-{max(ratios):.2f}", same_predictions=agree))  # fmt: skip
    return rows
