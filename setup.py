"""prefjax: preference learning (reward models, DPO and friends) for Gemma-style models in JAX."""
import setuptools

RUNTIME = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "sentencepiece>=0.2.0",
    "ml-collections>=1.0.0",
    "absl-py>=2.1.0",
    "numpy>=1.26",
    "safetensors>=0.4.3",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "pyarrow>=15.0",
    "array-record>=0.7.0",
    "etils[epath]>=1.7",
    "matplotlib>=3.8",
]

setuptools.setup(
    name="prefjax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Namespace discovery so the data-only folders under prefjax/assets ship as package data.
    packages=setuptools.find_namespace_packages(include=["prefjax", "prefjax.*"]),
    package_data={"": ["*.model", "*.jsonl.gz", "LICENSE", "SOURCE.md"]},
    install_requires=RUNTIME,
    extras_require={
        # jax[tpu] brings libtpu (about 45 s to install, 0.7 GB), which compiles TPU programs on
        # any machine: the tests compile prefjax's train step for TPU topologies (prefjax.aot).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "jax[tpu]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
        # Parity tests against Hugging Face TRL / transformers. torch==2.13.0 is the CPU build.
        "parity": ["torch==2.13.0", "trl==1.16.0", "transformers>=4.56", "peft>=0.13"],
        # GGUF (llama.cpp) model files: models.load_gguf_checkpoint, a .gguf data.tokenizer.
        "gguf": ["gguf>=0.19"],
    },
)
