"""Test set-up that every test file gets, however pytest is started (`make test`, or `pytest tests/test_x.py`).

Tests see 8 simulated CPU devices so that sharded code paths run for real: the flag must be set before jax is
first imported, which is why it is here and not in a fixture. JAX_PLATFORMS=cpu keeps the installed libtpu (for
the TPU compilation tests) from probing for a TPU.

Markers: `slow` for tests that train or run whole commands for tens of seconds (deselect with -m "not slow" while
iterating), `multiprocess` for tests that start several JAX processes talking over 127.0.0.1.
"""

import os

import pytest

from tests import process_env

# The hostile tables' shared helpers (tests/hostile.py, a plugin of theirs) use plain asserts: rewrite them, however
# the test files that import them are ordered.
pytest.register_assert_rewrite("tests.hostile")

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + process_env.xla_flags(devices=8)).strip()
process_env.cache_in_this_process()  # the suite's persistent compilation cache (tests/process_env.py)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or runs whole commands for tens of seconds")
    config.addinivalue_line("markers", "multiprocess: starts several JAX processes (127.0.0.1, gloo collectives)")


def pytest_unconfigure(config):
    process_env.remove_cache()  # a few MB a run under /tmp otherwise
