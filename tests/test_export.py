"""Export to the Hugging Face layout: transformers loads what rag_jax writes, tensor for tensor."""

import numpy as np
import pytest
import torch
import transformers

from rag_jax import export, rag, tokenizers
from rag_jax.models import hf
from tests import hf_models


@pytest.mark.parametrize("model_type,projection_dim", [("sequence", 0), ("token", 7)])
def test_hf_round_trip_is_exact(tmp_path, model_type, projection_dim):
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        hf_models.dpr_config(projection_dim=projection_dim), hf_models.bart_config(), n_docs=3, label_smoothing=0.1
    )
    cls = export.ARCHITECTURES[model_type]
    original = hf_models.randomize(getattr(transformers, cls)(config), seed=5)
    original.save_pretrained(tmp_path / "original")

    loaded = hf.load_rag(str(tmp_path / "original"))
    model = rag.Rag(loaded.question_encoder.config, loaded.generator.config, rag.RagConfig.from_hf(loaded.hf_config))
    params = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params}
    qtok, gtok = tokenizers.load_question_tokenizer(), tokenizers.load_generator_tokenizer()
    export.save_hf_rag(str(tmp_path / "exported"), model, params, model_type, qtok, gtok)

    reloaded = getattr(transformers, cls).from_pretrained(str(tmp_path / "exported"))
    assert type(reloaded).__name__ == cls
    assert reloaded.config.n_docs == 3 and reloaded.config.label_smoothing == 0.1
    expected = original.state_dict()
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert tokenizers.load_rag_tokenizers(str(tmp_path / "exported")).generator("Hello world")["input_ids"] == [
        0, 31414, 232, 2
    ]  # fmt: skip


def test_export_refuses_to_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export.refuse_to_overwrite(str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_only_dpr_pooling_exports():
    from rag_jax.models import bert

    with pytest.raises(hf.CheckpointError, match="only 'cls' pooling"):
        hf.dpr_config_dict(bert.BertConfig(pooling="mean"))
    assert np.isfinite(hf.dpr_config_dict(bert.BertConfig())["layer_norm_eps"])
