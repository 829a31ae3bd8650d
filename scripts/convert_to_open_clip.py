#!/usr/bin/env python
r"""Write a plain open_clip state dict from any checkpoint layout ovseg reads.

    # export the refined CLIP of a CLIPSelf run (refined visual tower + original text tower)
    python scripts/convert_to_open_clip.py --model-name EVA02-B-16 \
        --input output/clipself_eva02_b16_coco_patches/model_final.pth --output clipself_eva02_b16.pt
    # import an official EVA-CLIP / CLIPSelf release (EVA-CLIP key layout)
    python scripts/convert_to_open_clip.py --model-name EVA02-B-16 --input eva_vitb16_coco_clipself_patches.pt \
        --output clipself_eva02_b16_official.pt

The output loads with open_clip itself (`open_clip.create_model(name, pretrained=output)`) and as ovseg's
MODEL.CLIP.PRETRAINED. Unknown, missing or unmatched keys are errors. A --input that holds more than tensors (a
pickle that could run code) is refused unless --trust-pickled-weights is given; the output is always a plain
state dict, loadable without that trust.
"""
import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ovseg.modeling.clip_model import load_open_clip  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", required=True, help="open_clip architecture, e.g. EVA02-B-16, ViT-B-16")
    parser.add_argument("--input", required=True, help="checkpoint: ovseg training, EVA-CLIP/CLIPSelf, open_clip")
    parser.add_argument("--output", required=True, help="where to write the open_clip state dict")
    parser.add_argument("--trust-pickled-weights", action="store_true",
                        help="let --input unpickle Python objects beyond tensors (or be a TorchScript archive): such "
                             "a file can run code, so only for files from a source you trust")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):  # before the model is built, named as the user wrote it
        parser.error(f"--input {args.input}: no such file")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    model = load_open_clip(args.model_name, args.input, args.trust_pickled_weights, what="--input")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(model.state_dict(), args.output)
    print(f"wrote {args.output} ({len(model.state_dict())} tensors of {args.model_name})")
    return 0


if __name__ == "__main__":
    from ovseg.engine import run_command

    # unmatched keys, a pickle refused without --trust-pickled-weights: one line
    run_command(main, user_errors=(ValueError,))
