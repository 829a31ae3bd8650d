#!/usr/bin/env python
"""Open-vocabulary segmentation of images, videos or a webcam for any vocabulary.

    python demo/demo.py --vocab "cat,sofa|couch" --input img.jpg --output output/
    python demo/demo.py --vocab classes.txt --input 'photos/*.jpg' --output out_dir/
    python demo/demo.py --vocab "sky,grass,house" --input demo/examples/scene.jpg --random-init   # no weights

Model, resizing, vocabulary, precision and drawing are `ovseg.Predictor`'s; this script reads the inputs, plans
the outputs (checked before the model loads) and writes them.
"""
import argparse
import glob
import os
import re
import sys
import time

import cv2
import numpy as np
from detectron2.utils.logger import setup_logger

# the ovseg of this checkout, not another one installed in the environment
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ovseg import Predictor  # noqa: E402
from ovseg.data.image_io import IMAGE_SUFFIXES, read_image  # noqa: E402
from ovseg.modeling import WeightsUnavailableError  # noqa: E402
from ovseg.modeling.backbone import DENSE_MODES  # noqa: E402
from ovseg.modeling.text import parse_vocabulary  # noqa: E402
from ovseg.predictor import resolve_config  # noqa: E402
from ovseg.utils.precision import INFERENCE_DTYPES  # noqa: E402

# NACLIP: the best training-free mode (see README); --dense-mode switches to another one
DEFAULT_CONFIG = "naclip_vitb16"
IMAGE_EXTS = IMAGE_SUFFIXES
EXIT_NO_WEIGHTS = 3
EXIT_UNREADABLE_IMAGES = 4  # the readable images were segmented; some inputs were skipped


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE",
                   help="a yaml file or a shipped config's name (naclip_vitb16, naclip/ade20k, ...)")
    p.add_argument("--vocab", required=True, help='classes: "cat,sofa|couch" (| joins synonyms) or a text file')
    p.add_argument("--input", nargs="+", help="image files, globs or folders")
    p.add_argument("--video-input", help="a video file")
    p.add_argument("--webcam", action="store_true", help="read frames from the first webcam")
    p.add_argument("--output", help="output file (one input) or folder; visualisations are written there")
    p.add_argument("--dense-mode", choices=DENSE_MODES, help="MODEL.CLIP.DENSE_MODE (default: the config's)")
    p.add_argument("--dtype", choices=[*INFERENCE_DTYPES, "auto"],
                   help="MODEL.INFERENCE_DTYPE (default: the config's); auto = bf16 on CUDA GPUs that support it")
    p.add_argument("--random-init", action="store_true",
                   help="random CLIP weights (MODEL.CLIP.PRETRAINED ''): runs the pipeline without any download")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p


def config_overrides(args):
    """--opts, then the flags that are config keys (they win)."""
    opts = list(args.opts)
    if args.random_init:
        opts += ["MODEL.CLIP.PRETRAINED", ""]
    if args.dense_mode:
        opts += ["MODEL.CLIP.DENSE_MODE", args.dense_mode]
    if args.dtype:
        opts += ["MODEL.INFERENCE_DTYPE", args.dtype]
    return opts


def expand_inputs(specs):
    """Files, globs and folders -> sorted image paths (each once); a spec matching nothing is an error."""
    paths = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTS))
        else:
            found = sorted(glob.glob(os.path.expanduser(spec))) or []
        if not found:
            raise FileNotFoundError(f"--input {spec!r}: no such file, or no images match")
        paths += found
    return list(dict.fromkeys(paths))  # a file named twice (a folder and a glob) is segmented once


def _same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def _distinct_names(paths):
    """One output file name per input: the stem, or where stems collide (a.jpg + a.png, x/a.jpg + y/a.jpg) the
    path from the inputs' common folder with separators and the dot spelled out (x__a_jpg)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts = {s: stems.count(s) for s in stems}
    common = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    names = []
    for path, stem in zip(paths, stems):
        if counts[stem] > 1:
            rel = os.path.relpath(os.path.abspath(path), common)
            stem = rel.replace(os.sep, "__").replace(".", "_")
        names.append(stem)
    if len(set(names)) != len(names):
        raise ValueError(f"--input: cannot give these inputs distinct output names: {paths}")
    return names


def plan_image_outputs(output, paths):
    """Where each input's visualisation goes ({input: output path}, empty without --output), checked up front:
    outputs are distinct, never an input file, and never inside a folder the inputs come from."""
    if output is None:
        return {}
    is_file = len(paths) == 1 and not output.endswith(os.sep) and not os.path.isdir(output) and \
        bool(os.path.splitext(output)[1])
    if is_file:
        if not cv2.haveImageWriter(output):
            raise ValueError(f"--output {output!r}: OpenCV cannot write {os.path.splitext(output)[1]!r} images; "
                             "use .png or .jpg, or a folder")
        plan = {paths[0]: output}
    else:
        input_dirs = {os.path.realpath(os.path.dirname(os.path.abspath(p))) for p in paths}
        if os.path.realpath(output) in input_dirs:
            raise ValueError(f"--output {output!r} is a folder the input images come from; outputs there would "
                             "overwrite or mix with the inputs: choose another folder")
        plan = {p: os.path.join(output, name + ".png") for p, name in zip(paths, _distinct_names(paths))}
    for src, out in plan.items():
        if any(_same_file(out, p) for p in paths):
            raise ValueError(f"--output {out!r} (for {src!r}) is an input image: it would be overwritten")
    return plan


def write_image(out, vis_rgb):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if not cv2.imwrite(out, vis_rgb[:, :, ::-1]):
        raise ValueError(f"could not write {out!r}")


def load_image(path):
    try:
        return read_image(path, format="RGB")  # grayscale / RGBA / palette / 16-bit images become 3-channel 8-bit
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ValueError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e


def run_images(predictor, paths, plan, logger):
    """Segment every image; unreadable ones are skipped with a warning. Returns the paths that failed."""
    failed = []
    for path in paths:
        try:
            image = load_image(path)
        except ValueError as e:
            logger.warning("skipped: %s", e)
            failed.append(path)
            continue
        start = time.perf_counter()
        prediction = predictor(image)
        elapsed = time.perf_counter() - start
        areas = ", ".join(f"{k} {100 * v:.1f}%" for k, v in prediction.class_areas().items())
        logger.info("%s: %dx%d in %.2fs | %s", path, image.shape[1], image.shape[0], elapsed, areas)
        if path in plan:
            write_image(plan[path], prediction.visualize())
            logger.info("wrote %s", plan[path])
    return failed


def opencv_has_gui():
    """False for the headless OpenCV builds we install (cv2.imshow raises there)."""
    match = re.search(r"^\s*GUI:\s*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    return bool(match) and match.group(1).upper() != "NONE"


def plan_video_output(args):
    """Checks for --video-input / --webcam made before the model loads; returns the .mp4 to write, or None to
    show the frames in a window."""
    if args.video_input:
        if not os.path.isfile(args.video_input):
            raise FileNotFoundError(f"--video-input {args.video_input!r}: no such file")
        if args.video_input.lower().endswith(IMAGE_EXTS):
            raise ValueError(f"--video-input {args.video_input!r} is an image: use --input for images")
        cap = cv2.VideoCapture(args.video_input)
        readable = cap.isOpened() and cap.read()[0]
        cap.release()
        if not readable:
            raise ValueError(f"--video-input {args.video_input!r}: OpenCV reads no frame from it (not a video, "
                             "or a codec this OpenCV lacks)")
    if args.output is None:
        if not opencv_has_gui():
            raise ValueError(f"{'--webcam' if args.webcam else '--video-input'} without --output shows a window, "
                             "which this OpenCV build (headless) cannot: give --output out.mp4 (or a folder)")
        return None
    stem = os.path.splitext(os.path.basename(args.video_input))[0] if args.video_input else "webcam"
    is_folder = args.output.endswith(os.sep) or os.path.isdir(args.output) or not os.path.splitext(args.output)[1]
    out = os.path.join(args.output, stem + ".mp4") if is_folder else args.output
    if not out.lower().endswith(".mp4"):
        raise ValueError(f"--output {args.output!r}: videos are written as .mp4; give a .mp4 file or a folder")
    if args.video_input and _same_file(out, args.video_input):
        raise ValueError(f"--output {out!r} is the input video: it would be overwritten")
    return out


def run_video(predictor, args, out, logger):
    cap = cv2.VideoCapture(0 if args.webcam else args.video_input)
    if not cap.isOpened():
        raise ValueError(f"cannot open {'the webcam' if args.webcam else repr(args.video_input)}")
    writer = None
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fps = cap.get(cv2.CAP_PROP_FPS) or 15.0
        size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        if not writer.isOpened():
            raise ValueError(f"OpenCV cannot write the video {out!r}")
    frames = 0
    start = time.perf_counter()
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            vis = predictor(frame[:, :, ::-1]).visualize()[:, :, ::-1]  # OpenCV frames are BGR
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
    if frames == 0:
        raise ValueError(f"no frame read from {'the webcam' if args.webcam else repr(args.video_input)}")
    logger.info("%d frames, %.2f frames/s%s", frames, frames / max(time.perf_counter() - start, 1e-9),
                f"; wrote {out}" if out else "")


def main(argv=None):
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="ovseg.demo")
    setup_logger(name="ovseg")
    if sum(bool(x) for x in (args.input, args.video_input, args.webcam)) != 1:
        get_parser().error("give exactly one of --input, --video-input, --webcam")
    # bad arguments are reported before the model (and its weights) load
    vocabulary = parse_vocabulary(args.vocab)
    paths = expand_inputs(args.input) if args.input else None
    plan = plan_image_outputs(args.output, paths) if paths else None
    if paths and args.output is None:
        logger.info("no --output given: class areas are printed, no image is written")
    video_out = None if paths else plan_video_output(args)
    config = resolve_config(args.config_file)
    try:
        predictor = Predictor(config, opts=config_overrides(args), vocabulary=vocabulary)
    except WeightsUnavailableError as e:
        logger.error("%s", e)
        return EXIT_NO_WEIGHTS
    logger.info("vocabulary: %s", predictor.vocabulary.summary())
    if not paths:
        run_video(predictor, args, video_out, logger)
        return 0
    failed = run_images(predictor, paths, plan, logger)
    if failed:
        logger.error("%d of %d images could not be read (skipped): %s", len(failed), len(paths), ", ".join(failed))
        return EXIT_UNREADABLE_IMAGES
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
