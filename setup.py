#!/usr/bin/env python
"""ovseg: open-vocabulary segmentation on Detectron2 with CLIP / CLIPSelf encoders.

detectron2 and torch are not listed in install_requires: detectron2 is not on PyPI and torch
must match the user's CUDA. `scripts/install.sh` installs both (see README).

The ranges below are the tested ones: tests/test_library_versions.py runs the backbone parity tests with the
lowest timm and open_clip of each range (the normal suite runs the installed, highest ones), and the
ground-truth loader under numpy 2. Keep these and ovseg.modeling.backbone.clip_vit.TIMM_TESTED in step.
"""
from setuptools import find_packages, setup

setup(
    name="ovseg",
    version="0.1.0",
    description="Open-vocabulary semantic/panoptic segmentation with CLIP(Self) on Detectron2",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["ovseg", "ovseg.*"]),
    # shipped configs and class lists (authors/, fcclip/ included), so config names and `ovseg://` paths resolve
    # after `pip install`; `**` needs setuptools >= 62.3 (pyproject.toml [build-system])
    package_data={"ovseg": ["model_zoo.json", "model_configs/*.json", "configs/**/*.yaml", "data/class_lists/**/*.json",
                            "data/class_lists/**/*.txt", "data/class_lists/**/*.md"]},
    install_requires=[
        "open_clip_torch>=3.0,<4",  # tested: 3.0.0, 3.3.0
        "timm>=1.0.17,<1.1",  # open_clip builds EVA02 towers through timm; tested: 1.0.17, 1.0.29, 1.0.31
        "numpy>=1.24,<3",  # tested: 1.26 (suite), 2.x (ground-truth loading)
        "scipy",
        "tqdm",
        "fvcore",
        "pycocotools",
        "opencv-python-headless",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "ruff"],
        # ovseg.export: the ONNX writer (torch's dynamo exporter needs onnxscript) and the runtime the tests compare
        # against; tested: onnx 1.23.2, onnxruntime 1.32.0, onnxscript 0.7.2
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3"],
    },
)
