"""Tiny CLIP architectures for tests and smoke runs: real open_clip models that build in milliseconds.

`ovseg-tiny-ViT-16` is an open_clip VisionTransformer; `ovseg-tiny-EVA02-16` is an EVA02 tower built by timm
(as open_clip builds EVA02-B-16), registered here under a timm name of its own.

Nothing is registered on import: `register_tiny_models()` adds them to open_clip's (and timm's) lists when asked,
as tests/conftest.py does, and `load_open_clip` does when given one of `TINY_MODELS` by name.
"""
import inspect
from pathlib import Path

import open_clip
import timm
from timm.models import register_model

TINY_VIT = "ovseg-tiny-ViT-16"
TINY_EVA = "ovseg-tiny-EVA02-16"
TINY_MODELS = (TINY_VIT, TINY_EVA)
_CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"


def _tiny_eva02(pretrained: bool = False, **kwargs):
    # Same block design as timm's eva02_base_patch16_clip_224 (SwiGLU MLP, inner attention norm, RoPE),
    # at toy width/depth.
    from timm.models.eva import Eva

    args = dict(
        img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, qkv_fused=False, mlp_ratio=4 * 2 / 3,
        swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
    )
    # timm's factory also passes pretrained_cfg, cache_dir, ...: keep what Eva takes (num_classes, global_pool)
    accepted = inspect.signature(Eva.__init__).parameters
    args.update({k: v for k, v in kwargs.items() if k in accepted})
    return Eva(**args)


def register_tiny_models() -> None:
    """Make the tiny configs known to open_clip (and the tiny EVA02 trunk to timm). Idempotent."""
    if "ovseg_eva02_tiny_patch16_64" not in timm.list_models("ovseg_*"):
        _tiny_eva02.__name__ = "ovseg_eva02_tiny_patch16_64"
        register_model(_tiny_eva02)
    if TINY_VIT not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)
