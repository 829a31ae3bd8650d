#!/usr/bin/env python
"""Open-vocabulary segmentation of images, videos or a webcam for any vocabulary.

    python demo/demo.py --vocab "cat,sofa|couch" --input img.jpg --output output/
    python demo/demo.py --vocab classes.txt --input 'photos/*.jpg' --output out_dir/
    python demo/demo.py --vocab "sky,grass,house" --input demo/examples/scene.jpg --random-init   # no weights
"""
import argparse
import glob
import os
import sys
import time

import cv2
import numpy as np
import torch
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor import OVSegPredictor  # noqa: E402

from ovseg.config import get_ovseg_cfg  # noqa: E402
from ovseg.modeling import WeightsUnavailableError  # noqa: E402
from ovseg.modeling.backbone import DENSE_MODES  # noqa: E402
from ovseg.modeling.text import parse_vocabulary  # noqa: E402

# NACLIP: the best training-free mode (see README); --dense-mode switches to another one
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "trainingfree",
                              "naclip_vitb16.yaml")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EXIT_NO_WEIGHTS = 3


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    p.add_argument("--vocab", required=True, help='classes: "cat,sofa|couch" (| joins synonyms) or a text file')
    p.add_argument("--input", nargs="+", help="image files, globs or folders")
    p.add_argument("--video-input", help="a video file")
    p.add_argument("--webcam", action="store_true", help="read frames from the first webcam")
    p.add_argument("--output", help="output file (one input) or folder; visualisations are written there")
    p.add_argument("--dense-mode", choices=DENSE_MODES, help="MODEL.CLIP.DENSE_MODE (default: the config's)")
    p.add_argument("--random-init", action="store_true",
                   help="random CLIP weights (MODEL.CLIP.PRETRAINED ''): runs the pipeline without any download")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p


def setup_cfg(args):
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if args.random_init:
        cfg.MODEL.CLIP.PRETRAINED = ""
    if args.dense_mode:
        cfg.MODEL.CLIP.DENSE_MODE = args.dense_mode
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def expand_inputs(specs):
    """Files, globs and folders -> sorted image paths; a spec matching nothing is an error."""
    paths = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTS))
        else:
            found = sorted(glob.glob(os.path.expanduser(spec))) or []
        if not found:
            raise FileNotFoundError(f"--input {spec!r}: no such file, or no images match")
        paths += found
    return paths


def output_path(output, path, many):
    if output is None:
        return None
    if many or output.endswith(os.sep) or os.path.isdir(output) or not os.path.splitext(output)[1]:
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.splitext(os.path.basename(path))[0] + ".png")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    return output


def load_image(path):
    try:
        return read_image(path, format="BGR")  # grayscale / RGBA / palette images become 3-channel
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ValueError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e


def run_images(predictor, paths, args, logger):
    for path in paths:
        image = load_image(path)
        start = time.perf_counter()
        predictions = predictor(image)
        elapsed = time.perf_counter() - start
        areas = ", ".join(f"{k} {100 * v:.1f}%" for k, v in predictor.class_areas(predictions).items())
        logger.info("%s: %dx%d in %.2fs | %s", path, image.shape[1], image.shape[0], elapsed, areas)
        vis = predictor.visualize(image, predictions)
        out = output_path(args.output, path, len(paths) > 1)
        if out:
            cv2.imwrite(out, vis[:, :, ::-1])
            logger.info("wrote %s", out)


def run_video(predictor, args, logger):
    cap = cv2.VideoCapture(0 if args.webcam else args.video_input)
    if not cap.isOpened():
        raise ValueError(f"cannot open {'the webcam' if args.webcam else repr(args.video_input)}")
    writer = None
    if args.output:
        out = output_path(args.output, args.video_input or "webcam.mp4", False)
        out = os.path.splitext(out)[0] + ".mp4"
        fps = cap.get(cv2.CAP_PROP_FPS) or 15.0
        size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    frames = 0
    start = time.perf_counter()
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            vis = predictor.visualize(frame, predictor(frame))[:, :, ::-1]
            frames += 1
            if writer is not None:
                writer.write(np.ascontiguousarray(vis))
            else:
                cv2.imshow("ovseg", vis)
                if cv2.waitKey(1) == 27:  # Esc
                    break
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    logger.info("%d frames, %.2f frames/s", frames, frames / max(time.perf_counter() - start, 1e-9))


def main(argv=None):
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="ovseg.demo")
    setup_logger(name="ovseg")
    if sum(bool(x) for x in (args.input, args.video_input, args.webcam)) != 1:
        get_parser().error("give exactly one of --input, --video-input, --webcam")
    # bad arguments are reported before the model (and its weights) load
    vocabulary = parse_vocabulary(args.vocab)
    paths = expand_inputs(args.input) if args.input else None
    cfg = setup_cfg(args)
    try:
        predictor = OVSegPredictor(cfg, vocabulary)
    except WeightsUnavailableError as e:
        logger.error("%s", e)
        return EXIT_NO_WEIGHTS
    logger.info("vocabulary (%d classes): %s", len(predictor.vocabulary), ", ".join(predictor.vocabulary.names))
    if paths:
        run_images(predictor, paths, args, logger)
    else:
        run_video(predictor, args, logger)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
