"""experiments.train_nq with a document encoder that changes with the step, for the index-refresh tests
(tests/test_index_refresh.py): the same flags as train_nq.

Until the document encoder is trained (model.doc_encoder.trainable), a refresh re-embeds with the frozen encoder and
rebuilds the index it had; here the encoder of step s is the frozen one plus noise seeded by s, so that every
version differs and searching the wrong one changes the run. With RAG_JAX_TEST_PAUSE_REFRESH=STEP:FILE the refresh
after step STEP writes FILE once its shards are on disk, before index.json says complete, and waits there (for the
test to kill the process).
"""

import os
import runpy
import sys
import time

import jax
import numpy as np

from rag_jax.retrieval import index_writer
from rag_jax.training import index_refresh


def changing_doc_encoder(self, state):
    params = _frozen(self, state)
    rng = np.random.default_rng(int(jax.device_get(state.step)))
    return jax.tree_util.tree_map(lambda x: x + 0.5 * np.std(x) * rng.standard_normal(x.shape).astype(x.dtype),
                                  params)


_frozen = index_refresh.IndexRefresher.doc_encoder_params
index_refresh.IndexRefresher.doc_encoder_params = changing_doc_encoder

if os.environ.get("RAG_JAX_TEST_PAUSE_REFRESH"):
    pause_step, marker = os.environ["RAG_JAX_TEST_PAUSE_REFRESH"].split(":", 1)
    _finalize = index_writer.IndexWriter.finalize

    def paused_finalize(self):
        if os.path.basename(self.output_dir.rstrip(os.sep)) == pause_step:
            self._flush()
            with open(marker, "w") as f:
                f.write(self.output_dir)
            time.sleep(600)
        return _finalize(self)

    index_writer.IndexWriter.finalize = paused_finalize

if __name__ == "__main__":
    sys.argv[0] = "train_nq"
    runpy.run_module("experiments.train_nq", run_name="__main__", alter_sys=True)
