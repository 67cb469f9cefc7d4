"""mfu: on an accelerator, the `paper` config's step in bf16 as a fraction of the device's peak FLOP/s (model FLOPs
from rag_jax/training/flops.py), and `paper_t5`'s (a T5-large-sized generator) with `--generators` holding t5;
and exact MIPS bytes/second as a fraction of HBM bandwidth. On CPU (no datasheet peak), the peaks are measured
(a large jitted GEMM in float32 and in bfloat16) and the `small` BART training step's achieved FLOP/s in each
compute dtype is given as a share of both."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from experiments.bench.common import (GENERATORS, Options, jax_model, median_seconds, model_config, train_batch,
                                      twins, with_compute_dtype)  # fmt: skip
from experiments.bench.train_step import JaxTrainer, step_gflop


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    name: str
    bf16_flops: float  # dense peak FLOP/s per device (jax device)
    hbm_bytes_per_s: float


# Matched in order against jax's device_kind (TPU v5e reports "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite"), so
# the more specific names come first. Vendor datasheet figures; H100/H200 are the SXM parts, dense (no sparsity).
PEAKS: tuple[tuple[tuple[str, ...], DevicePeak], ...] = (
    (("v6 lite", "v6e"), DevicePeak("TPU v6e", 918e12, 1640e9)),
    (("v5 lite", "v5e"), DevicePeak("TPU v5e", 197e12, 819e9)),
    (("v5p", "tpu v5"), DevicePeak("TPU v5p", 459e12, 2765e9)),
    (("tpu v4",), DevicePeak("TPU v4", 275e12, 1228e9)),
    (("h200",), DevicePeak("H200", 989e12, 4800e9)),
    (("h100 pcie",), DevicePeak("H100 PCIe", 756e12, 2000e9)),
    (("h100",), DevicePeak("H100 SXM", 989e12, 3350e9)),
    (("a100-sxm4-40gb", "a100-pcie-40gb"), DevicePeak("A100 40GB", 312e12, 1555e9)),
    (("a100",), DevicePeak("A100 80GB", 312e12, 2039e9)),
)


def device_peak(device_kind: str) -> DevicePeak | None:
    """The peak bf16 FLOP/s and HBM bandwidth of a jax device kind, or None when it is not in PEAKS."""
    kind = device_kind.lower()
    for names, peak in PEAKS:
        if any(name in kind for name in names):
            return peak
    return None


def paper_config(batch_per_device: int, generator: str = "bart") -> ml_collections.ConfigDict:
    """experiments/configs/nq.py `paper` with its networks' sizes (BERT-base encoders, BART-large, K=10, 128
    question / 300 source / 25 target tokens, bf16) and random weights, or `paper_t5` (T5 v1.1-large / Flan-T5-large
    sizes) for generator "t5"; the batch is per device."""
    from experiments.configs import nq
    from rag_jax.training import aot

    config = aot.sizes_only(nq.get_config("paper_t5" if generator == "t5" else "paper"))
    config.train.global_batch_size = batch_per_device * jax.device_count()
    return config


def step_row(config: ml_collections.ConfigDict, peak: DevicePeak, repeats: int) -> dict:
    """Training-step MFU of `config` on all devices against `peak`."""
    from rag_jax.training import flops

    pair = jax_model(config)
    model, mesh = pair.model, pair.mesh
    trainer = JaxTrainer(pair, train_batch(config, model))
    pair.state = None  # the trainer steps its own copy; one state in device memory, not two
    xla_cost = trainer.compile().cost_analysis()
    xla_cost = xla_cost[0] if isinstance(xla_cost, (list, tuple)) else xla_cost
    seconds = median_seconds(trainer.step, repeats, warmup=1)  # compiled above; warm-up runs one step
    c = config
    b, k = c.train.global_batch_size, c.model.n_docs
    model_flops = flops.rag_train_step_flops(model, b, k, c.data.max_question_length, c.model.max_combined_length,
                                             c.data.max_target_length)  # fmt: skip
    devices = mesh.size
    return dict(measure="train_step", generator=c.model.generator.get("architecture", "bart"), device=peak.name,
                devices=devices, dtype=c.model.compute_dtype, batch=b, n_docs=k, seconds=seconds,
                model_tflops=model_flops / 1e12, xla_tflops=float(xla_cost.get("flops", 0.0)) * devices / 1e12,
                achieved_tflops_per_s=model_flops / seconds / 1e12,
                fraction_of_peak=model_flops / seconds / (peak.bf16_flops * devices))  # fmt: skip


def mfu_rows(configs: list[ml_collections.ConfigDict], peak: DevicePeak, repeats: int, mips_rows: int,
             mips_queries: tuple[int, ...] = (8, 64)) -> list[dict]:  # fmt: skip
    """Training-step MFU of each config on all devices (one at a time, each freed before the next), and exact MIPS
    bytes/second on one device, against `peak`."""
    from rag_jax.retrieval import exact

    rows = [step_row(config, peak, repeats) for config in configs]  # each model is freed when its row is made

    dim = 768
    corpus_NxD = jax.random.normal(jax.random.PRNGKey(2), (mips_rows, dim), jnp.float32)
    search = jax.jit(exact.exact_topk, static_argnames=("k",))
    for q in mips_queries:
        queries = jax.random.normal(jax.random.PRNGKey(3), (q, dim), jnp.float32)
        seconds = median_seconds(lambda: jax.block_until_ready(search(queries, corpus_NxD, k=10)), repeats)
        corpus_bytes = corpus_NxD.size * corpus_NxD.dtype.itemsize  # read once per search
        rows.append(dict(measure=f"exact MIPS {mips_rows}x{dim} f32, {q} queries, top-10", device=peak.name,
                         devices=1, seconds=seconds, achieved_gb_per_s=corpus_bytes / seconds / 1e9,
                         fraction_of_peak=corpus_bytes / seconds / peak.hbm_bytes_per_s))  # fmt: skip
    return rows


CPU_GEMM_SIZE = 2048  # the square GEMM whose rate is this CPU's peak (4096 measured within a few % of it)


def gemm_flops_per_s(dtype: str, n: int, repeats: int) -> float:
    """FLOP/s of a jitted (n, n) @ (n, n) in `dtype` on the default device, accumulated in float32 (bfloat16 x
    bfloat16 -> float32 is XLA:CPU's bfloat16 GEMM kernel; a bfloat16 result would run as a float32 GEMM)."""
    a_NxN = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    gemm = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
    seconds = median_seconds(lambda: gemm(a_NxN, a_NxN).block_until_ready(), repeats, warmup=2)
    return 2 * n**3 / seconds


def cpu_rows(opts: Options) -> list[dict]:
    """This CPU's measured float32 and bfloat16 GEMM peaks, and the BART training step (`small`; --quick: `tiny`,
    bfloat16 alone) in each compute dtype as a share of both."""
    n = 256 if opts.quick else CPU_GEMM_SIZE
    peaks = {dtype: gemm_flops_per_s(dtype, n, opts.repeats) for dtype in ("float32", "bfloat16")}
    rows = [dict(measure=f"GEMM {n}x{n}x{n} {dtype} (float32 accumulation)", device="cpu", devices=1,
                 achieved_gflop_per_s=peak / 1e9) for dtype, peak in peaks.items()]  # fmt: skip
    size = "tiny" if opts.quick else "small"
    base = twins(size, "bart")
    for dtype in ("bfloat16",) if opts.quick else ("float32", "bfloat16"):
        pair = with_compute_dtype(base, dtype)
        trainer = JaxTrainer(pair, train_batch(pair.config, pair.model))
        seconds = median_seconds(trainer.step, opts.repeats, warmup=1)
        achieved = step_gflop(pair) * 1e9 / seconds  # the whole step on this CPU, whatever jax device count splits it
        rows.append(dict(measure=f"train_step {size} bart", device="cpu", devices=pair.mesh.size, dtype=dtype,
                         seconds=seconds, achieved_gflop_per_s=achieved / 1e9,
                         share_of_float32_peak=achieved / peaks["float32"],
                         share_of_bfloat16_peak=achieved / peaks["bfloat16"]))  # fmt: skip
    return rows


def run(opts: Options) -> list[dict]:
    """The paper config's training-step MFU in bf16 and exact MIPS bandwidth on an accelerator; on CPU, measured
    GEMM peaks and the small step's share of them."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return cpu_rows(opts)
    peak = device_peak(device.device_kind)
    if peak is None:
        reason = f"device kind {device.device_kind!r} is not in experiments/bench/mfu.py PEAKS; add its peak figures"
        print(f"mfu: skipped: {reason}")
        return [dict(status="skipped", reason=reason)]
    generators = [g for g in GENERATORS if g in opts.generators]
    if opts.quick:
        return mfu_rows([model_config("tiny", g) for g in generators], peak, opts.repeats, mips_rows=100_000)
    return mfu_rows([paper_config(opts.mfu_batch_per_device, g) for g in generators], peak, opts.repeats,
                    mips_rows=opts.mfu_mips_rows)  # fmt: skip
