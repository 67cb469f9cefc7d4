"""The `paper_fid` variant of experiments/configs/nq.py: Fusion-in-Decoder's NQ reader (Izacard & Grave 2020) as
facebookresearch/FiD's README trains it, applied over `paper` ("FiD" below: that README's train_reader.py command and
its src/options.py defaults)."""

import ml_collections
from ml_collections.config_dict import placeholder


def paper_fid(c: ml_collections.ConfigDict) -> None:
    """FiD's NQ reader recipe (FiD: `train_reader.py --use_checkpoint --lr 0.00005 --optim adamw --scheduler linear
    --weight_decay 0.01 --text_maxlength 250 --n_context 100 --total_step 15000 --warmup_step 1000`, 64 GPUs x 1
    question). Values `paper` has that FiD does not set are marked "not FiD"."""
    g = c.model.generator
    g.architecture = "t5"
    g.init = placeholder(str)  # FiD: t5-base (a local Hugging Face t5-base directory)
    g.vocab_size, g.d_model, g.d_kv, g.ffn_dim, g.heads = 32128, 768, 64, 3072, 12  # t5-base's sizes
    g.encoder_layers = g.decoder_layers = 12
    g.feed_forward_proj = "relu"  # T5 v1.0
    g.dropout = 0.1  # FiD: T5's own dropout_rate (0.1); --dropout 0.1 is its default too
    g.attention_dropout = 0.1  # T5 has one dropout rate for everything
    c.tokenizers.generator = placeholder(str)  # t5-base's SentencePiece tokenizer directory (spiece.model)
    c.data.answer_prefix_space = False  # SentencePiece marks word starts itself
    c.model.reader = "fid"
    c.model.n_docs = 100  # FiD: --n_context 100
    c.model.fid.passage_length = 250  # FiD: --text_maxlength 250
    c.model.fid.remat = True  # FiD: --use_checkpoint
    c.model.label_smoothing = 0.0  # FiD: plain cross-entropy
    c.optim.learning_rate = 5e-5  # FiD: --lr 0.00005
    c.optim.warmup_steps = 1000  # FiD: --warmup_step 1000
    c.optim.end_learning_rate = 0.0  # FiD: --scheduler linear (WarmupLinearScheduler, down to 0 at the last step)
    c.optim.weight_decay = 0.01  # FiD: --weight_decay 0.01
    c.optim.max_grad_norm = 1.0  # FiD: --clip 1.0 (its default)
    c.optim.question_encoder_lr_scale = 0.0  # FiD trains the reader on fixed retrieved passages
    c.train.global_batch_size = 64  # FiD: 64 GPUs x --per_gpu_batch_size 1
    c.train.steps = 15_000  # FiD: --total_step 15000
    c.train.eval_every = 500  # FiD: --eval_freq 500 (its default)
    c.eval.n_docs = 100  # as in training
    c.eval.max_length = 50  # FiD: test_reader.py generates with max_length=50
