"""The embedding job's batching: passages grouped by length inside a window, vectors back in corpus order."""

import itertools

import numpy as np
import torch

from experiments.configs import nq
from rag_jax.data import tokenizers
from rag_jax.models import hf
from rag_jax.retrieval import corpus, embed
from tests import hf_models


def test_length_sorted_batches_return_each_passage_its_own_vector(tmp_path):
    """embed_passages sorts by token length, so batches mix passages from all over the window; every row must
    still be the reference DPRContextEncoder's vector of the passage at that row, encoded alone (no padding)."""
    reference = hf_models.dpr_context_encoder(seed=3, vocab_size=30522, max_position_embeddings=128).eval()
    reference.save_pretrained(tmp_path)
    loaded = hf.load_encoder(str(tmp_path))
    tokenizer = tokenizers.load_question_tokenizer()
    passages = list(itertools.islice(corpus.read_passages(nq.BUNDLED_PASSAGES), 21))
    batches = []
    vectors = embed.embed_passages(embed.make_encode_fn(loaded.config), loaded.params, tokenizer, passages,
                                   batch_size=4, max_length=96, on_batch=batches.append)  # fmt: skip

    assert batches == [4, 4, 4, 4, 4, 1]
    lengths = [len(tokenizer(p.title, p.text, truncation="longest_first", max_length=96)["input_ids"]) for p in passages]
    assert lengths != sorted(lengths)  # the order really changes
    with torch.no_grad():
        expected = np.concatenate([
            reference(**tokenizer(p.title, p.text, truncation="longest_first", max_length=96,
                                  return_tensors="pt")).pooler_output.numpy()
            for p in passages
        ])  # fmt: skip
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5)


def test_fingerprint_covers_pooling_and_normalisation_and_keeps_older_indexes():
    """An index must refuse an encoder that pools or normalises differently; an index built before BertConfig had
    `normalize` keeps its identity (the values below were computed by the code of that time)."""
    from rag_jax.models import bert  # pylint: disable=g-import-not-at-top

    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    mean = bert.BertConfig(hidden_size=32, num_heads=2, pooling="mean")
    assert embed.encoder_fingerprint(mean, params) == "4ed7d38fdc6071f5"
    assert embed.encoder_fingerprint(bert.BertConfig(), params) == "d78119767a55b0ff"
    others = {embed.encoder_fingerprint(c, params) for c in (
        bert.BertConfig(hidden_size=32, num_heads=2, pooling="cls"),
        bert.BertConfig(hidden_size=32, num_heads=2, pooling="mean", normalize=True))}  # fmt: skip
    assert len(others) == 2 and "4ed7d38fdc6071f5" not in others
