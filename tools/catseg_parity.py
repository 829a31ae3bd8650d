"""Parity of ovseg's CAT-Seg head with the authors' code, through the checkpoint converter.

Builds the authors' `Aggregator` (github.com/KU-CVLAB/CAT-Seg, cat_seg/modeling/transformer/model.py) with random
weights, saves its state dict under the key prefix of their checkpoints, converts it with
`ovseg.modeling.checkpoint_layouts.convert_catseg_state_dict`, loads it (strict) into ovseg's `CostAggregator` and
compares the logits of both on the same inputs. Not a test: it runs the authors' code, which the suite never needs.

    pip install --target /tmp/pkgs einops      # their model.py imports einops (and timm)
    PYTHONPATH=/tmp/pkgs python tools/catseg_parity.py /path/to/CAT-Seg   # a checkout or a bare git dir

Prints one row per setting and the max |difference| of the logits; exits 1 when one exceeds --tol.

End to end (`--end-to-end`): the authors' whole `CATSeg` (cat_seg/cat_seg_model.py) built by their config system
from their configs/vitb_384.yaml with eval.sh's test settings (TEST.SLIDING_WINDOW True, POOLING_SIZES [1, 1]): their
CLIP (cat_seg/third_party/model_vpt.py: separate q / k / v weights, dense last block, positional-embedding resize),
their tokenizer, template and first-synonym text path, upsample1 / upsample2, sliding windows plus global view. The
CLIP is a random ViT-B/16 in OpenAI's layout given to their own `build_model` (their `clip.load` would download);
their `.cuda()` calls are no-ops on CPU. Their state dict is saved as a checkpoint and loaded into our
CATSegSegmentor through MODEL.WEIGHTS (SafeCheckpointer + `convert_catseg_state_dict`) from
configs/catseg/catseg_vitb16_authors.yaml, tested on ADE-150 with its default vocabulary (MODEL.TEXT.
DATASET_VOCABULARIES: their datasets/ade150.json names). Compared, so a mismatch is localised: the text embeddings,
the dense CLIP embeddings, the two guidance blocks' tokens, the upsampled guidance, the head's logits on the same
views, and `sem_seg` of two whole images (mapper-sized 640x853 and 853x640, resized to their original size).
Needs their imports (einops, ftfy, regex) and ~15 min of CPU; `--tol` is then relative to max(1, max |theirs|).

    PYTHONPATH=/tmp/pkgs python tools/catseg_parity.py /path/to/CAT-Seg --end-to-end

Result (CAT-Seg 6d3a188, ViT-B/16 random weights, 150 ADE classes, fp32 CPU), max |theirs - ours|:
text embeddings 1.6e-07; dense CLIP embeddings 3.3e-06; block 3 / 7 tokens 3.3e-06 / 5.7e-06; guidance x2 / x4
1.0e-05 / 1.6e-05; logits 3.6e-06; sem_seg probabilities 5.4e-07 / 4.5e-07: float rounding only (argmax agrees
on 99.94% of pixels; where not, their scores of the two winners are within 1.2e-07: ties of random weights).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ovseg.modeling.checkpoint_layouts import CATSEG_AGGREGATOR, convert_catseg_state_dict
from ovseg.modeling.cost_aggregation import CostAggregator, shift_window_mask

MODEL_PY = "cat_seg/modeling/transformer/model.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_authors_repo(repo: str) -> None:
    """One clear error when `repo` holds no CAT-Seg: neither a checkout nor a git dir whose HEAD has their model."""
    if os.path.exists(os.path.join(repo, MODEL_PY)):
        return
    got = subprocess.run(["git", "--git-dir", repo, "cat-file", "-e", f"HEAD:{MODEL_PY}"], capture_output=True)
    if got.returncode:
        raise FileNotFoundError(f"{repo}: neither a CAT-Seg checkout (no {MODEL_PY}) nor a git dir whose HEAD holds "
                                "it (git clone https://github.com/KU-CVLAB/CAT-Seg)")


def load_authors_module(repo: str):
    """Their model.py as a module, read from a checkout or (a bare mirror) from git's HEAD."""
    check_authors_repo(repo)
    path = os.path.join(repo, MODEL_PY)
    if not os.path.exists(path):
        src = subprocess.run(["git", "--git-dir", repo, "show", f"HEAD:{MODEL_PY}"], check=True,
                             capture_output=True, text=True).stdout
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



# ---- end to end: the authors' whole CATSeg model vs our CATSegSegmentor ---------------------------------------------
VITB_CONFIG = "configs/vitb_384.yaml"
OUR_CONFIG = "configs/catseg/catseg_vitb16_authors.yaml"


def authors_checkout(repo: str) -> str:
    """A directory holding their `cat_seg` package: `repo` itself, or (a bare mirror) HEAD extracted to a temp dir."""
    if os.path.isdir(os.path.join(repo, "cat_seg")):
        return repo
    check_authors_repo(repo)
    out = tempfile.mkdtemp(prefix="catseg_checkout_")
    archive = subprocess.run(["git", "--git-dir", repo, "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return out


def random_openai_clip_state(seed: int) -> Dict[str, torch.Tensor]:
    """A random ViT-B/16 CLIP in OpenAI's checkpoint layout (what their `clip.load` reads from a JIT archive):
    open_clip's initialisation plus noise on every tensor (zero biases and unit norms would hide a mix-up);
    positional embedding of the 224-px tower (14 x 14 + 1), so the 384-px input exercises the resize."""
    import open_clip

    torch.manual_seed(seed)
    state = open_clip.create_model("ViT-B-16-quickgelu").state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(state["token_embedding.weight"].shape[0]))
    return state


@contextlib.contextmanager
def authors_on_cpu(clip_state: Dict[str, torch.Tensor]):
    """Run their code here: their predictor calls `.cuda()` unconditionally (made a no-op) and `clip.load` downloads
    OpenAI's weights (replaced by their own `build_model` on `clip_state`); `convert_weights` (fp16 casts, undone
    by their `.float()` right after) is skipped, so building on CPU is not slowed by fp16 matmuls."""
    from cat_seg.third_party import clip as their_clip
    from cat_seg.third_party import model_vpt

    saved = torch.Tensor.cuda, their_clip.load, model_vpt.convert_weights

    def load(name, device="cpu", jit=False, prompt_depth=0, prompt_length=0):
        if name != "ViT-B/16":
            raise ValueError(f"end-to-end parity builds a random ViT-B/16, not {name}")
        return model_vpt.build_model(dict(clip_state), prompt_depth, prompt_length), None

    torch.Tensor.cuda = lambda self, *a, **k: self
    their_clip.load, model_vpt.convert_weights = load, lambda model: None
    try:
        yield
    finally:
        torch.Tensor.cuda, their_clip.load, model_vpt.convert_weights = saved


def build_authors_model(root: str, class_json: str, train_json: str, clip_state: Dict[str, torch.Tensor],
                        seed: int) -> torch.nn.Module:
    """Their CATSeg from their configs/vitb_384.yaml with eval.sh's test settings, random weights (CLIP:
    `clip_state`); to be called inside `authors_on_cpu(clip_state)`."""
    from cat_seg import add_cat_seg_config
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_cat_seg_config(cfg)
    cfg.merge_from_file(os.path.join(root, VITB_CONFIG))
    cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", class_json,
                         "MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON", train_json,
                         "TEST.SLIDING_WINDOW", True, "MODEL.SEM_SEG_HEAD.POOLING_SIZES", [1, 1],
                         "MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    clip_model = model.sem_seg_head.predictor.clip_model
    # their build_model loads non-strictly: check that every CLIP tensor came from the state dict
    loaded = clip_model.state_dict()
    for key, value in clip_state.items():
        m = re.match(r"^(.*\.attn\.)in_proj_weight$", key)
        parts = [(m[1] + f"{n}_proj_weight", c) for n, c in zip("qkv", value.chunk(3))] if m else [(key, value)]
        for k, v in parts:
            if k in loaded and not torch.equal(loaded[k], v):
                raise RuntimeError(f"their CLIP did not load {k}")
    missing = [k for k in loaded if k not in clip_state and not re.search(r"\.attn\.[qkv]_proj_weight$", k)]
    if missing:
        raise RuntimeError(f"their CLIP has tensors the random state dict lacks: {missing[:5]}")
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # the aggregator and upsampling convs: zero-initialised tensors would hide their role
        for name, p in model.named_parameters():
            if ".clip_model." not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def build_our_model(weights: str, vocabulary_file: str) -> torch.nn.Module:
    """Our CATSegSegmentor from catseg_vitb16_authors.yaml, MODEL.WEIGHTS = the authors' checkpoint (converted on
    load by SafeCheckpointer, strictly). Vocabulary: `vocabulary_file`, or "" = the config's own for ADE-150."""
    from detectron2.modeling import build_model

    from ovseg.config import get_ovseg_cfg
    from ovseg.engine.trainer import load_eval_weights

    cfg = get_ovseg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, OUR_CONFIG))
    cfg.merge_from_list(["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "()",
                         "DATASETS.TEST", "('ade20k_150_sem_seg_val',)", "MODEL.TEXT.VOCABULARY", vocabulary_file])
    model = build_model(cfg).eval()
    load_eval_weights(cfg, model)
    return model


def json_to_vocabulary_file(class_json: str, path: str) -> None:
    """Their class list (one entry a class, synonyms joined by ", ") as our vocabulary file (synonyms joined by |)."""
    with open(class_json) as f:
        entries = json.load(f)
    with open(path, "w") as f:
        f.write("# " + class_json + "\n")
        for e in entries:
            names = [n.strip() for n in e.split(", ")]
            if any("," in n or "|" in n or "#" in n for n in names):
                raise ValueError(f"class {e!r} of {class_json} does not convert to one vocabulary line")
            f.write("|".join(names) + "\n")


def synthetic_image(h: int, w: int, seed: int) -> torch.Tensor:
    """(3, h, w) float 0..255: smooth blobs plus pixel noise (a DatasetMapper's output, RGB)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 8, generator=g)
    img = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    return (255 * (0.8 * img + 0.2 * torch.rand(3, h, w, generator=g))).clamp(0, 255)


def _absmax(a: torch.Tensor, b: torch.Tensor, what: str) -> Tuple[float, float]:
    if a.shape != b.shape:
        raise RuntimeError(f"{what}: shapes differ, theirs {tuple(a.shape)} vs ours {tuple(b.shape)}")
    return (a - b).abs().max().item(), a.abs().max().item()


def end_to_end(repo: str, class_json: str, images: Sequence[Tuple[int, int, int, int]], seed: int = 0) -> List[dict]:
    """Rows (stage, max |theirs - ours|, max |theirs|) for their CATSeg vs our CATSegSegmentor on the same weights."""
    root = authors_checkout(repo)
    sys.path.insert(0, root)
    import cat_seg  # noqa: F401  (registers their CATSeg meta-architecture and head)

    work = tempfile.mkdtemp(prefix="catseg_e2e_")
    vocab = ""  # ADE-150: our config's own vocabulary for it
    if class_json:
        vocab = os.path.join(work, "vocabulary.txt")
        json_to_vocabulary_file(class_json, vocab)
    class_json = class_json or os.path.join(root, "datasets/ade150.json")
    train_json = os.path.join(work, "train_classes.json")  # their predictor embeds it at build time: keep it short
    with open(train_json, "w") as f:
        json.dump(["wall", "sky"], f)
    clip_state = random_openai_clip_state(seed)
    with authors_on_cpu(clip_state):
        return _end_to_end(root, class_json, train_json, clip_state, work, vocab, images, seed)


def _end_to_end(root, class_json, train_json, clip_state, work, vocab, images, seed) -> List[dict]:
    theirs = build_authors_model(root, class_json, train_json, clip_state, seed)
    weights = os.path.join(work, "catseg_random.pth")
    torch.save({"model": theirs.state_dict()}, weights)  # their checkpoints' layout (model_final.pth)
    ours = build_our_model(weights, vocab)

    rows = []

    def row(stage: str, a: torch.Tensor, b: torch.Tensor) -> None:
        diff, ref = _absmax(a, b, stage)
        rows.append({"stage": stage, "shape": list(a.shape), "max_abs_theirs": ref, "max_abs_diff": diff})
        print(f"  {stage}: max|diff| {diff:.2e} (max|theirs| {ref:.3g})", flush=True)

    pred = theirs.sem_seg_head.predictor
    with torch.no_grad():
        # 1. text: their get_text_embeds (first synonym, their template and tokenizer) vs ours
        t_text = pred.get_text_embeds(pred.test_class_texts, pred.prompt_templates, pred.clip_model)  # (T, 1, D)
        o_text = ours.class_embeddings(ours.vocabulary)  # (T, P, D)
        row("text embeddings (T, P, D)", t_text, o_text)

        # 2. CLIP on the same normalised 384-px views: dense embeddings, guidance blocks, upsampled guidance
        g = torch.Generator().manual_seed(seed + 3)
        views = torch.stack([synthetic_image(384, 384, seed + 10 + i) for i in range(2)])
        views = (views - theirs.clip_pixel_mean) / theirs.clip_pixel_std + 0.1 * torch.randn(views.shape, generator=g)
        theirs.layers = []
        t_dense = pred.clip_model.encode_image(views, dense=True)  # (N, 1 + 576, D)
        t_blocks = [theirs.layers[i][1:].permute(1, 2, 0).reshape(len(views), -1, 24, 24) for i in range(2)]
        feats, last, ctx = ours.backbone.forward_tokens(views)
        o_dense = ours.backbone.head(last)  # (N, 1 + 576, D)
        row("CLIP dense embeddings (N, 1+hw, D)", t_dense, o_dense)
        for i, name in enumerate(("res2", "res3")):
            row(f"CLIP block {ours.backbone.feature_blocks[i]} tokens (N, C, h, w)", t_blocks[i], feats[name])
        o_emb, o_guid = ours.encode(views)
        t_guid = [theirs.upsample1(t_blocks[0]), theirs.upsample2(t_blocks[1])]
        for i in range(2):
            row(f"decoder guidance x{2 ** (i + 1)} (N, C, {2 ** (i + 1)}h, {2 ** (i + 1)}w)", t_guid[i], o_guid[i])

        # 3. the head on those views: logits on the 4x grid
        features = {"res5": t_guid[1], "res4": t_guid[0], "res3": t_dense[:, 1:].transpose(1, 2).reshape(o_emb.shape)}
        t_logits = theirs.sem_seg_head(t_dense, features)
        row("logits (N, T, 4h, 4w)", t_logits, ours.logits(views, o_text))

        # 4. the whole test path: sliding windows + global view, sigmoid, resized to the original size
        for i, (h, w, oh, ow) in enumerate(images):
            inp = {"image": synthetic_image(h, w, seed + 20 + i), "height": oh, "width": ow}
            t_out = theirs([inp])[0]["sem_seg"]
            o_out = ours([inp])[0]["sem_seg"]
            row(f"sem_seg {h}x{w} -> {oh}x{ow} (T, H, W)", t_out, o_out)
            t_arg, o_arg = t_out.argmax(0, keepdim=True), o_out.argmax(0, keepdim=True)
            rows[-1]["argmax_agreement"] = (t_arg == o_arg).float().mean().item()
            # where the argmax differs: how far apart their scores of the two winners are (ties of random weights)
            gap = t_out.gather(0, t_arg) - t_out.gather(0, o_arg)
            rows[-1]["argmax_differs_max_gap"] = gap.max().item()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("repo", help="the authors' CAT-Seg repository (checkout or bare git dir)")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="head mode: max |logit difference|; end to end: max |difference| / max(1, max |theirs|)")
    parser.add_argument("--json", default="", help="also write the rows here")
    parser.add_argument("--end-to-end", action="store_true",
                        help="the authors' whole CATSeg (their CLIP, text path, sliding window) vs our CATSegSegmentor")
    parser.add_argument("--class-json", default="",
                        help="end to end: their class list, given to both (default: ADE-150, ours its config's list)")
    args = parser.parse_args(argv)
    with torch.no_grad():  # nothing global changed, also when their code is missing (one error line)
        if args.end_to_end:
            # (mapper output h, w, original height, width): landscape and portrait ADE-like images
            rows = end_to_end(args.repo, args.class_json, [(640, 853, 480, 640), (853, 640, 640, 480)])
            print("| stage | shape | max |theirs| | max |diff| | argmax agreement (max score gap where it differs) |")
            print("|---|---|---|---|---|")
            for r in rows:
                agree = (f"{r['argmax_agreement']:.4f} ({r['argmax_differs_max_gap']:.1e})" if "argmax_agreement" in r
                         else "")
                print(f"| {r['stage']} | {r['shape']} | {r['max_abs_theirs']:.3g} | {r['max_abs_diff']:.2e} | "
                      f"{agree} |")
            failed = any(r["max_abs_diff"] > args.tol * max(1.0, r["max_abs_theirs"]) for r in rows)
        else:
            authors = load_authors_module(args.repo)
            # ViT-B/16 test protocol (pooling 1x1), training pooling, > pad_len classes, 80 prompts (ViT-L)
            settings = [
                dict(clip_dim=512, num_classes=150, pooling=(1, 1), num_prompts=1, num_layers=2),
                dict(clip_dim=512, num_classes=171, pooling=(2, 2), num_prompts=1, num_layers=2),
                dict(clip_dim=512, num_classes=300, pooling=(1, 1), num_prompts=1, num_layers=2, batch=1),
                dict(clip_dim=768, num_classes=20, pooling=(6, 6), num_prompts=4, num_layers=4),
            ]
            rows = [compare(authors, **s) for s in settings]
            print("| CLIP dim | classes | pooling | prompts | layers | keys | max |logit| | max |diff| |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['clip_dim']} | {r['classes']} | {r['pooling']} | {r['prompts']} | {r['layers']} | "
                      f"{r['keys']} | {r['logit_absmax']:.3g} | {r['max_abs_diff']:.2e} |")
            failed = any(r["max_abs_diff"] > args.tol for r in rows)
    print(json.dumps(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return int(failed)


if __name__ == "__main__":
    from ovseg.engine import run_command

    run_command(main)  # a path that holds no CAT-Seg: one line
