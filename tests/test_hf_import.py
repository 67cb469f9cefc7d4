"""Checkpoint files and import errors: every bad directory gets a message naming the file and the weight."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from rag_jax.models import hf, hf_files
from tests import hf_models


def test_torch_pickle_reader_matches_torch(tmp_path):
    model = hf_models.bart_model(seed=1)
    state = model.state_dict()
    state["half"] = torch.randn(3, 5).half()
    state["bf16"] = torch.randn(4).bfloat16()
    state["strided"] = torch.randn(6, 4).t()  # a non-contiguous view must be read with its strides
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    tensors = hf_files.read_torch_pickle(str(path))
    assert set(tensors) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(np.asarray(tensors[name], np.float32), value.float().numpy(), err_msg=name)


def test_bin_checkpoint_loads_like_safetensors(tmp_path):
    model = hf_models.bart_model(seed=2)
    model.save_pretrained(tmp_path / "st")
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    a, b = hf.load_bart(str(tmp_path / "st")), hf.load_bart(str(tmp_path / "bin"))
    for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)):
        np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


@pytest.fixture
def bart_dir(tmp_path):
    hf_models.bart_model(seed=3).save_pretrained(tmp_path)
    return tmp_path


def _edit_weights(directory, edit):
    path = os.path.join(directory, "model.safetensors")
    tensors = {k: np.array(v) for k, v in load_file(path).items()}
    edit(tensors)
    save_file(tensors, path)
    return path


def test_missing_weight_is_named(bart_dir):
    path = _edit_weights(bart_dir, lambda t: t.pop("model.decoder.layers.1.fc1.weight"))
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: missing weight model\.decoder\.layers\.1\.fc1\.weight"):
        hf.load_bart(str(bart_dir))
    assert path.endswith("model.safetensors")


def test_unexpected_weight_is_named(bart_dir):
    _edit_weights(bart_dir, lambda t: t.update({"model.decoder.layers.7.fc1.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(hf.CheckpointError, match=r"unexpected weight.*model\.decoder\.layers\.7\.fc1\.weight"):
        hf.load_bart(str(bart_dir))


def test_shape_mismatch_names_weight(bart_dir):
    config = json.loads((bart_dir / "config.json").read_text())
    config["encoder_ffn_dim"] = 38
    (bart_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError, match=r"weight model\.encoder\.layers\.0\.fc1\.weight has shape \(37, 36\), which does not fit rag_jax's \(36, 38\)"):
        hf.load_bart(str(bart_dir))


def test_missing_files_and_unknown_architecture(tmp_path, bart_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.CheckpointError, match="empty/config.json: missing"):
        hf.load(str(tmp_path / "empty"))
    os.remove(bart_dir / "model.safetensors")
    with pytest.raises(hf.CheckpointError, match="no weights found"):
        hf.load_bart(str(bart_dir))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(hf.CheckpointError, match="unknown model_type 'gpt2'"):
        hf.load(str(tmp_path / "gpt"))
    with pytest.raises(hf.CheckpointError, match="not a BERT/DPR encoder"):
        hf.load_encoder(str(tmp_path / "gpt"))
    with pytest.raises(hf.CheckpointError, match="no such checkpoint directory"):
        hf.load(str(tmp_path / "does" / "not" / "exist"))


def test_bert_checkpoint_with_prefix_and_legacy_norm_names(tmp_path):
    model = hf_models.bert_model(seed=4)
    model.config.save_pretrained(tmp_path)
    tensors = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
               v.numpy() for k, v in model.state_dict().items()}  # fmt: skip
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = hf.load_encoder(str(tmp_path))
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(loaded.params["embedding_norm"]["scale"], ref["embeddings.LayerNorm.weight"])
