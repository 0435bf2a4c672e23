"""Packaging for mallowspo-fast.

The Triton kernels live in the top-level ``csrc_triton/`` folder (kernels only, no policy) but are
installed *inside* the package as ``mallowspo_fast._kernels``: users import ``mallowspo_fast`` and
never a top-level ``csrc_triton``.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "mallowspo_fast" / "_version.py").read_text(), re.M
).group(1)

PACKAGES = [
    "mallowspo_fast",
    "mallowspo_fast.ops",
    "mallowspo_fast.losses",
    "mallowspo_fast.data",
    "mallowspo_fast.trainer",
    "mallowspo_fast.integrations",
    "mallowspo_fast._kernels",
]

setup(
    name="mallowspo-fast",
    version=VERSION,
    description="Fused Triton kernels and a lean DeepSpeed trainer for MallowsPO and the DPO family",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"mallowspo_fast._kernels": "csrc_triton"},
    # the native CPU loops are compiled from source at first use (mallowspo_fast/ops/cpu_native.py)
    package_data={"mallowspo_fast": ["resources/*"], "mallowspo_fast._kernels": ["*.c"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.46",
        "datasets>=3.0",
        "deepspeed>=0.15",
        "tokenizers>=0.20",
        "tqdm",
        "pyyaml",
        "numpy",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "ruff", "matplotlib", "tensorboard", "hypothesis"],
        # The TRL version the integration is tested with (tests/integrations); PEFT for its LoRA tests.
        "trl": ["trl==1.16.0", "peft>=0.15"],
        # The Megatron-core version the vocab-parallel drop-ins are tested against (tests/integrations).
        "megatron": ["megatron-core==0.16.1"],
        "docs": ["mkdocs==1.6.1", "mkdocs-material>=9.5", "mkdocstrings-python>=1.10"],
    },
    entry_points={
        "console_scripts": [
            "mallowspo-train=mallowspo_fast.trainer.cli:main",
            "mallowspo-data=mallowspo_fast.data.cli:main",
        ]
    },
)
