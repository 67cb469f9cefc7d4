"""Ahead-of-time compilation of the real train step for a TPU topology, on this CPU-only machine."""

import pytest

from experiments.configs import nq
from rag_jax.training import aot

pytest.importorskip("libtpu", reason="ahead-of-time TPU compilation needs libtpu (pip install 'jax[tpu]')")


def test_tiny_train_step_compiles_for_a_tpu_slice():
    config = nq.get_config("tiny")
    report = aot.compile_train_step(config, aot.parse_topology("v5e-8"))
    assert report.devices == 8 and report.mesh == {"data": 8, "model": 1}
    assert report.fits and report.flops_per_device > 0
    # The arguments hold at least the float32 parameters and Adam's two moments (sharded, so a per-device share).
    assert report.per_device_bytes["arguments"] > 0
    assert report.per_device_bytes["aliased"] > 0  # the donated train state is reused for the new one


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
