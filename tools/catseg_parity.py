"""Parity of ovseg's CAT-Seg head with the authors' code, through the checkpoint converter.

Builds the authors' `Aggregator` (github.com/KU-CVLAB/CAT-Seg, cat_seg/modeling/transformer/model.py) with random
weights, saves its state dict under the key prefix of their checkpoints, converts it with
`ovseg.modeling.checkpoint_layouts.convert_catseg_state_dict`, loads it (strict) into ovseg's `CostAggregator` and
compares the logits of both on the same inputs. Not a test: it runs the authors' code, which the suite never needs.

    pip install --target /tmp/pkgs einops      # their model.py imports einops (and timm)
    PYTHONPATH=/tmp/pkgs python tools/catseg_parity.py /path/to/CAT-Seg   # a checkout or a bare git dir

Prints one row per setting and the max |difference| of the logits; exits 1 when one exceeds --tol.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import tempfile

import torch

from ovseg.modeling.checkpoint_layouts import CATSEG_AGGREGATOR, convert_catseg_state_dict
from ovseg.modeling.cost_aggregation import CostAggregator, shift_window_mask

MODEL_PY = "cat_seg/modeling/transformer/model.py"


def load_authors_module(repo: str):
    """Their model.py as a module, read from a checkout or (a bare mirror) from git's HEAD."""
    path = os.path.join(repo, MODEL_PY)
    if not os.path.exists(path):
        got = subprocess.run(["git", "--git-dir", repo, "show", f"HEAD:{MODEL_PY}"], capture_output=True, text=True)
        if got.returncode:
            raise FileNotFoundError(f"{repo}: neither a CAT-Seg checkout (no {MODEL_PY}) nor a git dir whose HEAD "
                                    "holds it (git clone https://github.com/KU-CVLAB/CAT-Seg)")
        src = got.stdout
        path = os.path.join(tempfile.mkdtemp(prefix="catseg_parity_"), "catseg_authors_model.py")
        with open(path, "w") as f:
            f.write(src)
    spec = importlib.util.spec_from_file_location("catseg_authors_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(authors, *, clip_dim: int, num_classes: int, pooling, num_prompts: int, num_layers: int,
            grid: int = 24, window: int = 12, pad_len: int = 256, batch: int = 2, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    dec_g = (256, 128)
    theirs = authors.Aggregator(
        text_guidance_dim=clip_dim, text_guidance_proj_dim=128, appearance_guidance_dim=clip_dim,
        appearance_guidance_proj_dim=128, decoder_dims=(64, 32), decoder_guidance_dims=dec_g,
        decoder_guidance_proj_dims=(32, 16), num_layers=num_layers, nheads=4, hidden_dim=128, pooling_size=pooling,
        feature_resolution=(grid, grid), window_size=window, attention_type="linear", prompt_channel=num_prompts,
        pad_len=pad_len).eval()
    with torch.no_grad():  # zero-initialised padding tokens and biases would hide their role
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = CostAggregator(
        text_dim=clip_dim, appearance_dim=clip_dim, text_guidance_proj_dim=128, appearance_guidance_proj_dim=128,
        decoder_dims=(64, 32), decoder_guidance_dims=dec_g, decoder_guidance_proj_dims=(32, 16),
        num_layers=num_layers, num_heads=4, hidden_dim=128, pooling_size=pooling, window_size=window,
        attention_type="linear", num_prompts=num_prompts, pad_len=pad_len, test_pooling_size=pooling).eval()
    state = {CATSEG_AGGREGATOR + k: v for k, v in theirs.state_dict().items()}
    target = {"head." + k for k in ours.state_dict()}
    mask = shift_window_mask((grid, grid), window, window // 2) if window < grid else None
    converted = convert_catseg_state_dict(state, target, mask)
    ours.load_state_dict({k[len("head."):]: v for k, v in converted.items()}, strict=True)

    g = torch.Generator().manual_seed(seed + 1)
    image = torch.randn(batch, clip_dim, grid, grid, generator=g)
    text = torch.randn(batch, num_classes, num_prompts, clip_dim, generator=g)
    guidance = [torch.randn(batch, dec_g[0], 2 * grid, 2 * grid, generator=g),
                torch.randn(batch, dec_g[1], 4 * grid, 4 * grid, generator=g)]
    with torch.no_grad():
        a = theirs(image, text, [image, *guidance])
        b = ours(image, text, image, guidance)
    diff = (a - b).abs().max().item()
    return {"clip_dim": clip_dim, "classes": num_classes, "pooling": list(pooling), "prompts": num_prompts,
            "layers": num_layers, "keys": len(state), "logit_absmax": a.abs().max().item(), "max_abs_diff": diff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("repo", help="the authors' CAT-Seg repository (checkout or bare git dir)")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest |logit difference| that passes")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args(argv)
    authors = load_authors_module(args.repo)
    torch.set_grad_enabled(False)
    settings = [  # ViT-B/16 test protocol (pooling 1x1), training pooling, > pad_len classes, 80 prompts (ViT-L)
        dict(clip_dim=512, num_classes=150, pooling=(1, 1), num_prompts=1, num_layers=2),
        dict(clip_dim=512, num_classes=171, pooling=(2, 2), num_prompts=1, num_layers=2),
        dict(clip_dim=512, num_classes=300, pooling=(1, 1), num_prompts=1, num_layers=2, batch=1),
        dict(clip_dim=768, num_classes=20, pooling=(6, 6), num_prompts=4, num_layers=4),
    ]
    rows = [compare(authors, **s) for s in settings]
    print("| CLIP dim | classes | pooling | prompts | layers | keys | max |logit| | max |diff| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clip_dim']} | {r['classes']} | {r['pooling']} | {r['prompts']} | {r['layers']} | {r['keys']} "
              f"| {r['logit_absmax']:.3g} | {r['max_abs_diff']:.2e} |")
    print(json.dumps(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return int(any(r["max_abs_diff"] > args.tol for r in rows))


if __name__ == "__main__":
    from ovseg.engine import run_command

    run_command(main)  # a path that holds no CAT-Seg: one line
