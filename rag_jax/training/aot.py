"""Ahead-of-time compilation of the real training step for a TPU topology, on a machine without TPUs.

`jax.experimental.topologies` (with `libtpu` installed) describes the devices of a TPU slice; the train step is
lowered and compiled against a mesh of those devices with abstract inputs (no memory is allocated), and the
compiled executable reports per-device memory (`memory_analysis`) and FLOPs (`cost_analysis`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

import jax
import jax.numpy as jnp
import ml_collections

from rag_jax import sharding
from rag_jax.runs import build
from rag_jax.training import flops, inputs, optim, step as step_lib
from rag_jax.models import bert, hf, hf_files, registry, sentence_transformers_dir

GIB = 1024**3

# GCP accelerator types -> (topology name for libtpu, chip config, HBM per device in GiB). v4 and v5p run one
# device per chip ("megacore") and count TensorCores in their name (v4-8 = 4 chips); v5e and v6e count chips.
_GENERATIONS = {
    "v4": ("v4", "megacore", 32, 3, 2),
    "v5p": ("v5p", "megacore", 95, 3, 2),
    "v5e": ("v5e", None, 16, 2, 1),
    "v6e": ("v6e", None, 32, 2, 1),
}
_GRIDS = {
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8)},
}


@dataclasses.dataclass(frozen=True)
class Topology:
    accelerator_type: str  # e.g. "v4-32"
    topology_name: str  # e.g. "v4:2x2x4"
    chip_config_name: str | None
    hbm_gib: float  # per device

    def devices(self) -> list:
        from jax.experimental import topologies

        # Compiling touches no TPU, so several compiling processes (tests, parallel jobs) may share libtpu; without
        # this, libtpu's lockfile lets only one process at a time load it.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        if not _has_tpu_chips():
            # Without them libtpu, loaded here, looks for the slice it runs on and prints "could not determine TPU
            # accelerator type" and "unexpected worker hostname" errors; compiling needs neither, so it is told:
            # this host alone (any accelerator type will do, the topology is passed explicitly).
            os.environ.setdefault("TPU_ACCELERATOR_TYPE", self.accelerator_type)
            os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        kwargs = {"chip_config_name": self.chip_config_name} if self.chip_config_name else {}
        return list(topologies.get_topology_desc(platform="tpu", topology_name=self.topology_name, **kwargs).devices)


# PCI ids of TPU chips (Google's vendor id; v3, v4, v5p, v5e, v6e, 7x and one unnamed), as jax's TPU start-up
# (jax/_src/hardware_utils.py) recognises them. Other Google devices (gVNIC) share the vendor id.
_TPU_PCI = ("0x1ae0", ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"))


def _has_tpu_chips() -> bool:
    """Whether this machine has TPU chips on its PCI bus."""
    vendor_id, device_ids = _TPU_PCI
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        device = os.path.join(os.path.dirname(vendor), "device")
        with open(vendor) as f, open(device) as g:
            if f.read().strip() == vendor_id and g.read().strip() in device_ids:
                return True
    return False


def parse_topology(accelerator_type: str) -> Topology:
    """`v4-32`, `v5e-16`, ... (GCP accelerator types) -> the slice's topology."""
    match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", accelerator_type)
    if not match:
        raise ValueError(f"--topology={accelerator_type!r}: expected a TPU accelerator type such as v4-32 or v5e-16")
    generation, count = match.group(1), int(match.group(2))
    name, chip_config, hbm, dims, cores_per_chip = _GENERATIONS[generation]
    chips = count // cores_per_chip
    grid = _GRIDS[dims].get(chips)
    if grid is None or count % cores_per_chip:
        raise ValueError(f"--topology={accelerator_type!r}: unsupported size; {generation} sizes here: "
                         f"{sorted(c * cores_per_chip for c in _GRIDS[dims])}")  # fmt: skip
    return Topology(accelerator_type, f"{name}:" + "x".join(map(str, grid)), chip_config, hbm)


def sizes_only(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose networks are random-init with the sizes of the checkpoints it names (read from
    their config.json only), so compiling needs no weights. Unset checkpoint fields of the `paper` variant get the
    paper's sizes: BERT-base encoders and, for the generator, its architecture's default config (BART-large,
    T5 v1.1-large)."""
    config = ml_collections.ConfigDict(config.to_dict())
    m = config.model
    if m.init_from_rag is not None:
        rag_hf = hf_files.read_config(hf_files.resolve(m.init_from_rag))
        _set_encoder_sizes(m.question_encoder, hf.bert_config_from_hf(rag_hf["question_encoder"]))
        _set_generator_sizes(m.generator, hf.generator_config_from_hf(rag_hf["generator"]))
        m.init_from_rag = None
    for part in (m.question_encoder, m.doc_encoder):
        if part.init is None:
            _set_encoder_sizes(part, bert.BertConfig())  # BERT-base, DPR's encoders
        elif part.init != "random":
            _set_encoder_from_checkpoint(part, hf_files.resolve(part.init))
    if m.generator.init is None:  # BART-large, or T5 v1.1-large (Flan-T5-large)
        _set_generator_sizes(m.generator, build.generator_architecture(m.generator).config_class())
    elif m.generator.init != "random":
        generator_hf = hf_files.read_config(hf_files.resolve(m.generator.init))
        _set_generator_sizes(m.generator, hf.generator_config_from_hf(generator_hf))
    return config


def _set_encoder_from_checkpoint(c: ml_collections.ConfigDict, directory: str) -> None:
    """Sizes from the checkpoint's config.json, and a sentence-transformers directory's pooling and normalisation
    where the config leaves them to the checkpoint."""
    pipeline = sentence_transformers_dir.read_pipeline(directory)
    if pipeline is not None:
        directory = pipeline.transformer_dir
        if c.get("pooling") == build.AUTO_POOLING:
            c.pooling = pipeline.pooling
        if c.get("normalize") is None:
            c.normalize = pipeline.normalize
    _set_encoder_sizes(c, hf.bert_config_from_hf(hf_files.read_config(directory)))


def _set_encoder_sizes(c: ml_collections.ConfigDict, cfg) -> None:
    c.init = "random"
    c.vocab_size, c.hidden_size, c.num_layers = cfg.vocab_size, cfg.hidden_size, cfg.num_layers
    c.num_heads, c.intermediate_size = cfg.num_heads, cfg.intermediate_size
    c.max_position_embeddings = cfg.max_position_embeddings


def _set_generator_sizes(c: ml_collections.ConfigDict, cfg) -> None:
    entry = registry.for_config(cfg)
    if c.get("architecture") is None or build.generator_architecture(c) is not entry:  # a checkpoint's own
        c.architecture = entry.name
    c.init = "random"
    entry.sizes_to_run(c, cfg)


@dataclasses.dataclass
class CompileReport:
    topology: Topology
    devices: int
    mesh: dict[str, int]
    per_device_bytes: dict[str, int]  # arguments, outputs, temporaries, aliased (donated) and the peak estimate
    flops_per_device: float  # XLA's count for the partitioned step, which is what one device runs

    @property
    def peak_gib(self) -> float:
        return self.per_device_bytes["peak"] / GIB

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.topology.hbm_gib

    def summary(self) -> str:
        b = {k: v / GIB for k, v in self.per_device_bytes.items()}
        return (
            f"{self.topology.accelerator_type} ({self.topology.topology_name}, {self.devices} devices, mesh "
            f"{self.mesh}): per device {b['peak']:.2f} GiB of {self.topology.hbm_gib:g} GiB HBM "
            f"(arguments {b['arguments']:.2f}, outputs {b['outputs']:.2f}, temporaries {b['temporaries']:.2f}, "
            f"donated {b['aliased']:.2f}) -> {'fits' if self.fits else 'DOES NOT FIT'}; "
            f"{self.flops_per_device / 1e12:.2f} TFLOPs per device per step "
            f"({self.flops_per_device * self.devices / 1e12:.1f} over the slice)"
        )


def refresh_summary(config: ml_collections.ConfigDict, report: CompileReport, num_passages: int, *,
                    utilisation: float = 0.5, share: float = 0.1) -> str:
    """What one index refresh (index_refresh.py) costs on the report's slice, on paper: the document encoder's
    matmul FLOPs over num_passages passages at index.max_length tokens, over the slice's peak at `utilisation`, and
    the refresh interval at which refreshing takes at most `share` of the training time (steps at the same
    utilisation of the compiled step's FLOPs)."""
    peak = flops.PEAK_TFLOPS.get(report.topology.accelerator_type.split("-")[0])
    if peak is None:
        return f"index refresh: no peak FLOPs known for {report.topology.accelerator_type}"
    c = sizes_only(config).model.doc_encoder
    doc_cfg = bert.BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_layers,
                              num_heads=c.num_heads, intermediate_size=c.intermediate_size,
                              max_position_embeddings=c.max_position_embeddings)
    work = flops.index_refresh_flops(doc_cfg, num_passages, config.index.max_length)
    rate = report.devices * peak * 1e12 * utilisation
    refresh_s, step_s = work / rate, report.flops_per_device * report.devices / rate
    every = flops.refresh_interval_for_share(refresh_s, step_s, share)
    return (f"index refresh of {num_passages:,} passages at {config.index.max_length} tokens: {work / 1e15:.0f} "
            f"PFLOPs, {refresh_s:.0f} s at {utilisation:.0%} of the slice's {report.devices * peak / 1e3:.1f} PFLOP/s "
            f"bf16 peak; with {step_s * 1e3:.0f} ms steps at that utilisation, refreshing every {every:,} steps or "
            f"less often costs <= {share:.0%} of training time")


def abstract_device_corpus(config: ml_collections.ConfigDict, model, mesh, num_passages: int
                           ) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of device retrieval's corpus for `num_passages` rows (inputs.device_corpus's arrays): the
    embeddings in index.dtype, or with index.codes the codes (capacity rows, codes.capacity), and the passage token
    table (+ the document-encoder tokens end to end)."""
    from rag_jax.retrieval import code_spec, codes as codes_lib, contexts  # pylint: disable=g-import-not-at-top

    shards, dim = sharding.corpus_size(mesh), model.question_encoder_config.output_dim
    place = lambda key, shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.named_sharding(
        mesh, inputs.CORPUS_AXES[key]))
    width = 1 + contexts.table_width(model.config.context)
    if config.index.get("codes"):
        spec = code_spec.parse_spec(config.index.codes, "config index.codes")
        n = codes_lib.capacity(num_passages, shards)
        corpus = {"codes": place("codes", (n, spec.bytes_per_row(dim) - 4 if spec.kind == "int8" else spec.m),
                                 jnp.int8 if spec.kind == "int8" else jnp.uint8),
                  "code_scale": place("code_scale", (n,), jnp.float32), "code_bias": place("code_bias", (n,), jnp.float32)}
        if spec.kind == "pq":
            corpus["codebooks"] = place("codebooks", (spec.m, codes_lib.NUM_CENTROIDS, dim // spec.m), jnp.float32)
    else:
        n = -(-num_passages // shards) * shards
        dtype = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}[config.index.dtype]
        corpus = {"embeddings": place("embeddings", (n, dim), dtype)}
    corpus["tokens"] = place("tokens", (n, width), jnp.int32)
    if model.trains_doc_encoder:
        corpus["doc_tokens"] = place("doc_tokens", (n, 1 + 2 * config.index.max_length), jnp.int32)
    return corpus


def compile_train_step(config: ml_collections.ConfigDict, topology: Topology, num_passages: int = 21_015_300
                       ) -> CompileReport:
    """Lowers and compiles the training step of `config` for `topology`: host retrieval inputs, or in device mode
    (retrieval.mode) the corpus of `num_passages` rows on the devices (its embeddings, or index.codes' codes)."""
    config = sizes_only(config)
    devices = topology.devices()
    mesh = sharding.mesh_from_config(config.mesh, devices=devices)
    build.check_batch(config, sharding.data_size(mesh), 1)
    model = build.build_rag(config, load_weights=False).rag
    tx = optim.make_optimizer(config)
    abstract_state, state_shardings = step_lib.state_layout(model, tx, mesh)
    corpus = {}
    if config.retrieval.mode == "device":
        corpus = abstract_device_corpus(config, model, mesh, num_passages)
        keys = inputs.DEVICE_KEYS
        step = step_lib.make_train_step(model, tx, config, mesh, state_shardings, keys,
                                        {key: x.sharding for key, x in corpus.items()}, num_passages)
    else:
        keys = inputs.HOST_KEYS + (inputs.DOC_TOKEN_KEYS if model.trains_doc_encoder else ())
        step = step_lib.make_train_step(model, tx, config, mesh, state_shardings, keys)
    batch = abstract_batch(config, model, mesh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    compiled = step.lower(abstract_state, batch, rng, corpus).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_device = {
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
    }
    per_device["peak"] = per_device["arguments"] + per_device["outputs"] + per_device["temporaries"] - per_device["aliased"]
    return CompileReport(topology, len(devices), dict(mesh.shape), per_device, float(cost.get("flops", 0.0)))


def abstract_batch(config: ml_collections.ConfigDict, model, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one global host-retrieval batch, with the step's input shardings."""
    b, k = config.train.global_batch_size, inputs.candidates(config)  # L candidates when the step reranks
    shapes = {
        "question_input_ids": (b, config.data.max_question_length),
        "question_attention_mask": (b, config.data.max_question_length),
        "labels": (b, config.data.max_target_length),
        "gold_row": (b,),
        "context_input_ids": (b, k, model.config.context.max_combined_length),  # the reader's (FiD's passage_length)
        "context_attention_mask": (b, k, model.config.context.max_combined_length),
        "doc_embeds": (b, k, model.question_encoder_config.output_dim),
        "doc_rows": (b, k),
    }
    if config.retrieval.mode == "device":  # questions only: the step retrieves and assembles the rest
        from rag_jax.retrieval import contexts  # pylint: disable=g-import-not-at-top

        width = contexts.table_width(model.config.context)
        shapes = {key: shapes[key] for key in ("question_input_ids", "question_attention_mask", "labels", "gold_row")}
        shapes.update(question_gen_ids=(b, width), question_gen_length=(b,))
    if model.trains_doc_encoder:  # the passages' document-encoder tokens, index.max_length of them
        shapes.update({key: (b, k, config.index.max_length) for key in inputs.DOC_TOKEN_KEYS})
    return {
        key: jax.ShapeDtypeStruct(shape, jnp.float32 if key == "doc_embeds" else jnp.int32,
                                  sharding=sharding.named_sharding(mesh, inputs.BATCH_AXES[key]))
        for key, shape in shapes.items()
    }  # fmt: skip
