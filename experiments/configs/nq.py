"""RAG on NQ-open: `python -m experiments.train_nq --config=experiments/configs/nq.py:VARIANT`.

Variants:
  local      (default) the bundled mini NQ-open task (1,800 train / 200 dev questions, 2,600 passages) with the
             pretrained retriever all-MiniLM-L6-v2 as question and (frozen) document encoder and a small BART from
             random weights, warmed up by denoising; real bundled tokenizers. A laptop run.
  knowledge  the bundled knowledge task (rag_jax/data/knowledge_task.py; experiments.knowledge_demo sets its files)
             with the same retriever and a small BART: what `make run` trains.
  paper      the RAG paper's NQ fine-tuning: DPR BERT-base encoders, BART-large, K=10, the Hugging Face research
             project's recipe. Point the model fields at local Hugging Face checkpoint directories and the data
             fields at NQ-open and DPR's psgs_w100.tsv.
  paper_t5   `paper` with a T5-large-sized generator (Flan-T5-large, T5 v1.1-large or T5-large; K=10): point
             model.generator.init at its checkpoint and tokenizers.generator at its SentencePiece tokenizer.
  end2end    `paper` trained end to end, the document encoder too (REALM; Hugging Face's RAG-end2end recipe,
             "E2E" below): RAG-Token, K=5, from a rag-token-base style checkpoint and a DPR context encoder.
  tiny       the smallest working model (random encoders), for tests.

Any field can be overridden on the command line, e.g. `--config.train.steps=10 --config.model.n_docs=2`; an unknown
field stops the run at start-up. Sources of the paper values ("REF"): Lewis et al. 2020, Hugging Face's
`transformers/examples/research_projects/rag` (finetune_rag.sh, lightning_base.py) and transformers' RagConfig
defaults. "E2E": `transformers/examples/research_projects/rag-end2end-retriever` (finetune_rag_ray_end2end.sh,
finetune_rag.py).
"""

import os

import ml_collections
from ml_collections.config_dict import placeholder

from rag_jax.models import sentence_transformers_dir

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "rag_jax", "assets")
BUNDLED_PASSAGES = os.path.join(_ASSETS, "nq_open_mini", "passages.tsv")
BUNDLED_QUESTION_TOKENIZER = os.path.join(_ASSETS, "tokenizers", "bert-base-uncased")
BUNDLED_GENERATOR_TOKENIZER = os.path.join(_ASSETS, "tokenizers", "bart-large")
VARIANTS = ("local", "knowledge", "paper", "paper_t5", "end2end", "tiny")


def encoder_section(hidden: int, layers: int, heads: int, mlp: int, init_range: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            # "random", a local Hugging Face BERT/DPR or sentence-transformers checkpoint directory (then sizes come
            # from it; rag_jax.models.hf.pretrained_retriever_dir() is all-MiniLM-L6-v2's), or, for the question
            # encoder, "doc_encoder": start as a copy of the document encoder (as DPR's twin encoders do).
            init="random",
            vocab_size=30522,  # random init only; must cover the question tokenizer (bert-base-uncased: 30,522)
            hidden_size=hidden,  # random init only
            num_layers=layers,  # random init only
            num_heads=heads,  # random init only
            intermediate_size=mlp,  # random init only
            max_position_embeddings=512,  # random init only
            initializer_range=init_range,  # random init only: std of the normal initialiser
            # The vector of a text: "cls" ([CLS] state, DPR), "pooler" (BERT's pooler), "mean" (of the token states)
            # or "auto": as the checkpoint says (a sentence-transformers directory's Pooling module; [CLS] for DPR;
            # the pooler for a BertModel that has one) and "cls" for random init.
            pooling="auto",
            # L2-normalise that vector (scores become cosines): None = as the checkpoint says (a sentence-transformers
            # Normalize module; no for DPR, BERT and random init); True or False to choose.
            normalize=placeholder(bool),
            dropout=0.1,  # hidden and attention dropout while training (BERT's default)
        )
    )


def _generator(d_model: int, layers: int, heads: int, ffn: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            architecture="bart",  # "bart" or "t5" (T5 v1.0, v1.1, Flan-T5); a checkpoint's model_type must agree
            init="random",  # "random" or a local Hugging Face BART / T5 checkpoint directory (then sizes come from it)
            vocab_size=50265,  # random init only; must cover the generator tokenizer (bart-large: 50,265)
            d_model=d_model,  # random init only
            encoder_layers=layers,  # random init only
            decoder_layers=layers,  # random init only
            heads=heads,  # random init only: encoder and decoder attention heads
            ffn_dim=ffn,  # random init only: encoder and decoder feed-forward width
            max_position_embeddings=1024,  # random init only; BART only (T5's positions are relative)
            init_std=0.02,  # random init only; BART only (T5 initialises as transformers does)
            d_kv=64,  # random init only; T5 only: per-head width (T5-large: 64)
            # random init only; T5 only: "relu" (v1.0: LM head tied to the embedding) or "gated-gelu" (v1.1, Flan-T5)
            feed_forward_proj="gated-gelu",
            dropout=0.1,  # REF: --dropout 0.1
            attention_dropout=0.1,  # REF: --attention_dropout 0.1
        )
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "local"
    if variant not in VARIANTS:
        raise ValueError(f"experiments/configs/nq.py: unknown variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.variant = variant  # which preset this config started from (informational)
    c.seed = 0  # parameter init, dropout and data order all derive from it

    c.data = ml_collections.ConfigDict()
    c.data.source = "mini"  # rag_jax.data.nq_open builder config: "mini" (bundled) or "official" (manual_dir)
    c.data.data_dir = placeholder(str)  # where TFDS keeps the prepared dataset; None: TFDS's default (~/tensorflow_datasets)
    c.data.manual_dir = placeholder(str)  # "official" only: the directory holding NQ-open.train.jsonl and NQ-open.dev.jsonl
    c.data.train_file = placeholder(str)  # a JSONL questions file to train on instead of `source` ({"question","answer(s)"})
    c.data.dev_file = placeholder(str)  # a JSONL questions file for the periodic evaluation instead of `source`'s dev split
    c.data.passages = BUNDLED_PASSAGES  # the retrieval corpus, DPR psgs_w100.tsv layout (or .jsonl)
    c.data.max_question_length = 32  # question encoder input tokens
    c.data.max_target_length = 12  # label tokens, <s> answer </s> (most NQ answers are a few words)
    c.data.answer_choice = "first"  # "first" answer (the HF research project's data) or a "random" one per epoch
    c.data.answer_prefix_space = True  # tokenise " answer", as the HF research project does for BART targets

    c.tokenizers = ml_collections.ConfigDict()
    c.tokenizers.question = BUNDLED_QUESTION_TOKENIZER  # BERT WordPiece directory (bundled bert-base-uncased)
    c.tokenizers.generator = BUNDLED_GENERATOR_TOKENIZER  # BART BPE directory (bundled bart-large)

    c.model = ml_collections.ConfigDict()
    c.model.init_from_rag = placeholder(str)  # a Hugging Face RAG checkpoint directory: question encoder + generator from it
    c.model.question_encoder = encoder_section(64, 2, 4, 128, init_range=0.2)  # q(x); trained
    # d(z): frozen, embeds the index. Random weights need a large init range, or every passage gets the same vector.
    c.model.doc_encoder = encoder_section(64, 2, 4, 128, init_range=0.5)
    # End-to-end RAG (REALM, RAG-end2end): train d(z) too, from these weights; the passages retrieved from the
    # index are embedded again with the current d(z) in every step. False: the paper's frozen document encoder.
    c.model.doc_encoder.trainable = False
    c.model.doc_encoder.lr_scale = 1.0  # a trained d(z)'s learning rate over optim.learning_rate
    c.model.generator = _generator(64, 2, 4, 128)  # BART; trained
    c.model.n_docs = 3  # K, documents retrieved per question in training
    # How the generator reads the K passages, its loss and decoding (rag_jax/readers/): "rag_sequence" or
    # "rag_token" (the marginal likelihoods of Lewis et al.), or 'package.module:name' of a registered reader.
    c.model.reader = "rag_sequence"
    c.model.loss = placeholder(str)  # deprecated: the old model.reader ("sequence", "token"), which it overrides
    c.model.label_smoothing = 0.0  # epsilon of the reference's label smoothing
    c.model.max_combined_length = 160  # generator input tokens: title / text // question, truncated at the end
    c.model.title_sep = " / "  # RagConfig default
    c.model.doc_sep = " // "  # RagConfig default
    c.model.compute_dtype = "float32"  # "float32" or "bfloat16" activations (parameters stay float32)

    c.index = ml_collections.ConfigDict()
    c.index.dir = placeholder(str)  # a prebuilt index (experiments/build_index) to link as WORKDIR/index; None: build it there
    c.index.batch_size = 128  # passages per embedding batch when building the index
    c.index.max_length = 256  # document encoder input tokens (title, text) when building the index
    c.index.shard_size = 100_000  # rows per embeddings file
    c.index.dtype = "float32"  # stored embedding dtype: float32, float16 or bfloat16
    c.index.backend = "exact"  # also build a ScaNN searcher ("scann") or not ("exact")
    # Compressed codes kept beside the vectors (docs/index.md): "" none, "int8" (D + 4 bytes a passage) or "pq:M"
    # (M bytes; codebooks trained on codes_sample rows drawn with codes_seed). Device mode then holds the codes
    # instead of the vectors; host mode searches them with retrieval.host_searcher = "codes".
    c.index.codes = ""
    c.index.codes_sample = 16_384
    c.index.codes_seed = 0
    # Re-embed the corpus with the current document encoder every N steps ("0": never, the paper's frozen index),
    # or on an Atlas-style schedule of step ranges, "0-1000:500,1000-:2000" (rag_jax/training/index_refresh.py).
    c.index.refresh_every = "0"

    c.retrieval = ml_collections.ConfigDict()
    c.retrieval.mode = "host"  # "host": search on the host between question encoding and the step; "device":
    #                             exact MIPS inside the step over the index sharded across all devices
    c.retrieval.host_searcher = "exact"  # host mode and evaluation: "exact" (one device), "scann" (CPU) or "codes"
    # host_searcher "codes": the best L candidates by their codes are re-ranked with the full-precision vectors on
    # disk, so the K kept are the exact top K of those L (0: the codes' own top K).
    c.retrieval.rerank_from_codes = 100
    # How host retrieval (host mode and evaluation) forms the generator inputs, the same ids either way: "strings"
    # tokenises every "title / text // question" (as the reference); "table" glues them from the passage token
    # table cached in the index directory (what device mode assembles from; the host side of a step ~20x smaller);
    # "auto": the table, unless the generator tokenizer joins tokens across the passage/question boundary.
    c.retrieval.host_contexts = "auto"
    # Over-retrieve and rerank (Atlas's retrieve_with_rerank; needs model.doc_encoder.trainable): retrieve
    # L >= model.n_docs candidates from the possibly stale index, keep the n_docs the current encoders score best.
    # 0: retrieve model.n_docs and keep them all.
    c.retrieval.rerank_candidates = 0
    # Read, tokenise and (device mode: all of it) prepare step s+1's batch in a background thread while step s
    # computes; the same batches and parameters as false (which does it all between the steps).
    c.retrieval.prefetch = True
    # Host mode: also encode, search and assemble contexts for step s+1 while step s computes, with the parameters
    # step s starts from: q(x) one step stale, like REALM's asynchronously refreshed index. A deviation from the
    # reference's recipe (which retrieves with the current q(x)); doc scores and their gradients still use the
    # current q(x). Identical to false while the question encoder is frozen. A resumed run's first step retrieves
    # with its own parameters.
    c.retrieval.stale_prefetch = False
    # Retrieval scores q(x)·d(z) are multiplied by this before every softmax over documents (training, evaluation,
    # provenance, export). "auto": 20 for an L2-normalised q(x) (the scale sentence-transformers trains such encoders
    # with; cosines alone give nearly uniform priors), 1 for DPR-style encoders (transformers' RAG); or a number.
    c.retrieval.score_scale = "auto"
    c.retrieval.learn_score_scale = False  # train the scale (from score_scale) with q(x), as a log-parameter

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3  # peak learning rate
    c.optim.warmup_steps = 50  # linear warm-up from 0
    c.optim.end_learning_rate = 1e-7  # polynomial (power 1, i.e. linear) decay to this at train.steps
    c.optim.weight_decay = 0.0  # decoupled (AdamW); not on biases and layer norms (REF no_decay list)
    c.optim.b1 = 0.9  # Adam beta1 (torch AdamW default)
    c.optim.b2 = 0.999  # Adam beta2 (torch AdamW default)
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.max_grad_norm = 1.0  # global gradient norm clip; 0 disables
    # Question encoder updates x this. From scratch, a lower value keeps q(x) from drifting on the random generator's
    # likelihoods before the generator has learnt to read passages; REF trains both at one rate (1.0). 0 freezes q(x)
    # (its backward pass is then skipped).
    c.optim.question_encoder_lr_scale = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 600  # optimizer updates
    c.train.global_batch_size = 8  # questions per update, over all devices and hosts
    # x the contrastive retrieval loss over each question's K retrieved passages (positive: its gold passage, when
    # retrieved; rag_jax/training/contrastive.py retrieved_nll) added to the RAG NLL: the retrieval + generation
    # multi-task loss. 0: RAG's marginal likelihood alone (the paper's).
    c.train.retrieval_loss_weight = 0.0
    # How the retriever learns from the reader, without gold passages (rag_jax/training/retriever_losses.py, after
    # Atlas): "marginal" (RAG's: through the marginal likelihood), "none", "pdist", "emdr2", "loop", "adist" (FiD).
    c.train.retriever_loss = "marginal"
    # pdist/loop: the target is softmax(reader score / this); emdr2: the reader's logits are divided by it (Atlas's
    # temperature_gold, 0.01 in its scripts, where its retriever scores are also divided by sqrt(d) x 0.01; here
    # the retriever's side is the doc scores on retrieval.score_scale).
    c.train.retriever_temperature = 1.0
    c.train.grad_accum_steps = 1  # microbatches per update (a scan inside the step); divides the batch
    c.train.log_every = 25  # progress line + metrics.jsonl + TensorBoard every this many steps
    c.train.checkpoint_every = 200  # orbax save every this many steps (and at the end, and on SIGTERM)
    c.train.keep_checkpoints = 2  # how many recent checkpoints to keep
    c.train.async_checkpoints = True  # write checkpoints in the background while training continues
    c.train.eval_every = 300  # dev evaluation every this many steps (and at the end); 0 disables

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 200  # dev questions per evaluation (the first ones of the dev split); 0 = all
    c.eval.batch_size = 40  # questions per evaluation batch (a multiple of the data axis)
    c.eval.n_docs = 3  # documents per question when generating answers in the periodic evaluation
    c.eval.max_length = 20  # greedy decoding length, counting the decoder start token (as HF generate)
    c.eval.recall_ks = (1, 3)  # report retrieval recall@k (answer string in the top k) for these k

    # A randomly initialised generator can first learn to reconstruct the corpus' passages (BART's text infilling),
    # which teaches it to copy from its input (rag_jax/training/denoise.py has the measurements). 0 steps: none.
    c.denoise = ml_collections.ConfigDict()
    c.denoise.steps = 0  # warm-up steps before RAG training (only for model.generator.init="random")
    c.denoise.batch_size = 16  # passages a step
    c.denoise.learning_rate = 1e-3  # peak of its own AdamW (linear warm-up over min(100, steps/5), decay to 10%)
    c.denoise.max_length = 64  # passage tokens (`title / text`, BART's <s> ... </s>)
    c.denoise.mask_ratio = 0.3  # BART: 30% of the tokens masked
    c.denoise.mean_span = 3.0  # BART: Poisson(3) span lengths, each span one <mask>

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel ways; -1: all devices left after `model`
    c.mesh.model = 1  # tensor-parallel ways (vocabulary, MLP, heads)
    c.mesh.dcn_data = 1  # multi-slice TPU jobs: how many slices the data axis spans

    if variant == "tiny":
        _tiny(c)
    elif variant == "paper":
        _paper(c)
    elif variant == "paper_t5":
        _paper(c)
        _paper_t5(c)
    elif variant == "end2end":
        _paper(c)
        _end2end(c)
    elif variant == "local":
        _local(c)
    elif variant == "knowledge":
        _knowledge(c)
    return c


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
    c.model.question_encoder.dropout = 0.0
    # q(x) already retrieves well (gold passage in the top 3 for 98% of the mini NQ dev questions) and a from-scratch
    # generator's early likelihoods would only pull it away: frozen (no backward pass, no Adam moments for it).
    c.optim.question_encoder_lr_scale = 0.0
    c.retrieval.mode = "device"  # no host round trip between question encoding and the step: 1.5x the steps/s here
    c.index.max_length = 256  # the length all-MiniLM-L6-v2 was trained with


def _local(c: ml_collections.ConfigDict) -> None:
    _pretrained_retriever(c)
    _small_generator(c)


def _knowledge(c: ml_collections.ConfigDict) -> None:
    """The bundled knowledge task: short passages (four facts about one entity), one-word answers."""
    _pretrained_retriever(c)
    _small_generator(c)
    c.data.passages = placeholder(str)  # experiments.knowledge_demo sets these three
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
