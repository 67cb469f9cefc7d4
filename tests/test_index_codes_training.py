"""A compressed index in training: host retrieval from codes with an exact re-rank takes the same steps as exact
search; device retrieval holding int8 codes on 8 devices (the doc scores from the vectors the codes stand for)
stays within the codes' rounding of them."""

import numpy as np
import pytest

from tests import train_task
from tests.test_train import EXACT, _mesh, _steps  # pylint: disable=unused-import (fixtures below)
from tests.test_train import reference, task, workdir  # noqa: F401  pylint: disable=unused-import


@pytest.mark.slow
def test_host_search_of_codes_with_rerank_takes_the_exact_steps(task, reference, tmp_path):  # noqa: F811
    config = train_task.tiny_config(task, **EXACT, **{"retrieval.host_contexts": "strings", "index.codes": "int8",
                                                      "retrieval.host_searcher": "codes",
                                                      "retrieval.rerank_from_codes": 16})
    losses, params, hits, _ = _steps(config, str(tmp_path / "run"), _mesh(1, 1))
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    assert hits == reference[2]


@pytest.mark.slow
def test_device_retrieval_from_int8_codes_on_8_devices(task, reference, tmp_path):  # noqa: F811
    """(pq in device mode shares all but the decoding, which test_index_codes checks; the tiny corpus has too few
    rows for 256 centroids.)"""
    config = train_task.tiny_config(task, **EXACT, **{"retrieval.mode": "device", "index.codes": "int8"})
    losses, _, hits, _ = _steps(config, str(tmp_path / "run"), _mesh(4, 2))
    # 8-bit rows: the same passages retrieved, doc scores within the codes' rounding of the exact ones
    np.testing.assert_allclose(losses, reference[0], rtol=2e-2)
    assert hits == reference[2]
