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
"""

import os

XLA_FLAGS = "--xla_backend_optimization_level=1"


def xla_flags(devices: int = 0) -> str:
    """XLA_FLAGS for a process with `devices` simulated CPU devices (0: XLA's default, one)."""
    return XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")


def command_env(devices: int = 0, **extra: str) -> dict[str, str]:
    """The environment of a command a test starts: this one's, on the CPU, with `devices` simulated devices."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices), **extra}
