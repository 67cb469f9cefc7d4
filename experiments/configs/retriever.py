"""The retriever alone (DPR's bi-encoder): `python -m experiments.train_retriever --config=experiments/configs/retriever.py:VARIANT`.

Variants:
  local  (default) fine-tunes the pretrained retriever all-MiniLM-L6-v2's question side (its document encoder and
         index frozen) on the bundled mini NQ-open task's gold passages (1,800 train questions, evaluated on the 200
         dev ones over the 2,600 passages), or with data.* set, on a corpus of one's own. A laptop run.
  paper  DPR's NQ recipe (Karpukhin et al. 2020, sec. 4-5 and the facebookresearch/DPR code, conf/train/biencoder_nq.yaml
         and conf/biencoder_train_cfg.yaml): two BERT-base encoders from bert-base-uncased, DPR's training JSON with one
         BM25 hard negative per question, batch 128, lr 2e-5, 40 epochs. Set the paths.
  tiny   a 32-wide random encoder, a few steps: for tests.

Sources ("DPR"): the paper and its code as above. Any field can be overridden with --config.FIELD=VALUE.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from experiments.configs import nq, nq_variants

VARIANTS = ("local", "paper", "tiny")
DATA_KINDS = ("gold", "dpr", "ict")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "local"
    if variant not in VARIANTS:
        raise ValueError(f"experiments/configs/retriever.py: unknown variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.variant = variant  # which preset this config started from (informational)
    c.seed = 0  # parameter init, dropout, data order and ICT sentences all derive from it

    c.data = ml_collections.ConfigDict()
    # "gold": NQ-open JSONL questions with gold_passage_id into data.passages; "dpr": DPR's training JSON (streamed);
    # "ict": the Inverse Cloze Task over data.passages alone (ORQA, Lee et al. 2019), no questions needed.
    c.data.kind = "gold"
    c.data.passages = nq.BUNDLED_PASSAGES  # the corpus (DPR psgs_w100.tsv layout or JSONL): ICT, gold ids, evaluation
    c.data.train_file = placeholder(str)  # gold: NQ-open JSONL; dpr: DPR JSON. None (gold): the bundled mini train split
    c.data.dev_file = placeholder(str)  # NQ-open JSONL (answers, gold_passage_id); None: the bundled mini dev split
    c.data.hard_negatives = placeholder(str)  # experiments.mine_negatives output (gold); None: none mined
    c.data.hard_negatives_per_question = 1  # DPR: 1 BM25 hard negative (hard_negatives: 1 in biencoder_nq.yaml)
    c.data.ict_keep_sentence = 0.1  # ORQA: the pseudo-question stays in its passage 10% of the time
    c.data.max_question_length = 32  # question tokens (DPR: 256 for both sides; questions are rarely over 32)
    c.data.max_passage_length = 256  # title [SEP] text tokens (DPR: encoder.sequence_length 256)

    c.tokenizers = ml_collections.ConfigDict()
    c.tokenizers.question = nq.BUNDLED_QUESTION_TOKENIZER  # BERT WordPiece, for questions and passages (DPR: one)

    c.model = ml_collections.ConfigDict()
    # Both encoders; init "random" or a BERT / DPR / sentence-transformers directory. DPR: bert-base-uncased, [CLS].
    c.model.question_encoder = nq.encoder_section(64, 2, 4, 128, init_range=0.02)
    c.model.doc_encoder = nq.encoder_section(64, 2, 4, 128, init_range=0.02)
    c.model.shared_encoder = False  # one set of weights for both sides (DPR: separate, encoder.share_encoders false)
    # Train the document encoder too (DPR: both). False: it stays as initialised, the corpus is embedded once, and
    # only the question encoder learns against those index vectors (as RAG fine-tunes a retriever: Lewis et al.
    # 2020, sec. 2.4, keep the index fixed); gold pairs only, every passage in data.passages.
    c.model.train_doc_encoder = True
    # Scores x this in the loss's softmax. DPR: 1 (raw inner products). L2-normalised encoders (all-MiniLM-L6-v2)
    # give cosines in [-1, 1]: sentence-transformers' MultipleNegativesRankingLoss uses 20 (its default scale).
    c.model.score_scale = 1.0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-5  # DPR: learning_rate 2e-5
    c.optim.warmup_steps = 1237  # DPR: warmup_steps 1237
    c.optim.end_learning_rate = 0.0  # DPR: linear decay to 0 (get_schedule_linear)
    c.optim.weight_decay = 0.0  # DPR: weight_decay 0.0
    c.optim.b1 = 0.9  # DPR: torch AdamW defaults
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8  # DPR: adam_eps 1e-8
    c.optim.max_grad_norm = 2.0  # DPR: max_grad_norm 2.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 18_400  # DPR: 40 epochs of NQ's 58,880 training questions at 128 a batch
    c.train.global_batch_size = 128  # DPR: batch_size 16 per GPU x 8 GPUs, negatives shared across all 128
    c.train.log_every = 100  # progress line + metrics.jsonl + TensorBoard
    c.train.checkpoint_every = 1000  # orbax save (and at the end, and on SIGTERM)
    c.train.keep_checkpoints = 2  # how many recent checkpoints to keep
    c.train.async_checkpoints = True  # write checkpoints in the background while training continues
    c.train.eval_every = 2000  # retrieval evaluation (re-embedding the corpus) every this many steps; 0: at the end only

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 0  # dev questions per evaluation; 0: all
    c.eval.batch_size = 64  # questions per encoding batch
    c.eval.recall_ks = (1, 5, 20, 100)  # DPR reports top-20 and top-100 retrieval accuracy

    c.index = ml_collections.ConfigDict()
    c.index.batch_size = 128  # passages per embedding batch when the evaluation re-embeds the corpus
    c.index.max_length = 256  # document encoder tokens at evaluation (as data.max_passage_length)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel ways; -1: all devices left after `model`
    c.mesh.model = 1  # (the encoders are replicated; kept for the shared mesh code)
    c.mesh.dcn_data = 1  # multi-slice TPU jobs: how many slices the data axis spans

    {"local": _local, "paper": _paper, "tiny": _tiny}[variant](c)
    return c


def _paper(c: ml_collections.ConfigDict) -> None:
    c.data.kind = "dpr"
    c.data.passages = placeholder(str)  # psgs_w100.tsv, for the evaluation
    for enc in (c.model.question_encoder, c.model.doc_encoder):
        enc.init = placeholder(str)  # a local bert-base-uncased directory
        enc.pooling = "cls"  # DPR: the [CLS] vector, no projection
        enc.dropout = 0.1  # BERT's
    c.tokenizers.question = placeholder(str)  # bert-base-uncased's tokenizer directory
    c.data.max_question_length = 256  # DPR: encoder.sequence_length 256 (both sides)
    c.eval.num_examples = 0


def _local(c: ml_collections.ConfigDict) -> None:
    retriever = nq_variants.pretrained_retriever()
    c.tokenizers.question = retriever
    for enc in (c.model.question_encoder, c.model.doc_encoder):
        enc.init = retriever
        enc.dropout = 0.1
    c.model.score_scale = 20.0  # normalised vectors (sentence-transformers' MultipleNegativesRankingLoss scale)
    # Fine-tune the question side against the pretrained index (RAG's recipe): the corpus is embedded once, a step
    # runs the question encoder alone, and an index built with the pretrained encoder stays valid. (Measured on a
    # corpus of one's own, tests/test_retriever_learning.py: held-out gold recall@1 96.8% -> 99.8% in 30 steps.)
    c.model.train_doc_encoder = False
    c.data.max_passage_length = 160  # the bundled passages are ~100 words
    c.index.max_length = 160
    c.optim.learning_rate = 2e-5  # DPR's rate suits fine-tuning a pretrained retriever
    c.optim.warmup_steps = 20  # (measured on the bundled task: DPR's 1,237 exceed the whole run)
    c.train.steps = 200  # 3.6 epochs of the 1,800 mini NQ train questions
    c.train.global_batch_size = 32
    c.train.log_every = 20
    c.train.checkpoint_every = 100
    c.train.eval_every = 100
    c.eval.recall_ks = (1, 5, 20)


def _tiny(c: ml_collections.ConfigDict) -> None:
    for enc in (c.model.question_encoder, c.model.doc_encoder):
        enc.hidden_size, enc.num_layers, enc.num_heads, enc.intermediate_size = 32, 1, 2, 64
        enc.max_position_embeddings = 128
        enc.dropout = 0.0
    c.data.max_question_length = 16
    c.data.max_passage_length = 64
    c.index.max_length = 64
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 0
    c.train.steps = 4
    c.train.global_batch_size = 8
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.eval_every = 0
    c.eval.num_examples = 16
    c.eval.batch_size = 16
    c.eval.recall_ks = (1, 5)

