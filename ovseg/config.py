"""Every config key ovseg adds to detectron2's defaults, with its default and what it means."""
from detectron2.config import CfgNode as CN

# CLIP's preprocessing constants on the 0-255 scale (images are fed as RGB).
CLIP_PIXEL_MEAN = [122.7709383, 116.7460125, 104.09373615]
CLIP_PIXEL_STD = [68.5005327, 66.6321579, 70.32316305]


def add_ovseg_config(cfg: CN) -> CN:
    """Add ovseg's keys to a detectron2 config (in place) and return it."""
    cfg.MODEL.CLIP = CN()
    # open_clip architecture name (ViT-B-16, ViT-L-14, ViT-L-14-336, EVA02-B-16, EVA02-L-14-336, ...).
    cfg.MODEL.CLIP.MODEL_NAME = "ViT-B-16"
    # open_clip pretrained tag (e.g. "openai", downloaded on first use) or a local checkpoint path
    # (open_clip state dict or one exported by ovseg). "" = random initialisation (smoke tests only).
    cfg.MODEL.CLIP.PRETRAINED = "openai"
    # How the last ViT block builds the dense map `clip_dense`:
    #   "value": no token mixing, value path + residual + MLP (MaskCLIP / CLIPSelf);
    #   "attention": the stock block, i.e. exactly what open_clip computes;
    #   "sclip": SCLIP correlative attention softmax(qq^T)+softmax(kk^T), residual + MLP kept;
    #   "clearclip": ClearCLIP q-q attention, residual and MLP of the last block dropped;
    #   "naclip": NACLIP k-k attention + Gaussian neighbourhood bias, residual and MLP dropped.
    cfg.MODEL.CLIP.DENSE_MODE = "value"
    # Std. deviation (in patches) of NACLIP's Gaussian neighbourhood bias; 5 in the NACLIP paper and code.
    cfg.MODEL.CLIP.NACLIP_SIGMA = 5.0
    # 0-based indices of the blocks whose outputs are exported as res2, res3, ... (all at the patch stride).
    # Empty: four evenly spaced blocks ending with the second-to-last one.
    cfg.MODEL.CLIP.FEATURE_BLOCKS = []
    # Number of final transformer blocks left trainable (CLIPSelf trains them); 0 = fully frozen.
    cfg.MODEL.CLIP.UNLOCK_LAST_BLOCKS = 0

    cfg.MODEL.TEXT = CN()
    # Prompt templates: "imagenet" (CLIP's 80 ImageNet prompts), "simple" (open_clip's short set of 7)
    # or "single" ("a photo of a {}.").
    cfg.MODEL.TEXT.TEMPLATES = "imagenet"
    # Test vocabulary: "" = the test dataset's classes; else "cat,sofa|couch" or a text file (one class a line,
    # synonyms separated by "|").
    cfg.MODEL.TEXT.VOCABULARY = ""
    # Prompts encoded per text-encoder forward (bounds memory for 847 classes x 80 templates).
    cfg.MODEL.TEXT.BATCH_SIZE = 1024

    cfg.MODEL.DENSE_SEG = CN()
    # Multiplier of the cosine similarities before the softmax over classes (CLIP's learned scale is 100).
    cfg.MODEL.DENSE_SEG.LOGIT_SCALE = 100.0
    # "whole": one forward over the (resized) image; "slide": overlapping windows, logits averaged on the patch
    # grid. The test-time short side is INPUT.MIN_SIZE_TEST (long side capped by INPUT.MAX_SIZE_TEST).
    cfg.MODEL.DENSE_SEG.INFERENCE_MODE = "whole"
    # Sliding-window geometry in input pixels (rounded down to multiples of the patch size, so that windows
    # share one patch grid and their logits add up at feature resolution).
    cfg.MODEL.DENSE_SEG.WINDOW_SIZE = 448
    cfg.MODEL.DENSE_SEG.WINDOW_STRIDE = 224
    # Windows encoded per backbone forward (speed vs memory; results do not depend on it).
    cfg.MODEL.DENSE_SEG.WINDOW_BATCH_SIZE = 4
    # Background rule (VOC-21, PC-60, COCO-Object): pixels whose highest class probability is below this go to
    # the class named BACKGROUND_CLASS. 0 = off.
    cfg.MODEL.DENSE_SEG.BG_THRESHOLD = 0.0
    cfg.MODEL.DENSE_SEG.BACKGROUND_CLASS = "background"
    # PAMR refinement of the logits (Araslanov & Roth 2020): iterations (0 = off) and neighbour dilations
    # (pixels; the PAMR paper's set; the SCLIP/NACLIP presets use [8, 16]).
    cfg.MODEL.DENSE_SEG.PAMR_ITERS = 0
    cfg.MODEL.DENSE_SEG.PAMR_DILATIONS = [1, 2, 4, 8, 12, 24]

    cfg.MODEL.PIXEL_MEAN = list(CLIP_PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(CLIP_PIXEL_STD)
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def get_ovseg_cfg() -> CN:
    """detectron2's default config extended with ovseg's keys."""
    from detectron2.config import get_cfg

    return add_ovseg_config(get_cfg())
