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
    # "whole": one forward over the (resized) image; "slide": overlapping windows, logits averaged.
    cfg.MODEL.DENSE_SEG.INFERENCE_MODE = "whole"
    # Sliding-window geometry in input pixels (rounded down to multiples of the patch size).
    cfg.MODEL.DENSE_SEG.WINDOW_SIZE = 448
    cfg.MODEL.DENSE_SEG.WINDOW_STRIDE = 224
    # Background rule (VOC-21, PC-60, COCO-Object): pixels whose highest class probability is below this go to
    # the class named BACKGROUND_CLASS. 0 = off.
    cfg.MODEL.DENSE_SEG.BG_THRESHOLD = 0.0
    cfg.MODEL.DENSE_SEG.BACKGROUND_CLASS = "background"
    # PAMR refinement of the logits (Araslanov & Roth 2020): iterations (0 = off) and neighbour dilations.
    cfg.MODEL.DENSE_SEG.PAMR_ITERS = 0
    cfg.MODEL.DENSE_SEG.PAMR_DILATIONS = [1, 2, 4, 8, 12, 24]

    add_clipself_config(cfg)

    cfg.MODEL.PIXEL_MEAN = list(CLIP_PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(CLIP_PIXEL_STD)
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def add_clipself_config(cfg: CN) -> CN:
    """CLIPSelf self-distillation (`CLIPSelfDistiller`), its data, and the region-recognition evaluation.
    Defaults follow the authors' code (github.com/wusize/CLIPSelf, src/training/params.py and
    scripts/train_clipself_coco_*_eva_vitb16.sh)."""
    cfg.MODEL.CLIPSELF = CN()
    # Multiplier of the distillation loss 1 - cos(student region feature, teacher crop embedding).
    cfg.MODEL.CLIPSELF.LOSS_WEIGHT = 1.0

    # Training data of the distiller (mapper "clipself"); sizes in pixels of the original image.
    cfg.INPUT.CLIPSELF = CN()
    # "patches": cells of a random m x n grid; "proposals": boxes read from PROPOSAL_FILE.
    cfg.INPUT.CLIPSELF.REGION_SOURCE = "patches"
    # Largest m and n of the random grid (authors: --max-split 6).
    cfg.INPUT.CLIPSELF.GRID_MAX_SPLIT = 6
    # Largest max(m, n) / min(m, n) of the grid (authors: n in [ceil(m/2), 2m], i.e. 2).
    cfg.INPUT.CLIPSELF.GRID_MAX_ASPECT = 2.0
    # Regions per image, drawn at random when there are more (authors: --max-boxes 20).
    cfg.INPUT.CLIPSELF.MAX_REGIONS = 20
    # COCO-style JSON whose "annotations" are the proposals ({"image_id", "bbox": [x, y, w, h]}).
    cfg.INPUT.CLIPSELF.PROPOSAL_FILE = ""
    # Proposals whose area (after clipping to the image) is outside [MIN_SIZE^2, MAX_SIZE^2] are dropped
    # (authors: --min-size 8, --max-size 1024).
    cfg.INPUT.CLIPSELF.PROPOSAL_MIN_SIZE = 8.0
    cfg.INPUT.CLIPSELF.PROPOSAL_MAX_SIZE = 1024.0
    # Side of the square crops given to the teacher: the CLIP model's native input size (224 for B/16).
    cfg.INPUT.CLIPSELF.CROP_SIZE = 224
    # Crops cover the region enlarged by this factor around its centre (clipped to the image); the student
    # still pools the region itself (authors: 1.0 for patches, 1.5 for proposals).
    cfg.INPUT.CLIPSELF.CROP_SCALE = 1.0
    # Longest side of the student's input; several values = multi-scale training, one drawn per image.
    cfg.INPUT.CLIPSELF.SIZES = [1024]

    # Region-recognition test data (mapper "region_recognition", COCO-panoptic-format datasets).
    cfg.INPUT.REGION_RECOGNITION = CN()
    # Longest side of the test image (authors: --det-image-size 1024).
    cfg.INPUT.REGION_RECOGNITION.SIZE = 1024
    # Segments whose box area is below MIN_SIZE^2 (original pixels) are not evaluated (authors: 8).
    cfg.INPUT.REGION_RECOGNITION.MIN_SIZE = 8.0

    # Dataset mappers by name (train_net.DATASET_MAPPERS); "" = detectron2's DatasetMapper.
    cfg.INPUT.DATASET_MAPPER_NAME = ""
    cfg.INPUT.TEST_DATASET_MAPPER_NAME = ""
    # AdamW moments and epsilon (torch defaults; the CLIPSelf/open_clip recipe uses (0.9, 0.98), 1e-6).
    cfg.SOLVER.ADAMW_BETAS = [0.9, 0.999]
    cfg.SOLVER.ADAMW_EPS = 1e-8
    return cfg


def get_ovseg_cfg() -> CN:
    """detectron2's default config extended with ovseg's keys."""
    from detectron2.config import get_cfg

    return add_ovseg_config(get_cfg())
