"""Benchmarks against the references (`python -m experiments.bench`); one module per sub-benchmark."""

BENCHMARKS = ("train_step", "decode", "embed", "mips", "eval", "host", "host_train", "retriever_step", "mfu", "compressed",
              "fid")
