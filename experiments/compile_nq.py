"""Compiles the training step of a config for TPU topologies on any machine (libtpu needed, no TPU) and prints the
per-device memory, the FLOPs and whether it fits.

  python -m experiments.compile_nq --config=experiments/configs/nq.py:paper --topology=v4-32,v5e-16

Checkpoint fields of the config (model.*.init, model.init_from_rag) are read for their sizes only; unset ones in
the `paper` variant mean BERT-base encoders and BART-large.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from rag_jax.training import aot

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/nq.py:paper", "Training config to compile.")
_TOPOLOGY = flags.DEFINE_list("topology", ["v4-32"], "TPU accelerator types, e.g. v4-8,v4-32,v5e-16,v6e-16.")


def main(argv):
    del argv

    def compile_all():
        for name in _TOPOLOGY.value:
            try:
                topology = aot.parse_topology(name)
            except ValueError as e:
                raise cli.UsageError(str(e)) from None
            print(f"compiling the {_CONFIG.value.variant} train step for {name} ...", flush=True)
            print(aot.compile_train_step(_CONFIG.value, topology).summary(), flush=True)

    cli.run(compile_all)


if __name__ == "__main__":
    app.run(main)
