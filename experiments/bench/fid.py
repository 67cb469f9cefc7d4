"""fid: Fusion-in-Decoder's training step and decoding, rag_jax's (model.reader=fid: the real jitted step; the
jitted fid.generate) vs a PyTorch FiD built as facebookresearch/FiD builds it (and as tests/test_fid.py checks it):
transformers' T5ForConditionalGeneration / BartForConditionalGeneration with its encoder applied to the B*K passages
and the outputs concatenated per question (FiDT5's EncoderWrapper), the cross-entropy of the answer tokens,
torch.optim.AdamW after the same clipping; `generate` with that encoder output, computed once per call. Same weights
(rag_jax's initialisation, exported) and batch; FiD trains the reader alone, so the question encoder is frozen
(optim.question_encoder_lr_scale 0) on rag_jax's side and absent on the reference's."""

from __future__ import annotations

import itertools
import os

import jax.numpy as jnp
import numpy as np

from experiments.bench.common import (Options, Twins, contexts, make_twins, model_config, paired_median_seconds,
                                      relative, same_answers, scratch_dir, train_batch)
from experiments.bench.train_step import JaxTrainer, TorchTrainer

_FID_TWINS: dict[tuple[str, str], Twins] = {}


def fid_config(size: str, generator: str):
    """model_config(size, generator) read by FiD: each of the K passages on its own, max_combined_length tokens."""
    c = model_config(size, generator)
    c.model.reader = "fid"
    c.model.fid.passage_length = c.model.max_combined_length
    c.optim.question_encoder_lr_scale = 0.0  # FiD trains the reader on fixed retrieved passages
    return c


def fid_twins(size: str, generator: str) -> Twins:
    """The FiD model of `size` with a `generator`, built and exported once per process."""
    if (size, generator) not in _FID_TWINS:
        directory = os.path.join(scratch_dir(), "fid")
        _FID_TWINS[size, generator] = make_twins(size, directory, generator, fid_config(size, generator))
    return _FID_TWINS[size, generator]


def _reference_generator(pair: Twins):
    """The exported generator as a plain transformers seq2seq model (T5ForConditionalGeneration or
    BartForConditionalGeneration): the model FiD wraps."""
    import transformers

    return transformers.RagSequenceForGeneration.from_pretrained(pair.hf_dir).generator


def _fused_encoder_out(model, ids_BKxS, mask_BKxS, batch: int):
    """FiDT5's EncoderWrapper: the encoder over the B*K passages, (B, K*S, E) states and (B, K*S) mask."""
    from transformers.modeling_outputs import BaseModelOutput

    states = model.get_encoder()(input_ids=ids_BKxS, attention_mask=mask_BKxS).last_hidden_state
    return BaseModelOutput(last_hidden_state=states.reshape(batch, -1, states.shape[-1])), mask_BKxS.reshape(batch, -1)


class TorchFiDTrainer(TorchTrainer):
    """FiD's train step (train_reader.py): the fused forward with labels, loss.backward(), clip_grad_norm_,
    AdamW over the generator's parameters. The decoder inputs are passed as rag_jax's labels (T5 and BART both
    make them by shifting the targets right from the decoder start; tests/test_fid.py checks T5's), the targets with
    -100 at padding: CrossEntropyLoss's mean over the answer tokens, as rag_jax's fid loss."""

    def __init__(self, pair: Twins, batch: dict[str, np.ndarray]):
        import torch

        super().__init__(pair, batch, _reference_generator(pair).train())
        b, k, s = batch["context_input_ids"].shape
        pad = pair.model.generator_config.pad_token_id
        labels = batch["labels"]
        targets = np.concatenate([labels[:, 1:], np.full((b, 1), pad)], axis=1)
        as_long = lambda x: torch.as_tensor(x, dtype=torch.long)  # noqa: E731
        ignored = np.where(targets == pad, -100, targets)  # CrossEntropyLoss's ignore_index
        self.fid_inputs = dict(ids=as_long(batch["context_input_ids"].reshape(b * k, s)),
                               mask=as_long(batch["context_attention_mask"].reshape(b * k, s)),
                               decoder_input_ids=as_long(labels), labels=as_long(ignored))
        self.batch = b

    def step(self) -> float:
        x = self.fid_inputs
        self.optimizer.zero_grad(set_to_none=True)
        encoder_out, mask = _fused_encoder_out(self.model, x["ids"], x["mask"], self.batch)
        loss = self.model(encoder_outputs=encoder_out, attention_mask=mask, decoder_input_ids=x["decoder_input_ids"],
                          labels=x["labels"]).loss
        loss.backward()
        if self.max_grad_norm > 0:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return float(loss.detach())


def _train_rows(pair: Twins, size: str, generator: str, repeats: int, quick: bool) -> dict:
    batch = train_batch(pair.config, pair.model)
    ours, theirs = JaxTrainer(pair, batch), TorchFiDTrainer(pair, batch)
    # The first step of each starts from the same weights: the same loss means the same computation.
    loss_ours, loss_ref = ours.step(), theirs.step()
    t_ours, t_ref = paired_median_seconds(ours.step, theirs.step, repeats, warmup=0 if quick else 1)
    c = pair.config
    return dict(size=size, generator=generator, case="train_step", batch=c.train.global_batch_size,
                n_docs=c.model.n_docs, passage_len=c.model.fid.passage_length, target_len=c.data.max_target_length,
                ours_s=t_ours, reference_s=t_ref, speedup=t_ref / t_ours,
                first_loss_rel_diff=relative(loss_ours, loss_ref))  # fmt: skip


def _decode_rows(pair: Twins, size: str, generator: str, repeats: int, quick: bool) -> list[dict]:
    """Greedy and beam 4 over `batch` questions, each call encoding the B*K passages once. min_length = max_length
    bans the end token until the end: every row generates max_length - 1 tokens on both sides (fixed work)."""
    import torch

    from rag_jax.readers import fid
    from rag_jax.readers.generation import GenerationConfig

    batch, new_tokens = (2, 3) if quick else (16, 20)
    k, s = pair.config.model.n_docs, pair.config.model.fid.passage_length
    ids, mask = contexts(np.random.default_rng(1), pair.model, batch * k, s)
    jax_inputs = (jnp.asarray(ids), jnp.asarray(mask), jnp.zeros((batch, k)))
    reference = _reference_generator(pair).eval()
    cfg = reference.config
    special = dict(decoder_start_token_id=cfg.decoder_start_token_id, bos_token_id=getattr(cfg, "bos_token_id", None),
                   eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    ids_t, mask_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
    rows = []
    for beams in (1, 4):
        length = dict(max_length=new_tokens + 1, min_length=new_tokens + 1, num_beams=beams)
        gen = GenerationConfig(**length, **special)
        params = pair.state.params
        run_ours = lambda: fid.generate(pair.model, params, *jax_inputs, gen).block_until_ready()  # noqa: E731

        def run_reference():
            with torch.no_grad():
                encoder_out, fused_mask = _fused_encoder_out(reference, ids_t, mask_t, batch)
                return reference.generate(encoder_outputs=encoder_out, attention_mask=fused_mask, do_sample=False,
                                          length_penalty=1.0, early_stopping=False, no_repeat_ngram_size=0,
                                          forced_bos_token_id=None, forced_eos_token_id=None, **length).numpy()

        out_ours, out_ref = np.asarray(run_ours()), run_reference()  # also the warm-up (compilation)
        agree = same_answers(out_ours, out_ref)
        t_ours, t_ref = paired_median_seconds(run_ours, run_reference, repeats, warmup=0)
        rows.append(dict(size=size, generator=generator, case="greedy" if beams == 1 else f"beam {beams}", batch=batch,
                         n_docs=k, passage_len=s, new_tokens=new_tokens, ours_s=t_ours, reference_s=t_ref,
                         speedup=t_ref / t_ours, same_output=agree))  # fmt: skip
    return rows


def run(opts: Options) -> list[dict]:
    """Seconds per FiD training step and per decoding call, rag_jax vs the PyTorch FiD, per size and generator."""
    rows = []
    for size, generator in itertools.product(["tiny"] if opts.quick else opts.sizes, opts.generators):
        pair = fid_twins(size, generator)
        rows.append(_train_rows(pair, size, generator, opts.repeats, opts.quick))
        rows += _decode_rows(pair, size, generator, opts.repeats, opts.quick)
    return rows
