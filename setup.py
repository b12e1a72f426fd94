from setuptools import find_packages, setup

setup(
    name="fasttrain",
    version="0.1.0",
    description="High-throughput ImageNet trainer for supervised contrastive learning with multi-exit encoders",
    packages=find_packages(include=["fasttrain", "fasttrain.*", "loaders", "loaders.*"]),
    python_requires=">=3.10",
    entry_points={"console_scripts": ["fasttrain=fasttrain.cli:main"]},
    install_requires=[
        # the supported range; CI tests both ends (scripts/bootstrap.sh pins the newest, .ci/run the oldest)
        "torch>=2.11,<2.15",
        "torchvision>=0.26,<0.30",
        "accelerate>=1.10",
        "timm>=1.0",
        "pydantic>=2.5",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "numpy",
        "pillow",
    ],
    extras_require={
        "ffcv": ["ffcv==1.0.2", "numba", "opencv-python-headless"],
        "dali": ["nvidia-dali-cuda130"],  # the CUDA 13 build, as torch 2.14.1's (CUDA-12 DALI needs CUDA-12 NPP/cuFFT)
        # pytest -n 2: two tests at once, one thread each; ruff: the lint CI runs
        "dev": ["pytest>=8", "pytest-xdist>=3", "scikit-learn", "ruff>=0.6"],
        "wandb": ["wandb"],  # run.trackers: [wandb]
        "analysis": ["torchcam>=0.5", "scikit-learn"],  # fasttrain.analysis.pictures: Grad-CAM, t-SNE
    },
)
