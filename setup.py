"""Package metadata: `pip install -e .` (extras: [hf], [te], [eval], [dev])."""

from setuptools import find_packages, setup

setup(
    name="megatron-periln",
    version="0.1.0",
    description="Megatron-style GPT training with Pre-LN, Post-LN, Mix-LN and Peri-LN placements",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron", "megatron.*"]),
    py_modules=["pretrain_gpt"],
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "sentencepiece", "regex"],
    extras_require={
        "hf": ["transformers", "safetensors", "tokenizers"],
        "te": ["transformer-engine[pytorch]"],
        "eval": ["pyarrow"],  # tools/evaluate.py's parquet task files
        "dev": ["pytest", "tqdm", "tokenizers", "transformers", "ruff", "tensorboard", "wandb",
                "matplotlib", "pyarrow"],
        "plot": ["matplotlib"],
    },
)
