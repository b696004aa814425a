"""sclslt: gloss-free sign language translation with Selective Contrastive Learning (SCL-SLT).

`kernels/` installs as `sclslt_kernels` (a top-level `kernels` would clash with a PyPI package).
The ranges here are loose, for installing into one's own environment; tools/setup_env.sh installs
through constraints.txt (the exact versions the suite passed with). CPU machines get the locked CPU
torch, GPU clusters keep their own CUDA build and the triton it pins (torch 2.11 .. 2.13, triton
3.6 .. 3.9). deepspeed is pinned to the release our gradient-equality test passes with (ZeRO-2 has
shipped releases with wrong gradients).
"""

from setuptools import find_packages, setup

TRACK = ["wandb>=0.19", "trackio>=0.4"]  # train.report_to beyond TensorBoard (sclslt/runtime/trackers.py)
DEMO = ["gradio>=5", "playwright>=1.45"]  # sclslt demo, and the browser that tests it

setup(
    name="sclslt",
    version="0.1.0",
    description="Distributed trainer for gloss-free SLT with Selective Contrastive Learning",
    packages=find_packages(include=["sclslt", "sclslt.*"]) + ["sclslt_kernels"],
    package_dir={"sclslt": "sclslt", "sclslt_kernels": "kernels"},
    package_data={"sclslt": ["configs/*.json"]},  # the DeepSpeed configs (`--deepspeed zero2`)
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",  # triton >= 3.6 (below) is what torch 2.11 brings
        "deepspeed==0.19.8",
        "transformers>=5.0,<6",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "webdataset>=1.0,<2",
        "sacrebleu>=2.4,<3",
        "rich>=13",
        "pyyaml>=6",
        "numpy>=1.26",
        "nvidia-ml-py>=12",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        "peft>=0.13",
        "sentencepiece>=0.2",
        "av>=18",
        "fsspec>=2024.2",  # remote shards (http(s), s3, gs, ...): sclslt/data/storage.py
        "aiohttp>=3.9",  # fsspec's http(s) filesystem
        "webvtt-py>=0.5",  # the captions layout (YouTube-ASL style): WebVTT / SRT cues
        "pillow>=10",
        "zstandard>=0.22",
        # jpg shards decoded on the GPU (nvJPEG) or CPU (libjpeg-turbo) in batches: sclslt/data/devdecode.py;
        # CUDA 12 libraries of their own, whatever CUDA the cluster's torch was built with
        "nvidia-nvimgcodec-cu12[nvjpeg]>=0.9,<1; platform_system == 'Linux'",
        # the kernels compile on 3.6 .. 3.9 (tests/e2e/test_kernel_compile.py)
        "triton>=3.6; platform_system == 'Linux'",
    ],
    entry_points={"console_scripts": ["sclslt=sclslt.cli:main"]},
    extras_require={
        "mpi": ["mpi4py>=4", "openmpi>=5"],  # clusters usually bring their own MPI
        "track": TRACK,
        "demo": DEMO,
        "test": [
            "pytest>=9,<10",
            "rouge-score==0.1.2",
            "mpi4py>=4",
            "openmpi>=5",
            "hypothesis>=6.100,<7",  # tests/unit/data/test_fuzz.py
            "ruff>=0.17,<0.18",  # tests/unit/project/test_style.py (ruff.toml)
            *TRACK,
            *DEMO,
        ],
    },  # the trackers' and the demo's tests
)
