"""Compiles the training step of a config for TPU topologies on any machine (libtpu needed, no TPU) and prints the
per-device memory, the FLOPs and whether it fits, and what one index refresh (index.refresh_every) costs there on
paper: the document encoder's FLOPs over --refresh_passages passages at --utilisation of the slice's peak.

  python -m experiments.compile_nq --config=experiments/configs/nq.py:paper --topology=v4-32,v5e-16

Checkpoint fields of the config (model.*.init, model.init_from_rag) are read for their sizes only; unset ones in
the `paper` variant mean BERT-base encoders and BART-large.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/nq.py:paper", "Training config to compile.")
_TOPOLOGY = flags.DEFINE_list("topology", ["v4-32"], "TPU accelerator types, e.g. v4-8,v4-32,v5e-16,v6e-16.")
_REFRESH_PASSAGES = flags.DEFINE_integer("refresh_passages", 21_015_324, "Passages an index refresh re-embeds, for "
                                         "its time on paper (default: DPR's Wikipedia, psgs_w100).")
_INDEX_ROWS = flags.DEFINE_integer("index_rows", 21_015_300, "Device retrieval (--config.retrieval.mode=device): "
                                   "passages on the devices, as embeddings or --config.index.codes codes.",
                                   lower_bound=1)
_UTILISATION = flags.DEFINE_float("utilisation", 0.5, "Share of the slice's peak FLOPs assumed for step and refresh.")


def compile_all():
    # Compiling needs no local accelerator: the CPU backend keeps libtpu from probing this machine for a TPU (and
    # a running job's TPU is left alone). aot.Topology.devices quiets libtpu's own start-up where there is none.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from rag_jax.training import aot  # pylint: disable=g-import-not-at-top (after the flags, and JAX_PLATFORMS)

    topologies = []
    for name in _TOPOLOGY.value:
        try:
            topologies.append((name, aot.parse_topology(name)))
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
    for name, topology in topologies:
        print(f"compiling the {_CONFIG.value.variant} train step for {name} ...", flush=True)
        try:
            report = aot.compile_train_step(_CONFIG.value, topology, _INDEX_ROWS.value)
        except Exception as e:  # pylint: disable=broad-except (the compiler's own out-of-memory verdict is a result)
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"{name}: DOES NOT FIT: {str(e).splitlines()[0]}", flush=True)
            continue
        print(report.summary(), flush=True)
        print(aot.refresh_summary(_CONFIG.value, report, _REFRESH_PASSAGES.value, utilisation=_UTILISATION.value),
              flush=True)


if __name__ == "__main__":
    app.run(cli.main_running(compile_all), flags_parser=cli.parse_flags)
