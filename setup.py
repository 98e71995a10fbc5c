"""Packaging for dpo_fast: fused Triton log-prob/DPO kernels for QLoRA Llama models."""
from setuptools import find_packages, setup

setup(
    name="dpo_fast",
    version="0.1.0",
    description="Fast, memory-lean DPO for QLoRA Llama models: fused Triton log-prob + DPO kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["dpo_fast", "dpo_fast.*"]),
    package_data={"dpo_fast": ["data/*"]},
    install_requires=[
        # Ranges satisfied by both the CPU machine (torch 2.13 / triton 3.9 / transformers 5.24)
        # and the GPU machine (torch 2.11 / triton 3.6 / transformers 5.17).
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.46",
        "peft>=0.13",
        "accelerate>=0.34",
        "safetensors>=0.4",
        "datasets>=2.20",
        "pyyaml>=5.1",  # --config files
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "numpy>=1.24",
    ],
    extras_require={
        # trl is in the test extra so the TRL comparisons run instead of being skipped.
        "test": ["pytest>=7", "psutil>=5.9", "bitsandbytes>=0.45", "trl>=1.0,<2"],
        "trl": ["trl>=1.0,<2"],
        "bench": ["psutil>=5.9", "bitsandbytes>=0.45", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["dpo-fast=dpo_fast.cli:main"]},
)
