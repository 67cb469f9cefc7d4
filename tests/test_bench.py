"""The benchmark script keeps running (--quick, once), compares like with like, and its analytic FLOP counter agrees
with XLA's count. No timings are asserted: only that they exist and what the rows must hold."""

import collections
import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from experiments import bench
from experiments.bench import common, mfu
from rag_jax import rag
from rag_jax.readers import rag_sequence
from rag_jax.runs import build
from rag_jax.training import flops
from tests import process_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    """Rows of one `--quick` run of every sub-benchmark, by benchmark name."""
    results = tmp_path_factory.mktemp("bench") / "results.jsonl"
    # The suite's XLA flags and compilation cache, as every command of the suite (tests/process_env.py): no timing is
    # asserted. Measured (idle, AVX2 2-core machine): 189 s wall / 272 user CPU seconds without, 158 s / 211 s with.
    env = process_env.command_env()
    command = [sys.executable, "-m", "experiments.bench", "--quick", f"--benchmarks={','.join(bench.BENCHMARKS)}",
               f"--results={results}"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = collections.defaultdict(list)
    with open(results) as f:
        for line in f:
            record = json.loads(line)
            assert record["quick"] is True
            assert record["machine"].endswith("denormals flushed by torch")  # the same floating-point mode as XLA
            rows[record["benchmark"]].append(record)
    return rows, done.stdout


@pytest.mark.slow
def test_quick_run_writes_every_benchmark(quick_rows):
    rows, stdout = quick_rows
    assert set(rows) == set(bench.BENCHMARKS)
    for name in bench.BENCHMARKS:
        assert f"== {name} (" in stdout  # each printed its table


@pytest.mark.slow
def test_quick_train_step_compares_the_same_computation(quick_rows):
    """One rag row per generator (BART, T5), each against transformers' RAG with that generator on the same weights,
    and the end-to-end row (trained document encoder, transformers' context-encoder training mode); and one
    bfloat16 row (tiny BART) against the reference in float32 and under torch.autocast(bfloat16)."""
    rows = quick_rows[0]["train_step"]
    assert [(r["size"], r["mode"], r["generator"], r["dtype"]) for r in rows] == [
        ("tiny", "rag", "bart", "float32"), ("tiny", "rag", "bart", "bfloat16"), ("tiny", "rag", "t5", "float32"),
        ("tiny", "end2end", "bart", "float32")]  # fmt: skip
    float32 = [r for r in rows if r["dtype"] == "float32"]
    for row in float32:
        assert row["ours_s"] > 0 and row["reference_s"] > 0
        assert row["speedup"] == pytest.approx(row["reference_s"] / row["ours_s"])
        # Same weights, batch and dropout setting: the first step's losses agree, so the two steps do the same work.
        assert row["first_loss_rel_diff"] < 1e-4
    assert all(row["model_gflop"] > 0 and row["ours_gflop_per_s"] > 0 for row in rows)  # T5 rows too
    assert float32[2]["model_gflop"] > float32[0]["model_gflop"]  # + the document encoder's forward and backward
    # The end-to-end row's cost over the frozen step of its size (the BART rag row), measured and in FLOPs.
    assert float32[2]["measured_over_frozen"] == pytest.approx(float32[2]["ours_s"] / float32[0]["ours_s"])
    assert float32[2]["flops_over_frozen"] == pytest.approx(float32[2]["model_gflop"] / float32[0]["model_gflop"])
    bf16 = rows[1]
    assert bf16["model_gflop"] == float32[0]["model_gflop"]  # the same step, in another precision
    assert bf16["ours_s"] > 0 and bf16["reference_s"] > 0 and bf16["reference_autocast_s"] > 0
    assert bf16["speedup_vs_reference_float32"] == pytest.approx(bf16["reference_s"] / bf16["ours_s"])
    assert bf16["speedup_vs_reference_autocast"] == pytest.approx(bf16["reference_autocast_s"] / bf16["ours_s"])
    assert bf16["speedup_vs_ours_float32"] == pytest.approx(bf16["ours_float32_s"] / bf16["ours_s"])
    # bfloat16 changes the first loss (it computes in bfloat16) but only by bfloat16 rounding (8 bits of mantissa),
    # and the reference's autocast loss likewise.
    assert 0 < bf16["first_loss_rel_diff"] < 2e-2
    assert 0 < bf16["reference_autocast_loss_rel_diff"] < 2e-2


@pytest.mark.slow
def test_quick_decode_covers_the_three_decodings(quick_rows):
    rows = quick_rows[0]["decode"]
    decodings = ["rag_token greedy", "rag_token beam 4", "rag_sequence thorough beam 4"]
    float32 = [r for r in rows if r["dtype"] == "float32"]
    assert [(r["generator"], r["decoding"]) for r in float32] == [(g, d) for g in ("bart", "t5") for d in decodings]
    for row in float32:
        assert row["ours_s"] > 0 and row["reference_s"] > 0, row.get("reference")
        # Same weights and inputs: the outputs are the reference's (a row may flip on a float32 near-tie).
        assert row["same_output"] >= 0.75
    # One bfloat16 row (tiny BART greedy, after its float32 row), against the reference in float32 and autocast.
    (bf16,) = [r for r in rows if r["dtype"] == "bfloat16"]
    assert rows.index(bf16) == 1 and (bf16["generator"], bf16["decoding"]) == ("bart", "rag_token greedy")
    assert bf16["speedup_vs_reference_autocast"] == pytest.approx(bf16["reference_autocast_s"] / bf16["ours_s"])
    assert 0.0 <= bf16["same_output_as_ours_float32"] <= 1.0


EVAL_CASES = ["rag_token greedy", "rag_sequence thorough beam 2"]


@pytest.mark.slow
def test_quick_eval_and_host_rows(quick_rows):
    rows = quick_rows[0]
    expected = [(g, d) for g in ("bart", "t5") for d in EVAL_CASES]
    assert [(r["generator"], r["decoding"]) for r in rows["eval"]] == expected
    for row in rows["eval"]:  # eval_nq and transformers' loop answer alike on the same weights and index
        # (T5's RAG-Sequence rows caught eval_nq cutting the contexts that the reference's search attends to)
        assert row["ours_process_s"] > 0 and row["reference_loop_s"] > 0 and row["same_predictions"] == 1.0, row
    # per generator, BART's tokenizer then T5's (SentencePiece), whose paper_t5 device step is the longer
    modes = ["host (strings, then the tokenizer)", "host (glued from the token table)", "device (token table)"]
    assert [(r["generator"], r["contexts"]) for r in rows["host"]] == [(g, m) for g in ("bart", "t5") for m in modes]
    assert all(r["host_ms_per_step"] > 0 and r["device_step_ms_v4_32"] > 100 for r in rows["host"])
    assert rows["host"][3]["device_step_ms_v4_32"] > rows["host"][0]["device_step_ms_v4_32"]
    assert [r["variant"] for r in rows["host_train"]] == ["sequential", "overlap", "stale_prefetch"]
    for row in rows["host_train"]:
        assert row["retrieval"] == "host" and row["steps_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["steps_per_s"] / rows["host_train"][0]["steps_per_s"])


def test_quick_compressed_rows(quick_rows):
    """Every kind of index is measured; re-ranked codes find exact search's top 10; 21M x 768 memory is computed."""
    rows = quick_rows[0]["compressed"]
    measured = {(r["index"], r.get("rerank")) for r in rows if "recall@10" in r}
    assert {("float32", "-"), ("bfloat16", "-"), ("int8", 0), ("int8", 50), ("pq:8", 0), ("pq:8", 50)} <= measured
    recall = {(r["index"], r.get("rerank")): r["recall@10"] for r in rows if "recall@10" in r}
    assert recall[("int8", 50)] >= 0.99 and recall[("pq:8", 50)] > recall[("pq:8", 0)]
    memory = {r["index"]: r["GB"] for r in rows if "GB" in r}
    assert memory["float32"] == 64.56 and memory["pq:96"] == 2.02


def test_quick_mips_embed_and_mfu_rows(quick_rows):
    rows = quick_rows[0]
    assert {r["method"].split(" ")[0] for r in rows["mips"]} == {"rag_jax", "faiss", "ScaNN"}
    ours = [r for r in rows["mips"] if r["method"].startswith("rag_jax")]
    assert len(ours) == 2 and all(r["recall_vs_exact"] >= 0.999 for r in ours)  # plain, pre-selected (f32 near-ties)
    assert ours[1]["certified"] > 0.9  # the pre-selection proves most queries itself
    assert [(r["batching"], r["dtype"]) for r in rows["embed"]] == [
        ("same batches", "float32"), ("own pipeline", "float32"), ("same batches", "bfloat16")]
    assert all(r["ours_psg_per_s"] > 0 and r["reference_psg_per_s"] > 0 for r in rows["embed"])
    bf16 = rows["embed"][2]
    assert bf16["speedup_vs_reference_autocast"] == pytest.approx(
        bf16["ours_psg_per_s"] / bf16["reference_autocast_psg_per_s"])
    assert 0.99 < bf16["min_cosine_to_ours_float32"] <= 1.0 + 1e-6  # bfloat16 rounding, not another function
    # A CPU run: the measured GEMM peaks in float32 and bfloat16, and the step's share of each.
    gemm_f32, gemm_bf16, step = rows["mfu"]
    assert "float32" in gemm_f32["measure"] and "bfloat16" in gemm_bf16["measure"]
    assert step["dtype"] == "bfloat16" and step["achieved_gflop_per_s"] > 0
    for key, gemm in (("share_of_float32_peak", gemm_f32), ("share_of_bfloat16_peak", gemm_bf16)):
        assert step[key] == pytest.approx(step["achieved_gflop_per_s"] / gemm["achieved_gflop_per_s"])


# ----------------------------------------------------------------------------------------------- FLOP counter


def _sized_config(width: int, ffn: int, q_vocab: int, g_vocab: int, generator: str = "bart",
                  feed_forward_proj: str = "gated-gelu"):  # fmt: skip
    config = common.model_config("tiny", generator)
    for enc in (config.model.question_encoder, config.model.doc_encoder):
        enc.hidden_size, enc.intermediate_size, enc.num_heads, enc.num_layers, enc.vocab_size = width, ffn, 4, 2, q_vocab
    g = config.model.generator
    g.d_model, g.ffn_dim, g.heads, g.encoder_layers, g.decoder_layers, g.vocab_size = width, ffn, 4, 2, 3, g_vocab
    if generator == "t5":  # heads * d_kv != d_model, as in T5-large's 16 x 64 over 1024 (here 4 x 24 over width)
        g.d_kv, g.feed_forward_proj = 24, feed_forward_proj
    return config


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


# (width, ffn, question vocab, generator vocab[, generator]): LM-head dominated (the real vocabularies at tiny
# width), and layer dominated (small vocabularies), so that a wrong term in either part shows; the whole step with
# a T5 generator once (the generator's forward alone, for more T5 variants, is the next test).
@pytest.mark.parametrize("sizes", [(32, 64, 30522, 50265), (128, 512, 1000, 1000), (128, 512, 1000, 1000, "t5")])
def test_flop_counter_matches_xla_cost_analysis(sizes):
    """Analytic matmul FLOPs of forward + backward vs XLA's count of the loss's value_and_grad, on one CPU device.
    XLA also counts softmax, layer norm, GELU and the loss (not in the analytic count): at most 20% more."""
    config = _sized_config(*sizes)
    model = build.build_rag(config, load_weights=False).rag
    params = jax.eval_shape(lambda r: nn.meta.unbox(rag.init_params(model, r)), jax.random.PRNGKey(0))
    b, k = config.train.global_batch_size, config.model.n_docs
    lq, s, t = config.data.max_question_length, config.model.max_combined_length, config.data.max_target_length
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    inputs = (ints(b, lq), ints(b, lq), ints(b * k, s), ints(b * k, s), ints(b, t),
              jax.ShapeDtypeStruct((b, k, sizes[0]), jnp.float32))  # fmt: skip

    def loss(params, q_ids, q_mask, ctx_ids, ctx_mask, labels, doc_embeds):
        scores = rag.doc_scores(model.encode_questions(params, q_ids, q_mask), doc_embeds)
        logits = model.generator_logits(params, ctx_ids, ctx_mask, labels)
        return rag_sequence.nll(logits, scores, labels, pad_token_id=1).mean()

    forward = flops.rag_forward_flops(model, b, k, lq, s, t)
    step = flops.rag_train_step_flops(model, b, k, lq, s, t)
    assert step == 3 * forward
    with jax.default_device(jax.devices("cpu")[0]):
        xla_step = _xla_flops(jax.value_and_grad(loss), params, *inputs)
    assert 0.8 <= step / xla_step <= 1.0


@pytest.mark.parametrize("sizes", [(128, 512, 1000, 1000), (32, 64, 30522, 32128, "t5"), (128, 512, 1000, 1000, "t5"),
                                   (128, 512, 1000, 1000, "t5", "relu")])  # fmt: skip
def test_generator_flop_counter_matches_xla_forward(sizes):
    """The generator's teacher-forced forward alone (BART; T5 v1.1 and v1.0, heads * d_kv != d_model) against XLA's
    count of the jitted forward: the matmuls are all but a few percent of it, so a missing or doubled term shows."""
    config = _sized_config(*sizes)
    model = build.build_rag(config, load_weights=False).rag
    params = jax.eval_shape(lambda r: nn.meta.unbox(rag.init_params(model, r)), jax.random.PRNGKey(0))
    rows, s, t = config.train.global_batch_size * config.model.n_docs, 48, 8
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    forward = lambda p, ids, mask, labels: model.generator_logits(p, ids, mask, labels)
    with jax.default_device(jax.devices("cpu")[0]):
        xla = _xla_flops(forward, params, ints(rows, s), ints(rows, s), ints(rows // config.model.n_docs, t))
    assert 0.95 <= flops.generator_forward_flops(model.generator_config, rows, s, t) / xla <= 1.0


def test_flop_counter_terms():
    """Hand-countable cases: one BERT layer, and BART's LM head alone."""
    cfg = common.model_config("tiny")
    model = build.build_rag(cfg, load_weights=False).rag
    q = model.question_encoder_config  # 1 layer, hidden 32, mlp 64, [CLS] pooling, no projection
    e, f, n, length = q.hidden_size, q.intermediate_size, 3, 5
    expected = 2 * n * length * (4 * e * e + 2 * e * f) + 2 * 2 * n * length * length * e
    assert flops.bert_forward_flops(q, n, length) == expected
    g = model.generator_config
    without_head = flops.generator_forward_flops(g, 2, 7, 4) - 2 * 2 * 4 * g.d_model * g.vocab_size
    assert without_head == flops.generator_forward_flops(dataclasses.replace(g, vocab_size=0), 2, 7, 4)


# ----------------------------------------------------------------------------------------------- mfu pieces


@pytest.mark.parametrize("kind,name", [
    ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"), ("TPU v5", "TPU v5p"), ("TPU v5p", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e"), ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
])  # fmt: skip
def test_device_peaks(kind, name):
    assert mfu.device_peak(kind).name == name


def test_device_peak_values_and_unknown_kinds():
    assert mfu.device_peak("TPU v4").bf16_flops == 275e12
    assert mfu.device_peak("TPU v5 lite").bf16_flops == 197e12
    assert mfu.device_peak("NVIDIA H100 80GB HBM3").bf16_flops == 989e12
    assert mfu.device_peak("cpu") is None


@pytest.mark.slow
def test_mfu_rows_run_on_cpu():
    """The accelerator-only code path, run here on the tiny config against a made-up peak so that it cannot rot."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["test"])
    peak = mfu.DevicePeak("nominal", bf16_flops=1e12, hbm_bytes_per_s=1e10)
    configs = [common.model_config("tiny", generator) for generator in ("bart", "t5")]
    *steps, mips = mfu.mfu_rows(configs, peak, repeats=1, mips_rows=4096, mips_queries=(4,))
    assert [step["generator"] for step in steps] == ["bart", "t5"]
    for c, step in zip(configs, steps):
        model = build.build_rag(c, load_weights=False).rag
        expected = flops.rag_train_step_flops(model, c.train.global_batch_size, c.model.n_docs,
                                              c.data.max_question_length, c.model.max_combined_length,
                                              c.data.max_target_length)  # fmt: skip
        assert step["model_tflops"] == pytest.approx(expected / 1e12)
        assert step["xla_tflops"] > 0 and step["seconds"] > 0
        assert step["fraction_of_peak"] == pytest.approx(expected / step["seconds"] / (1e12 * step["devices"]))
    assert mips["achieved_gb_per_s"] == pytest.approx(4096 * 768 * 4 / mips["seconds"] / 1e9)


def test_mfu_paper_configs_hold_the_paper_generators():
    """mfu's full-size configs: BART-large for bart, T5 v1.1-large sizes (paper_t5) for t5."""
    bart_cfg = build.build_rag(mfu.paper_config(1, "bart"), load_weights=False).rag.generator_config
    t5_cfg = build.build_rag(mfu.paper_config(1, "t5"), load_weights=False).rag.generator_config
    assert (type(bart_cfg).__name__, bart_cfg.d_model, bart_cfg.encoder_layers) == ("BartConfig", 1024, 12)
    assert (type(t5_cfg).__name__, t5_cfg.d_model, t5_cfg.encoder_layers, t5_cfg.d_ff) == ("T5Config", 1024, 24, 2816)


# ----------------------------------------------------------------------------------------------- speed changes


def test_rag_token_marginal_equals_the_logsumexp_formula():
    """rag_token.marginal_log_probs (one exp per logit, made for speed) is the reference's
    logsumexp_z(log p(z|x) + log_softmax(logits_z)), including where the documents disagree strongly."""
    from rag_jax.readers import rag_token

    key_logits, key_docs = jax.random.split(jax.random.PRNGKey(0))
    logits_NxKxV = jax.random.normal(key_logits, (6, 3, 500)) * jnp.asarray([1.0, 5.0, 20.0])[None, :, None]
    doc_lp_NxK = jax.nn.log_softmax(jax.random.normal(key_docs, (6, 3)) * 3, axis=-1)
    expected = jax.nn.logsumexp(jax.nn.log_softmax(logits_NxKxV, axis=-1) + doc_lp_NxK[..., None], axis=1)
    got = rag_token.marginal_log_probs(logits_NxKxV, doc_lp_NxK)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.exp(got).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_quick_retriever_step_compares_the_same_computation(quick_rows):
    (row,) = quick_rows[0]["retriever_step"]
    assert row["ours_s"] > 0 and row["reference_s"] > 0
    assert row["speedup"] == pytest.approx(row["reference_s"] / row["ours_s"])
    # Same weights and batch, dropout off: the first DPR losses agree, so both steps do the same work.
    assert row["first_loss_rel_diff"] < 1e-4


@pytest.mark.slow
def test_quick_fid_rows_compare_the_same_computation(quick_rows):
    """Per generator (BART, T5): FiD's train step against the PyTorch FiD (transformers' model, the encoder over the
    B*K passages, outputs concatenated) on the same weights and batch, then greedy and beam-4 decoding."""
    rows = quick_rows[0]["fid"]
    assert [(r["generator"], r["case"]) for r in rows] == [
        (g, c) for g in ("bart", "t5") for c in ("train_step", "greedy", "beam 4")]
    for row in rows:
        assert row["ours_s"] > 0 and row["reference_s"] > 0
        assert row["speedup"] == pytest.approx(row["reference_s"] / row["ours_s"])
    for row in (r for r in rows if r["case"] == "train_step"):
        # Same weights, batch and dropout setting: the first step's losses agree, so the two steps do the same work.
        assert row["first_loss_rel_diff"] < 1e-4
    for row in (r for r in rows if r["case"] != "train_step"):
        assert row["same_output"] >= 0.5  # same weights and passages (a row may flip on a float32 near-tie)
