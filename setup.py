"""unimm: unified multimodal models (Transfusion, Show-o, JanusFlow, Janus-Pro) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="unimm",
    version="0.1.0",
    description="A JAX/Flax framework for unified multimodal models",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["unimm", "unimm.*"]),
    package_data={"unimm.eval": ["prompts/*.jsonl"], "unimm.tokenizers": ["assets/*.model"]},
    install_requires=[
        "jax>=0.9",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.11",
        "pillow>=10.0",
        "tensorboardX>=2.6",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5"]},
)
