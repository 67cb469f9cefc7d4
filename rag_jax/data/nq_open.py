"""NQ-open as a TFDS dataset stored in ArrayRecord files, readable without TensorFlow.

Two builder configs:
  * `official`: the NQ-open JSONL files (Lee et al., 2019) from a manual directory, `NQ-open.train.jsonl` and
    `NQ-open.dev.jsonl`, one `{"question": str, "answer": [str, ...]}` a line. RAG reports NQ test numbers on
    the NQ-open dev set.
  * `mini`: the bundled 2,000-question task (`rag_jax/assets/nq_open_mini/questions.jsonl`, key "answers" plus
    "gold_passage_id"), split deterministically: the last MINI_DEV_SIZE lines are `dev`, the rest `train`.

Each example: {"question": str, "answers": list[str], "gold_passage_id": int (-1 when unknown)}.
`get_data_source` prepares the dataset once under `data_dir` and returns a random-access source for one split;
`JsonlSource` (rag_jax/data/nq_jsonl.py, re-exported here) serves a JSONL file of one's own the same way. The
input pipeline (rag_jax/data/pipeline.py) only needs `len()` and indexing.
"""

import os
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

# Re-exported: part of this module's API too.
from rag_jax.data.nq_jsonl import UNKNOWN_PASSAGE_ID, JsonlSource, read_nq_jsonl  # noqa: F401

MINI_QUESTIONS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "nq_open_mini", "questions.jsonl"
)
MINI_DEV_SIZE = 200  # The last 200 bundled questions form the mini `dev` split.
OFFICIAL_FILES = {"train": "NQ-open.train.jsonl", "dev": "NQ-open.dev.jsonl"}

_GET_OFFICIAL = (
    "Download NQ-open.train.jsonl and NQ-open.dev.jsonl from "
    "https://github.com/google-research-datasets/natural-questions/tree/master/nq_open into the manual directory "
    "(by default <data_dir>/downloads/manual; or pass manual_dir)."
)


class RagNqOpenConfig(tfds.core.BuilderConfig):
    """A builder config; `name` is the source: 'official' (manual directory) or 'mini' (bundled)."""


class RagNqOpen(tfds.core.GeneratorBasedBuilder):
    """NQ-open questions with their gold answers (and gold passage ids for the bundled mini task)."""

    # `natural_questions_open` is taken by TFDS's own (TensorFlow-based) builder.
    name = "rag_nq_open"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version: official NQ-open train/dev and the bundled mini task."}
    BUILDER_CONFIGS = [
        RagNqOpenConfig(name="official", description="NQ-open train/dev JSONL files from a manual directory."),
        RagNqOpenConfig(name="mini", description="Bundled 2,000 NQ-open dev questions (1,800 train / 200 dev)."),
    ]
    DEFAULT_CONFIG_NAME = "mini"
    # TFDS 4.9 finds a packaged builder's source through `importlib_resources`, which Python >= 3.9 installs
    # lack; naming the file directly skips that lookup (it is only used to look for a checksums file).
    code_path = epath.Path(__file__)
    MANUAL_DOWNLOAD_INSTRUCTIONS = _GET_OFFICIAL

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Open-domain Natural Questions (question, answers) for RAG fine-tuning and evaluation.",
            features=tfds.features.FeaturesDict(
                {
                    "question": tfds.features.Text(),
                    "answers": tfds.features.Sequence(tfds.features.Text()),
                    "gold_passage_id": np.int64,
                }
            ),
            # Keep file order: index i of a split is line i of its source, which makes runs easy to audit.
            disable_shuffling=True,
            homepage="https://github.com/google-research-datasets/natural-questions/tree/master/nq_open",
            citation="Kwiatkowski et al., 2019 (Natural Questions); Lee et al., 2019 (NQ-open split).",
        )

    def _split_generators(self, dl_manager):
        if self.builder_config.name == "mini":
            # Few enough lines to hold in memory; the split must not depend on anything but file order.
            examples = list(read_nq_jsonl(MINI_QUESTIONS))
            if len(examples) <= MINI_DEV_SIZE:
                raise ValueError(f"{MINI_QUESTIONS} has {len(examples)} questions; need more than {MINI_DEV_SIZE}.")
            return {"train": iter(examples[:-MINI_DEV_SIZE]), "dev": iter(examples[-MINI_DEV_SIZE:])}
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as e:  # TFDS signals a missing/empty manual directory with an AssertionError.
            raise FileNotFoundError(f"NQ-open manual directory is missing or empty: {e}") from e
        paths = {split: os.path.join(os.fspath(manual_dir), name) for split, name in OFFICIAL_FILES.items()}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"NQ-open file(s) not found: {', '.join(missing)}. {_GET_OFFICIAL}")
        return {split: self._generate_examples(path) for split, path in paths.items()}

    def _generate_examples(self, path):
        yield from read_nq_jsonl(path)


class NqOpenSource:
    """Random access to one prepared split, decoded to Python types: item i -> {question, answers, gold_passage_id}."""

    def __init__(self, array_record_source, name: str):
        self._source = array_record_source
        self.name = name

    def __len__(self) -> int:
        return len(self._source)

    @staticmethod
    def _decode(record: dict[str, Any]) -> dict[str, Any]:
        return {
            "question": record["question"].decode("utf-8"),
            "answers": [a.decode("utf-8") for a in record["answers"]],
            "gold_passage_id": int(record["gold_passage_id"]),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} examples.")
        return self._decode(self._source[int(index) % n])

    def __getitems__(self, indices) -> list[dict[str, Any]]:
        """Batched read (one ArrayRecord call), used by the input pipeline."""
        return [self._decode(r) for r in self._source.__getitems__([int(i) for i in indices])]

    def __repr__(self) -> str:
        return f"NqOpenSource({self.name}, {len(self)} examples)"


def get_data_source(
    name: str = "mini", split: str = "train", data_dir: str | None = None, manual_dir: str | None = None
) -> NqOpenSource:
    """Prepares (once) and opens one split of NQ-open as a random-access source.

    Args:
      name: builder config, 'mini' or 'official' ('rag_nq_open/<config>' also accepted).
      split: 'train' or 'dev'.
      data_dir: where TFDS keeps prepared data (default: TFDS's default, ~/tensorflow_datasets).
      manual_dir: for 'official', the directory holding NQ-open.{train,dev}.jsonl
        (default <data_dir>/downloads/manual).

    Preparing writes under `data_dir`; on several hosts sharing one `data_dir`, prepare once (e.g. on process 0,
    then a barrier) before the others open it, or give each host its own local `data_dir`.
    """
    config = name.split("/", 1)[1] if name.startswith(RagNqOpen.name + "/") else name
    configs = [c.name for c in RagNqOpen.BUILDER_CONFIGS]
    if config not in configs:
        raise ValueError(f"Unknown NQ-open config {name!r}; choose one of {configs}.")
    if config == "official" and manual_dir is not None and not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"NQ-open manual directory {manual_dir!r} does not exist. {_GET_OFFICIAL}")
    builder = RagNqOpen(config=config, data_dir=data_dir, file_format="array_record")
    if split not in OFFICIAL_FILES:
        raise ValueError(f"Unknown split {split!r} for {builder.name}/{config}; choose one of {list(OFFICIAL_FILES)}.")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return NqOpenSource(builder.as_data_source(split=split), f"{builder.name}/{config}:{split}")
