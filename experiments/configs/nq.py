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
  paper_fid  Fusion-in-Decoder's NQ reader (Izacard & Grave 2020) as facebookresearch/FiD's README trains it: T5-base,
             K=100 passages of 250 tokens, the retriever frozen ("FiD" below: that README and its src/options.py).
  paper_triviaqa, paper_msmarco, paper_jeopardy, paper_fever
             `paper` with the paper's settings of its other tasks (reader, K, lengths, metric; paper_tasks.py says
             each value's source); set task.train_file and task.dev_file.
  end2end    `paper` trained end to end, the document encoder too (REALM; Hugging Face's RAG-end2end recipe,
             "E2E" below): RAG-Token, K=5, from a rag-token-base style checkpoint and a DPR context encoder.
  end2end_local  `local` trained end to end on a laptop: q(x), d(z) (both at their fine-tuning rate) and the
             generator, the index refreshed during training; 60 steps, ~10 minutes on 2 idle cores
             (docs/end_to_end_local.md).
  tiny       the smallest working model (random encoders), for tests.

The variants' functions are in nq_variants.py. Any field can be overridden on the command line, e.g.
`--config.train.steps=10 --config.model.n_docs=2`; an unknown field stops the run at start-up. Sources of the paper
values ("REF"): Lewis et al. 2020, Hugging Face's `transformers/examples/research_projects/rag` (finetune_rag.sh,
lightning_base.py) and transformers' RagConfig defaults. "E2E":
`transformers/examples/research_projects/rag-end2end-retriever` (finetune_rag_ray_end2end.sh, finetune_rag.py).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from experiments.configs import nq_variants
from experiments.configs.nq_variants import BUNDLED_GENERATOR_TOKENIZER, BUNDLED_PASSAGES, BUNDLED_QUESTION_TOKENIZER

VARIANTS = nq_variants.VARIANTS


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
    # Deprecated: the old names of task.train_file / task.dev_file, still read where those are unset (configs saved
    # before the task section held the files, command lines written for them); both set to different files stops.
    c.data.train_file = placeholder(str)
    c.data.dev_file = placeholder(str)
    c.data.passages = BUNDLED_PASSAGES  # the retrieval corpus, DPR psgs_w100.tsv layout (or .jsonl)
    c.data.max_question_length = 32  # question encoder input tokens
    c.data.max_target_length = 12  # label tokens, <s> answer </s> (most NQ answers are a few words)
    c.data.answer_choice = "first"  # "first" answer (the HF research project's data) or a "random" one per epoch
    c.data.answer_prefix_space = True  # tokenise " answer", as the HF research project does for BART targets

    c.task = ml_collections.ConfigDict()
    # What the run learns and how dev evaluation scores it (rag_jax/tasks/): "qa" (exact match / F1),
    # "abstractive_qa", "question_generation", "fact_verification", or 'package.module:name' of a registered task.
    c.task.name = "qa"
    # The task's files (rag_jax/runs/config_fields.py task_file): training examples, and those of the periodic dev
    # evaluation. NQ-open JSONL ({"question", "answer(s)"}) or any format rag_jax/data/task_files.py reads (KILT,
    # FEVER, MS-MARCO, SearchQA, DPR CSV). None: data.source's NQ-open splits (task "qa" only).
    c.task.train_file = placeholder(str)
    c.task.dev_file = placeholder(str)

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
    # A trained d(z)'s learning rate over optim.learning_rate. None: a pretrained d(z) is fine-tuned at 3e-5 (or at
    # optim.learning_rate when lower; rag_jax/runs/encoder_training.py says the sources), a random one at 1x.
    c.model.doc_encoder.lr_scale = placeholder(float)
    c.model.generator = _generator(64, 2, 4, 128)  # BART; trained
    c.model.n_docs = 3  # K, documents retrieved per question in training
    # How the generator reads the K passages, its loss and decoding (rag_jax/readers/): "rag_sequence" or
    # "rag_token" (the marginal likelihoods of Lewis et al.), "fid" (Fusion-in-Decoder, Izacard & Grave: all K
    # passages in one decoder; needs retrieval.mode="host"), or 'package.module:name' of a registered reader.
    c.model.reader = "rag_sequence"
    # Fusion-in-Decoder (model.reader="fid", rag_jax/readers/fid.py): tokens per `question: ... title: ... context: ...`
    # passage (FiD's --text_maxlength); None: model.max_combined_length.
    c.model.fid = ml_collections.ConfigDict()
    c.model.fid.passage_length = placeholder(int)
    # Recompute the generator's encoder in the backward pass, one passage per question at a time (FiD's
    # --use_checkpoint): the activations of the B*K passages are not kept, at the cost of one more encoder pass.
    c.model.fid.remat = False
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
    # (its backward pass is then skipped). None: as model.doc_encoder.lr_scale's None (a pretrained q(x) at 3e-5).
    c.optim.question_encoder_lr_scale = placeholder(float)

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
    # the retriever's side is the doc scores on retrieval.score_scale). adist: the target is softmax(attention
    # score / this), scores of order 1e-2 (Atlas divides them by 256): set ~0.01 or lower; 1.0 gives a near-uniform
    # target (docs/retriever_losses.md), and adist is refused at start-up from 0.1 up.
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

    nq_variants.apply(variant, c)
    return c
