"""ptune-rt: fused Triton kernels and a module-swap runtime for PEFT methods.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as
``ptune_rt.kernels`` only: no top-level ``kernels`` module is installed, since that
name belongs to Hugging Face's own ``kernels`` package, which transformers probes.
"""
from setuptools import find_packages, setup

runtime_packages = [p for p in find_packages(include=["ptune_rt", "ptune_rt.*"])]

setup(
    name="ptune-rt",
    version="0.1.0",
    description="Kernel-optimized runtime for parameter-efficient fine-tuning (LoRA, prefix/P-tuning, prompt tuning)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=runtime_packages + ["ptune_rt.kernels"],
    package_dir={"ptune_rt.kernels": "kernels"},
    install_requires=[
        # 2.13.0 is the CPU build used in CI; any 2.5+ with torch.library.custom_op works.
        "torch>=2.5,<2.15",
        "triton>=3.1",
        "transformers>=4.56",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        # PEFT is the parity reference and the benchmark's baseline. PEFT 0.21.2 (the newest) breaks
        # on transformers 5.24, which renamed past_key_values to cache: its prefix tuning refuses
        # BERT/RoBERTa and its prefix / prompt generate() gives other tokens than on 5.23. ptune-rt's
        # own paths give the same tokens on 5.23 and 5.24; the comparisons need a pair that works.
        "test": ["pytest>=8", "pytest-benchmark>=4", "peft>=0.17", "transformers<5.24", "matplotlib>=3.7",
                 "hypothesis>=6.100"],  # property-based fuzzing of the ops (tests/test_fuzz.py)
        "bench": ["pytest-benchmark>=4", "peft>=0.17", "transformers<5.24", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["ptune-rt=ptune_rt.cli:main"]},
)
