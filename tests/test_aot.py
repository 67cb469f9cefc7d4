"""Ahead-of-time compilation of the real train step for a TPU topology, on this CPU-only machine."""

import os
import subprocess
import sys

import pytest

from experiments.configs import nq
from rag_jax.training import aot

pytest.importorskip("libtpu", reason="ahead-of-time TPU compilation needs libtpu (pip install 'jax[tpu]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_train_step_compiles_for_a_tpu_slice():
    config = nq.get_config("tiny")
    report = aot.compile_train_step(config, aot.parse_topology("v5e-8"))
    assert report.devices == 8 and report.mesh == {"data": 8, "model": 1}
    assert report.fits and report.flops_per_device > 0
    # The arguments hold at least the float32 parameters and Adam's two moments (sharded, so a per-device share).
    assert report.per_device_bytes["arguments"] > 0
    assert report.per_device_bytes["aliased"] > 0  # the donated train state is reused for the new one


def test_tiny_t5_train_step_compiles_and_paper_t5_has_t5_large_sizes():
    config = nq.get_config("tiny")
    g = config.model.generator
    g.architecture, g.d_kv, g.vocab_size = "t5", 16, 1100
    report = aot.compile_train_step(config, aot.parse_topology("v5e-8"))
    assert report.fits and report.flops_per_device > 0
    sized = aot.sizes_only(nq.get_config("paper_t5")).model.generator
    assert (sized.architecture, sized.d_model, sized.encoder_layers, sized.heads, sized.ffn_dim, sized.d_kv) == (
        "t5", 1024, 24, 16, 2816, 64)


@pytest.mark.slow
def test_end_to_end_train_step_compiles_with_the_doc_encoder_in_the_state():
    """A trained d(z) (reranking L=4 of index candidates to K=2): more state (its params and Adam moments) and more
    FLOPs (L passages embedded, K of them with gradients) than the paper's frozen-d(z) step."""
    frozen = aot.compile_train_step(nq.get_config("tiny"), aot.parse_topology("v5e-8"))
    config = nq.get_config("tiny")
    config.model.doc_encoder.trainable = True
    config.retrieval.rerank_candidates = 4
    trained = aot.compile_train_step(config, aot.parse_topology("v5e-8"))
    assert trained.fits
    assert trained.per_device_bytes["aliased"] > frozen.per_device_bytes["aliased"]
    assert trained.flops_per_device > frozen.flops_per_device


@pytest.mark.parametrize(
    "name,expected",
    [("v4-8", ("v4:2x2x1", 4)), ("v4-32", ("v4:2x2x4", 16)), ("v5e-16", ("v5e:4x4", 16)), ("v6e-8", ("v6e:2x4", 8))],
)
def test_accelerator_types_map_to_topologies(name, expected):
    topology = aot.parse_topology(name)
    assert (topology.topology_name, len(topology.devices())) == expected


def test_unknown_accelerator_type_is_named():
    with pytest.raises(ValueError, match="v4-7"):
        aot.parse_topology("v4-7")
    with pytest.raises(ValueError, match="tpu-9000"):
        aot.parse_topology("tpu-9000")


def test_sizes_only_keeps_a_sentence_transformers_pooling_and_normalisation(tmp_path):
    """Compiling needs no weights: a checkpoint encoder becomes random-init with its sizes, and, left to the
    checkpoint ("auto", unset), a sentence-transformers directory's pooling and normalisation (old layout here)."""
    from tests import hf_models  # pylint: disable=g-import-not-at-top (torch)

    hf_models.save_sentence_transformer(hf_models.bert_model(seed=1), tmp_path, transformer_path="0_Transformer")
    config = nq.get_config("tiny")
    config.model.doc_encoder.init = str(tmp_path)
    d = aot.sizes_only(config).model.doc_encoder
    assert (d.init, d.hidden_size, d.num_layers, d.pooling, d.normalize) == ("random", 36, 2, "mean", True)


LIBTPU_NOISE = ("unexpected worker hostname", "could not determine TPU", "Failed to find host bounds")


def _without_tpu_settings(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return {**env, **extra}


def test_describing_a_slice_prints_no_libtpu_errors_without_a_tpu():
    """libtpu loads when a slice is described; on a machine without a TPU it is told it runs alone, so it prints
    none of its "could not determine TPU accelerator type" / "unexpected worker hostname" errors."""
    code = "from rag_jax.training import aot; print(len(aot.parse_topology('v5e-8').devices()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_without_tpu_settings(JAX_PLATFORMS="cpu"))
    assert done.returncode == 0 and done.stdout.strip() == "8", done.stderr
    assert not any(noise in done.stderr for noise in LIBTPU_NOISE), done.stderr


@pytest.mark.slow
def test_compile_nq_prints_no_libtpu_errors_without_a_tpu():
    """The command as a user runs it, JAX_PLATFORMS unset: the report and nothing from libtpu's start-up."""
    done = subprocess.run([sys.executable, "-m", "experiments.compile_nq", "--config=experiments/configs/nq.py:tiny",
                           "--topology=v5e-8"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_without_tpu_settings())
    assert done.returncode == 0 and "v5e-8 (v5e:2x4, 8 devices" in done.stdout, done.stderr[-3000:]
    assert not any(noise in done.stderr for noise in LIBTPU_NOISE), done.stderr[-3000:]
