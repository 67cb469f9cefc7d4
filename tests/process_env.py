"""The environment of the tests: their own process (tests/conftest.py) and the commands they start.

One place for the XLA flags, so that every JAX process of the suite compiles the same way.

XLA:CPU's backend optimisation level 1 instead of its default 3: the suite's programs are small and most of its time
is compilation (a typical training test: 69 of its 101 s in backend_compile, profiled). The matmuls and
convolutions call Eigen / oneDNN kernels that were compiled in advance, so the level only changes how hard LLVM
optimises the fused elementwise loops around them; numerics are unchanged (no fast-math at any level). Measured on
the 2-core machine (user CPU seconds, under load, the same files each way): test_end_to_end_learning +
test_rag_losses 185.6 s at level 3, 154.4 s at level 1; test_train's gradient accumulation 43.5 s at level 3,
36.4 s at 1, 28.6 s at 0 — but level 0 leaves the elementwise loops unoptimised and made the training-heavy file
slower (106 s against 89). Level 1 is not used outside the tests: users' runs compile at XLA's default.

The commands the tests start share one persistent compilation cache for the suite's run (a fresh directory, made by
the first process that imports this module and inherited by the pytest-xdist workers): many of them train or
evaluate the same tiny configuration, and each would otherwise compile the same programs again. A cached executable
is the program itself, so nothing a test checks changes; the tests that need a cold compilation or a cache of their
own (resume tests, a window to stop a command in) name their own directory. Measured: test_cli + test_export +
test_cli_hostile_outputs 186.4 user CPU seconds without it, 163.9 s with it (-12%, under load).

The pytest processes use the same cache (tests/conftest.py calls cache_in_this_process): their tests build the same
small models in many places, each a new jitted function that JAX's in-memory cache cannot match, and the two xdist
workers compile the same programs. Measured (idle, an AVX2 2-core machine, `-n 2 --dist loadfile` over test_train,
test_index_refresh, test_reader_seam and test_fid): 400 s wall / 722 user CPU seconds without, 347 s / 623 s with it
(-13%). What tests there check about compilation reads JAX's in-memory cache (`_cache_size()`), which the persistent
cache does not change, or counts a persistent-cache hit as a compilation (test_index_multihost's counter).
"""

import os
import shutil
import tempfile

XLA_FLAGS = "--xla_backend_optimization_level=1"
_CACHE = "RAG_JAX_TESTS_COMPILATION_CACHE"
MADE_CACHE = _CACHE not in os.environ  # this process made the directory (pytest's own, not an xdist worker)
if MADE_CACHE:
    os.environ[_CACHE] = tempfile.mkdtemp(prefix="rag_jax_tests_xla_")


def remove_cache() -> None:
    """Deletes the suite's compilation cache, from the process that made it, once every test has run."""
    if MADE_CACHE:
        shutil.rmtree(os.environ[_CACHE], ignore_errors=True)


def _cache_options() -> dict[str, object]:
    """JAX's options for the suite's persistent cache, every program cached however quick to compile (each option is
    also read from the environment variable of its name in capitals)."""
    return {"jax_compilation_cache_dir": os.environ[_CACHE], "jax_persistent_cache_min_compile_time_secs": 0,
            "jax_persistent_cache_min_entry_size_bytes": 0}


def cache_in_this_process() -> None:
    """This process's compilations read and write the suite's persistent cache."""
    import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS is set: see tests/conftest.py)

    for name, value in _cache_options().items():
        jax.config.update(name, value)


def xla_flags(devices: int = 0) -> str:
    """XLA_FLAGS for a process with `devices` simulated CPU devices (0: XLA's default, one)."""
    return XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")


def command_env(devices: int = 0, **extra: str) -> dict[str, str]:
    """The environment of a command a test starts: this one's, on the CPU, with `devices` simulated devices and the
    suite's compilation cache (every program cached, however quick to compile), unless `extra` names another."""
    cache = {name.upper(): str(value) for name, value in _cache_options().items()}
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices), **cache, **extra}
