"""Package metadata and the native build (CMake + pybind11; see README "Building wheels")."""
from setuptools import find_packages, setup

setup(
    name="memft_kernels",
    version="0.1.0",
    description="Fused GPU/CPU kernels for the MemFT loss, LoRA memorization training and the Parametric Memory Law",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["memft_kernels", "memft_kernels.*"]),
    package_data={"memft_kernels": ["data/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "triton>=3.6; platform_system=='Linux'",
    ],
    extras_require={
        "train": [
            "transformers>=4.46",
            "peft>=0.13",
            "safetensors>=0.4",
            "tokenizers>=0.19",
            "tqdm>=4.66",
            "matplotlib>=3.7",
            "scipy>=1.10",
        ],
        "test": ["pytest>=8", "hypothesis>=6.100"],
    },
    entry_points={"console_scripts": ["memft=memft_kernels.cli:main"]},
)
