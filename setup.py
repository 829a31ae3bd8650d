#!/usr/bin/env python
"""ovseg: open-vocabulary segmentation on Detectron2 with CLIP / CLIPSelf encoders.

detectron2 and torch are not listed in install_requires: detectron2 is not on PyPI and torch
must match the user's CUDA. `scripts/install.sh` installs both (see README).
"""
from setuptools import find_packages, setup

setup(
    name="ovseg",
    version="0.1.0",
    description="Open-vocabulary semantic/panoptic segmentation with CLIP(Self) on Detectron2",
    python_requires=">=3.9",
    packages=find_packages(include=["ovseg", "ovseg.*"]),
    package_data={"ovseg": ["model_configs/*.json", "data/class_lists/*.json", "data/class_lists/*.txt",
                            "data/class_lists/authors/*/*.txt", "assets/*"]},
    install_requires=[
        "open_clip_torch>=2.24",
        "timm",  # open_clip builds EVA02 towers through timm
        "scipy",
        "tqdm",
        "fvcore",
        "pycocotools",
        "opencv-python-headless",
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout", "ruff"]},
)
