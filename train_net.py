#!/usr/bin/env python
"""Train and evaluate ovseg models (detectron2 engine; multi-GPU / multi-machine through `launch`).

    python train_net.py --config-file configs/ade_clipself.yaml --num-gpus 4
    python train_net.py --config-file configs/clip_dense_vitb16.yaml --eval-only \
        DATASETS.TEST "('ade20k_150_sem_seg_val',)"
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth

The engine lives in `ovseg.engine`; this script is its command line.
"""
from ovseg.engine import run

if __name__ == "__main__":
    run()
