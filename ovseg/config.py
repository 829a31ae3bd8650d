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
    # Let a PRETRAINED file that needs full unpickling (Python objects beyond tensors, TorchScript) load. Such a
    # file can run code: only for files from a source you trust. Plain state dicts and safetensors never need it.
    cfg.MODEL.CLIP.TRUST_PICKLED_WEIGHTS = False
    # Positional embeddings at grids other than the native one, bicubic: "size" (interpolate to the grid) or
    # "scale_factor" (SCLIP / ClearCLIP / NACLIP: by the factor (grid + 0.1) / native grid; open_clip ViTs only).
    cfg.MODEL.CLIP.POS_EMBED_RESIZE = "size"
    # 0-based indices of the blocks whose outputs are exported as res2, res3, ... (all at the patch stride).
    # Empty: four evenly spaced blocks ending with the second-to-last one.
    cfg.MODEL.CLIP.FEATURE_BLOCKS = []
    # Number of final transformer blocks left trainable (CLIPSelf trains them); 0 = fully frozen.
    cfg.MODEL.CLIP.UNLOCK_LAST_BLOCKS = 0
    # Regular expressions over the visual tower's parameter names (open_clip's) also left trainable, e.g. only the
    # attention's q / v projections as CAT-Seg ("attn\\.(q|v)_proj" on EVA; open_clip ViTs pack q, k, v in one
    # `attn.in_proj_weight`). A pattern matching nothing is an error.
    cfg.MODEL.CLIP.UNLOCK_PATTERNS = []

    # --- training-free dense modes: which mode builds `clip_dense`, then each mode's own parameters ---
    # How the last ViT block builds the dense map `clip_dense`: a name in
    # ovseg.modeling.backbone.DENSE_MODE_REGISTRY ("value", "attention", "sclip", "clearclip", "naclip",
    # "catseg"), whose entry says how the block mixes tokens and whether it keeps its residual / MLP; a mode's
    # parameters live under MODEL.CLIP.<MODE>.
    cfg.MODEL.CLIP.DENSE_MODE = "value"
    cfg.MODEL.CLIP.NACLIP = CN()
    # Std. deviation (in patches) of NACLIP's Gaussian neighbourhood bias; 5 in the NACLIP paper and code.
    cfg.MODEL.CLIP.NACLIP.SIGMA = 5.0

    cfg.MODEL.TEXT = CN()
    # Prompt templates: "imagenet" (CLIP's 80 ImageNet prompts), "simple" (open_clip's short set of 7),
    # "vild" (FC-CLIP's 14 ViLD-style prompts), "single" ("a photo of a {}."), "name" (the bare name, as LSeg) or
    # "catseg" (CAT-Seg's one prompt).
    cfg.MODEL.TEXT.TEMPLATES = "imagenet"
    # Test vocabulary: "" = the test dataset's classes; else "cat,sofa|couch" or a text file (one class a line,
    # synonyms separated by "|").
    cfg.MODEL.TEXT.VOCABULARY = ""
    # Per-dataset names: "<dataset>=<vocabulary file or string>" entries naming that dataset's classes (same count and
    # order) when it is trained or tested on, e.g. a paper's own class lists; MODEL.TEXT.VOCABULARY and a model's
    # TRAIN_VOCABULARY take precedence. [] = every dataset's own names.
    cfg.MODEL.TEXT.DATASET_VOCABULARIES = []
    # Prompts encoded per text-encoder forward (bounds memory for 847 classes x 80 templates).
    cfg.MODEL.TEXT.BATCH_SIZE = 1024
    # Train the text tower with the model (a head that fine-tunes it): no embedding cache, gradients through it.
    cfg.MODEL.TEXT.TRAINABLE = False

    # What inference returns as `sem_seg`: "scores" (C, H, W) float32, or "labels" (H, W) int64, their argmax over
    # classes computed a band of rows / chunk of classes at a time (no full-resolution (C, H, W) tensor: 847 classes
    # at 2000x1500 would be 10 GB). ovseg's SemSegEvaluator reads either; test-time augmentation needs "scores".
    # "labels" is offered by CLIPDenseSegmentor and OpenVocabMaskSegmentor; the other models refuse it.
    cfg.MODEL.SEM_SEG_OUTPUT = "scores"

    cfg.MODEL.DENSE_SEG = CN()
    # Multiplier of the cosine similarities before the softmax over classes (CLIP's learned scale is 100).
    cfg.MODEL.DENSE_SEG.LOGIT_SCALE = 100.0
    # "whole": one forward over the (resized) image; "slide": overlapping windows. The test-time short side is
    # INPUT.MIN_SIZE_TEST (long side capped by INPUT.MAX_SIZE_TEST).
    cfg.MODEL.DENSE_SEG.INFERENCE_MODE = "whole"
    # Sliding-window geometry in input pixels.
    cfg.MODEL.DENSE_SEG.WINDOW_SIZE = 448
    cfg.MODEL.DENSE_SEG.WINDOW_STRIDE = 224
    # How windows combine: "image" (SCLIP / ClearCLIP / NACLIP: windows on the image's pixel grid, last one flush
    # with the border, each window's logits upsampled to its pixels and averaged there, then resized to the
    # output) or "patch" (image padded to the patch size, size/stride rounded down to it, logits averaged on the
    # patch grid, one resampling to the output). "whole" is the one-window case of either.
    cfg.MODEL.DENSE_SEG.WINDOW_MERGE = "image"
    # ("image" merge) a window side that is not a multiple of the patch size: "truncate" (SCLIP / NACLIP: the
    # patch convolution drops the remainder, the logit grid is stretched over the window) or "pad" (ClearCLIP:
    # zero-padded evenly on both sides, logits cropped back).
    cfg.MODEL.DENSE_SEG.UNALIGNED_WINDOWS = "truncate"
    # A class's synonyms ("sofa|couch"): "max" (SCLIP / ClearCLIP / NACLIP: each synonym its own query, softmax
    # over all queries, maximum over the class's synonyms) or "mean" (their text embeddings averaged).
    cfg.MODEL.DENSE_SEG.SYNONYMS = "max"
    # Windows encoded per backbone forward (speed vs memory; results do not depend on it).
    cfg.MODEL.DENSE_SEG.WINDOW_BATCH_SIZE = 4
    # Background rule (VOC-21, PC-60, COCO-Object): pixels whose highest class probability is below this go to
    # the class named BACKGROUND_CLASS. 0 = off.
    cfg.MODEL.DENSE_SEG.BG_THRESHOLD = 0.0
    # SCLIP's area rule (its VOC-21 preset), applied before the background rule: a foreground class whose argmax
    # area is at most this fraction of all pixels argmax gives to foreground classes is zeroed. 0 = off.
    cfg.MODEL.DENSE_SEG.AREA_THRESHOLD = 0.0
    cfg.MODEL.DENSE_SEG.BACKGROUND_CLASS = "background"
    # PAMR refinement of the logits (Araslanov & Roth 2020): iterations (0 = off) and neighbour dilations
    # (pixels; the PAMR paper's set; the SCLIP/NACLIP presets use [8, 16]).
    cfg.MODEL.DENSE_SEG.PAMR_ITERS = 0
    cfg.MODEL.DENSE_SEG.PAMR_DILATIONS = [1, 2, 4, 8, 12, 24]

    add_clipself_config(cfg)

    add_mask_segmentor_config(cfg)

    add_groupvit_config(cfg)
    add_lseg_config(cfg)
    add_catseg_config(cfg)

    add_engine_config(cfg)
    return cfg


def add_engine_config(cfg: CN) -> CN:
    """Keys shared by every model: input normalisation, dataset mappers, optimizer, loading weights."""
    # Inference precision (autocast) of evaluation (train_net.py --eval-only and the evaluations during training,
    # tools/eval_all.py), ovseg.Predictor and the demo: "fp32", "bf16", "fp16", or "auto" = bf16 on CUDA GPUs that
    # support it (compute capability >= 8.0), fp32 on CPU and older GPUs. Training precision is SOLVER.AMP.
    cfg.MODEL.INFERENCE_DTYPE = "fp32"

    # Images are fed as RGB, normalised with CLIP's statistics.
    cfg.MODEL.PIXEL_MEAN = list(CLIP_PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(CLIP_PIXEL_STD)
    cfg.INPUT.FORMAT = "RGB"
    # Dataset mappers by name (ovseg.data.mappers.DATASET_MAPPERS): "clipself", "region_recognition", "mask_semantic",
    # "mask_panoptic_lsj"; "" = detectron2's DatasetMapper (training) / its test-time resize (testing).
    cfg.INPUT.DATASET_MAPPER_NAME = ""
    cfg.INPUT.TEST_DATASET_MAPPER_NAME = ""
    # Optimizer (ovseg.engine.trainer.OPTIMIZERS): "ADAMW", or "SGD" with detectron2's SOLVER.MOMENTUM / NESTEROV.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # AdamW moments and epsilon (torch defaults; the CLIPSelf/open_clip recipe uses (0.9, 0.98), 1e-6).
    cfg.SOLVER.ADAMW_BETAS = [0.9, 0.999]
    cfg.SOLVER.ADAMW_EPS = 1e-8
    # LR_SCHEDULER_NAME "WarmupPolyLR" (Mask2Former's): lr = base x warm-up factor x (1 - iter / MAX_ITER) ^ POWER;
    # after warm-up, a factor below CONSTANT_ENDING (0 = off) is replaced by CONSTANT_ENDING.
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0

    # Learning-rate multiplier of trainable backbone parameters (unlocked CLIP blocks); 0 leaves them out.
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Weight decay of embeddings (queries, level embeddings, the void embedding) and of norm layers.
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Which parameters get WEIGHT_DECAY_NORM / WEIGHT_DECAY_EMBED instead of WEIGHT_DECAY: "ndim" (open_clip /
    # CLIPSelf: every tensor with fewer than 2 dims, and embeddings) or "fcclip" (FC-CLIP: norm layers and
    # embeddings only; biases and the logit scale are decayed). See ovseg.engine.trainer.weight_decay_of.
    cfg.SOLVER.WEIGHT_DECAY_RULE = "ndim"

    # Weights files are loaded with torch.load(weights_only=True): tensors only, no code. True also accepts pickles
    # (.pkl, files holding Python objects), which run code when loaded: set it only for files you trust.
    cfg.MODEL.TRUST_PICKLED_WEIGHTS = False
    # --eval-only without MODEL.WEIGHTS for a model with trainable parameters, or with weights that do not fit it,
    # is an error; True evaluates the random / partly loaded parameters on purpose.
    cfg.MODEL.ALLOW_RANDOM_WEIGHTS = False
    return cfg


def add_clipself_config(cfg: CN) -> CN:
    """CLIPSelf self-distillation (`CLIPSelfDistiller`), its data, and the region-recognition evaluation.
    Defaults follow the authors' code (github.com/wusize/CLIPSelf, src/training/params.py and
    scripts/train_clipself_coco_*_eva_vitb16.sh)."""
    cfg.MODEL.CLIPSELF = CN()
    # Multiplier of the distillation loss 1 - cos(student region feature, teacher crop embedding).
    cfg.MODEL.CLIPSELF.LOSS_WEIGHT = 1.0
    # Weight-space ensemble after the last step: trained student weights <- alpha * student + (1 - alpha) * teacher
    # (authors' --alpha: 0.7 for B/16, 0.95 for L/14); 1.0 = off.
    cfg.MODEL.CLIPSELF.ENSEMBLE_ALPHA = 1.0

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
    return cfg


def add_mask_segmentor_config(cfg: CN) -> CN:
    """Keys of the FC-CLIP-style `OpenVocabMaskSegmentor`, its data mappers and its solver."""
    cfg.MODEL.MASK_SEG = CN()
    # Training vocabulary: "" = the vocabulary of DATASETS.TRAIN[0] (every training set must share it).
    # Test classes whose names (any synonym, case-insensitive) occur in it count as "seen" for the ensemble.
    cfg.MODEL.MASK_SEG.TRAIN_VOCABULARY = ""

    cfg.MODEL.MASK_SEG.PIXEL_DECODER = CN()
    # Name in ovseg's PIXEL_DECODER_REGISTRY.
    cfg.MODEL.MASK_SEG.PIXEL_DECODER.NAME = "ViTPyramidPixelDecoder"
    # Backbone features turned into the pyramid, finest level first; one per PYRAMID_SCALES entry.
    cfg.MODEL.MASK_SEG.PIXEL_DECODER.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Resampling factor of each feature relative to the patch grid (4 = stride p/4; 0.5 = stride 2p), finest first.
    # Only powers of two; the first level gives the mask features.
    cfg.MODEL.MASK_SEG.PIXEL_DECODER.PYRAMID_SCALES = [4.0, 2.0, 1.0, 0.5]
    # Channels of every pyramid level and of the mask features.
    cfg.MODEL.MASK_SEG.PIXEL_DECODER.CONV_DIM = 256
    cfg.MODEL.MASK_SEG.PIXEL_DECODER.MASK_DIM = 256
    # Normalisation in the pyramid convolutions: "GN" (32 groups or fewer), "LN" or "" (none).
    cfg.MODEL.MASK_SEG.PIXEL_DECODER.NORM = "GN"
    # How many of the coarsest levels the transformer encoder attends over jointly (full attention, so keep
    # the fine levels out: their token count grows 4x per level). One: the ViT's features already went through
    # global attention; adding stride p (2160 more tokens at 640x853) cost 0.4 s per image on a 2-core CPU.
    cfg.MODEL.MASK_SEG.PIXEL_DECODER.TRANSFORMER_LEVELS = 1
    cfg.MODEL.MASK_SEG.PIXEL_DECODER.TRANSFORMER_LAYERS = 6
    cfg.MODEL.MASK_SEG.PIXEL_DECODER.TRANSFORMER_HEADS = 8
    cfg.MODEL.MASK_SEG.PIXEL_DECODER.TRANSFORMER_FFN_DIM = 1024
    cfg.MODEL.MASK_SEG.PIXEL_DECODER.DROPOUT = 0.0

    cfg.MODEL.MASK_SEG.DECODER = CN()
    # Name in ovseg's TRANSFORMER_DECODER_REGISTRY.
    cfg.MODEL.MASK_SEG.DECODER.NAME = "MaskedAttentionDecoder"
    cfg.MODEL.MASK_SEG.DECODER.HIDDEN_DIM = 256
    cfg.MODEL.MASK_SEG.DECODER.NUM_QUERIES = 100
    cfg.MODEL.MASK_SEG.DECODER.HEADS = 8
    cfg.MODEL.MASK_SEG.DECODER.FFN_DIM = 2048
    # Masked-attention layers; each one predicts (deep supervision), as does the input to the first one.
    cfg.MODEL.MASK_SEG.DECODER.LAYERS = 9
    # Pyramid levels the decoder's layers cross-attend to, round robin from the coarsest (3 = strides 2p, p, p/2).
    cfg.MODEL.MASK_SEG.DECODER.NUM_LEVELS = 3
    cfg.MODEL.MASK_SEG.DECODER.DROPOUT = 0.0
    # Pre-norm (LayerNorm before each sub-layer) instead of post-norm.
    cfg.MODEL.MASK_SEG.DECODER.PRE_NORM = False
    # In-vocabulary class head: "fcclip" (FC-CLIP's: 3-layer MLP over the normed query plus LayerNorm + Linear of
    # the mask features averaged over the query's predicted mask) or "linear" (one Linear on the normed query).
    cfg.MODEL.MASK_SEG.DECODER.CLASS_HEAD = "fcclip"

    cfg.MODEL.MASK_SEG.CLASSIFIER = CN()
    # In-vocabulary classifier: logit = scale * cos(query embedding, text embedding or learned void embedding).
    # Initial scale (1/temperature) and whether it is learned (clamped to at most 100, like CLIP's).
    cfg.MODEL.MASK_SEG.CLASSIFIER.LOGIT_SCALE = 14.285714  # 1 / 0.07, CLIP's initial temperature
    cfg.MODEL.MASK_SEG.CLASSIFIER.LEARN_LOGIT_SCALE = True
    # Out-of-vocabulary classifier: mask-pooled frozen `clip_dense` vs text, scaled like CLIP's logits.
    # False = in-vocabulary classifier only at inference.
    cfg.MODEL.MASK_SEG.CLASSIFIER.OUT_VOCAB = True
    cfg.MODEL.MASK_SEG.CLASSIFIER.OUT_VOCAB_LOGIT_SCALE = 100.0
    # Geometric ensemble p = p_in^(1-w) * p_out^w with w = ALPHA for seen classes and BETA for unseen ones.
    cfg.MODEL.MASK_SEG.CLASSIFIER.ENSEMBLE_ALPHA = 0.4
    cfg.MODEL.MASK_SEG.CLASSIFIER.ENSEMBLE_BETA = 0.8
    # True: queries whose binarised mask covers no cell of the CLIP grid use the in-vocabulary classifier alone
    # (FC-CLIP sets it in its ADE20K configs; its default is False).
    cfg.MODEL.MASK_SEG.CLASSIFIER.ENSEMBLE_ON_VALID_MASK = False
    # A class with synonyms: "max" = max over per-synonym logits (FC-CLIP, OpenSeg), "mean" = one embedding,
    # the synonyms' mean. Both classifiers, training and inference.
    cfg.MODEL.MASK_SEG.CLASSIFIER.SYNONYMS = "max"
    # True: out-of-vocabulary pooling weighted by mask probabilities; False: plain mean over the binarised
    # masks (mask logits resized bilinearly to the CLIP grid, then > 0), as FC-CLIP's MaskPooling.
    cfg.MODEL.MASK_SEG.CLASSIFIER.SOFT_MASK_POOLING = False

    cfg.MODEL.MASK_SEG.LOSS = CN()
    # Weights of the classification (CE), mask (sigmoid BCE) and dice terms; the same weights serve as the
    # Hungarian matcher's costs.
    cfg.MODEL.MASK_SEG.LOSS.CLASS_WEIGHT = 2.0
    cfg.MODEL.MASK_SEG.LOSS.MASK_WEIGHT = 5.0
    cfg.MODEL.MASK_SEG.LOSS.DICE_WEIGHT = 5.0
    # CE weight of the void ("no object") class for unmatched queries.
    cfg.MODEL.MASK_SEG.LOSS.NO_OBJECT_WEIGHT = 0.1
    # Losses on every decoder layer's prediction, not only the last.
    cfg.MODEL.MASK_SEG.LOSS.DEEP_SUPERVISION = True
    # Points sampled per mask for the mask losses and matching costs (112 * 112 in Mask2Former).
    cfg.MODEL.MASK_SEG.LOSS.NUM_POINTS = 12544
    # Uncertainty-based importance sampling: candidates = OVERSAMPLE_RATIO * NUM_POINTS random points, of which
    # IMPORTANCE_SAMPLE_RATIO * NUM_POINTS most uncertain are kept, the rest drawn uniformly.
    cfg.MODEL.MASK_SEG.LOSS.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_SEG.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75

    # ViLD-image (Gu et al., ICLR 2022): a head mapping each query's class embedding into CLIP's image-embedding
    # space, distilled towards the frozen CLIP embedding of its matched segment; ViLD's text head is the
    # in-vocabulary classifier above. Values from the authors' code (tensorflow/tpu, projects/vild) and paper.
    cfg.MODEL.MASK_SEG.VILD = CN()
    # Build the head and train it with the L1 distillation loss ("loss_vild_image"). False: no new parameters.
    cfg.MODEL.MASK_SEG.VILD.ENABLED = False
    # Weight w of the distillation loss (ViLD's feat_distill_weight: 0.5 for ResNet-50; 1.0 / 2.0 for ResNet-152).
    cfg.MODEL.MASK_SEG.VILD.IMAGE_LOSS_WEIGHT = 0.5
    # The teacher's view of a segment: "crop" (ViLD: its box cut from the input and resized, through CLIP's image
    # encoder) or "mask_pool" (the frozen `clip_dense` map averaged over the segment: no extra CLIP forward).
    cfg.MODEL.MASK_SEG.VILD.TARGET = "crop"
    # ("crop") box enlargements about the centre, clipped to the image; the embeddings of all scales are
    # normalised, summed and normalised again (ViLD: 1x and 1.5x crops).
    cfg.MODEL.MASK_SEG.VILD.CROP_SCALES = [1.0, 1.5]
    # ("crop") side of the square the box is resized to (stretched, bilinear): CLIP's input size (ViLD: 224).
    cfg.MODEL.MASK_SEG.VILD.CROP_SIZE = 224
    # Linear layers of the head's MLP on the query's class embedding (1 = ViLD's single projection).
    cfg.MODEL.MASK_SEG.VILD.HEAD_LAYERS = 2
    # Let the distillation's gradient reach the query embedding and the decoder (ViLD: it shapes the detector's
    # shared region features); False: only the head learns from it.
    cfg.MODEL.MASK_SEG.VILD.DISTILL_INTO_DECODER = True
    # Multiplier of the head's cosine similarities to text (ViLD's temperature 0.01).
    cfg.MODEL.MASK_SEG.VILD.IMAGE_LOGIT_SCALE = 100.0
    # Inference with ViLD's ensemble: s = p_text^(1-w) * p_image^w, w = ENSEMBLE_ALPHA on seen classes and
    # ENSEMBLE_BETA on unseen ones (ViLD's lambda = 2/3: 1/3 and 2/3). It replaces the in-vocabulary classifier's
    # probabilities; with CLASSIFIER.OUT_VOCAB the FC-CLIP ensemble then combines them with frozen CLIP.
    cfg.MODEL.MASK_SEG.VILD.ENSEMBLE = True
    cfg.MODEL.MASK_SEG.VILD.ENSEMBLE_ALPHA = 1.0 / 3.0
    cfg.MODEL.MASK_SEG.VILD.ENSEMBLE_BETA = 2.0 / 3.0

    cfg.MODEL.MASK_SEG.TEST = CN()
    # Which outputs inference produces (detectron2 formats "sem_seg", "panoptic_seg", "instances").
    cfg.MODEL.MASK_SEG.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_SEG.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_SEG.TEST.INSTANCE_ON = False
    # Where `sem_seg` sums p(class | query) * mask probability over the queries: "output" = every query's mask
    # resized to the output first; "padded" = masks resized to the padded input, sigmoid, sum, then the class
    # scores cropped and resized; "auto" = FC-CLIP's choice ("output" if PANOPTIC_ON or INSTANCE_ON, else
    # "padded"); "mask" = on the mask-feature grid (stride p/4), then the class scores resized once (cheapest).
    cfg.MODEL.MASK_SEG.TEST.SEMANTIC_RESOLUTION = "auto"
    # Panoptic (FC-CLIP / Mask2Former): queries whose best score is at most OBJECT_MASK_THRESHOLD (or void) are
    # dropped; a query is a segment if the pixels it wins in the argmax are >= OVERLAP_THRESHOLD x its own mask.
    cfg.MODEL.MASK_SEG.TEST.OBJECT_MASK_THRESHOLD = 0.8
    cfg.MODEL.MASK_SEG.TEST.OVERLAP_THRESHOLD = 0.8
    # Instances: top-k (query, class) pairs over all classes, then the thing classes among them (FC-CLIP).
    cfg.MODEL.MASK_SEG.TEST.DETECTIONS_PER_IMAGE = 100

    # Inputs of the mask segmentor's training mappers (INPUT.DATASET_MAPPER_NAME "mask_semantic" / "mask_panoptic_lsj").
    # Class-balanced crop for "mask_semantic": no class may cover more than this share of a crop (1.0 = off).
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # SSD's colour augmentation in "mask_semantic" (random brightness, contrast, saturation, hue; Mask2Former's key).
    cfg.INPUT.COLOR_AUG_SSD = False
    # "mask_semantic": pad image (pixel value 128) and labels (ignore) bottom / right to PAD_SIZE x PAD_SIZE, after the
    # crop (Mask2Former's / CAT-Seg's INPUT.SIZE_DIVISIBILITY, which pads to exactly that size); 0 = no padding.
    cfg.INPUT.PAD_SIZE = 0
    # Large-scale jitter ("mask_panoptic_lsj"): resize by a factor in [MIN_SCALE, MAX_SCALE] of IMAGE_SIZE,
    # then crop / pad to IMAGE_SIZE x IMAGE_SIZE.
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0
    return cfg


def add_groupvit_config(cfg: CN) -> CN:
    """`GroupViTSegmentor` and its captioned-image data (mapper "image_caption"). Defaults are GroupViT-S as in the
    authors' configs/group_vit_gcc_yfcc_30e.yml and models/group_vit.py (github.com/NVlabs/GroupViT @ 13b7861)."""
    g = cfg.MODEL.GROUPVIT = CN()
    # Image encoder: patch size, width, blocks per stage, attention heads (every stage).
    g.PATCH_SIZE = 16
    g.EMBED_DIM = 384
    g.DEPTHS = [6, 3, 3]
    g.NUM_HEADS = 6
    # Learnable group tokens per stage (the last stage has none) and segment tokens each grouping block outputs.
    g.NUM_GROUP_TOKENS = [64, 8, 0]
    g.NUM_OUTPUT_GROUPS = [64, 8]
    # Hard (straight-through one-hot) assignment of tokens to groups; Gumbel noise on the assignment logits while
    # training, at temperature GUMBEL_TAU.
    g.HARD_ASSIGNMENT = True
    g.GUMBEL = True
    g.GUMBEL_TAU = 1.0
    # Stochastic depth, rising linearly to this over the blocks.
    g.DROP_PATH_RATE = 0.1
    # Text encoder (open_clip's causal text transformer, trained from scratch): context, width, layers, heads.
    g.TEXT_CONTEXT_LENGTH = 77
    g.TEXT_WIDTH = 256
    g.TEXT_LAYERS = 12
    g.TEXT_HEADS = 4
    # Image and text projections into the joint space: Linear-BN-ReLU-Linear (PROJ_LAYERS 2), hidden and output dims.
    g.PROJ_LAYERS = 2
    g.PROJ_HIDDEN_DIM = 4096
    g.PROJ_DIM = 256
    # Initial temperature of both contrastive losses (each learns its own scale, clamped to at most 100).
    g.TEMPERATURE = 0.07
    # Multi-label contrastive loss: prompted nouns per caption (padded with the caption itself; 0 = loss off), its
    # weight, and the prompt templates (a name of MODEL.TEXT.TEMPLATES' sets, one drawn per noun).
    g.MULTI_LABEL = 3
    g.MULTI_LABEL_WEIGHT = 1.0
    g.NOUN_TEMPLATES = "imagenet"
    # Zero-shot segmentation: each group's classes restricted to the image's TOP_K most similar classes (0 = off);
    # pixels whose best class score is below BG_THRESHOLD (0 = off) go to the class named BACKGROUND_CLASS (a
    # vocabulary without that class has no background rule: PASCAL Context-59, COCO-Stuff).
    g.TOP_K_CLASSES = 5
    g.BG_THRESHOLD = 0.95
    g.BACKGROUND_CLASS = "background"
    # Test-time inference: "whole" image at once, or "slide": WINDOW_SIZE squared windows every STRIDE pixels, their
    # class scores averaged where they overlap (the authors' mmseg test_cfg: 448 windows, stride 224).
    g.TEST = CN()
    g.TEST.MODE = "slide"
    g.TEST.WINDOW_SIZE = 448
    g.TEST.STRIDE = 224

    cfg.INPUT.CAPTIONS = CN()
    # Side of the square training crops (random resized crop); also the grid the position embeddings are learned at.
    cfg.INPUT.CAPTIONS.IMAGE_SIZE = 224
    # Area fraction range of the random resized crop.
    cfg.INPUT.CAPTIONS.CROP_SCALE = [0.08, 1.0]
    # Nouns looked for in captions for the multi-label loss: a file (one a line, synonyms joined by '|') or a
    # comma-separated list; "" = none (only the image-text loss learns).
    cfg.INPUT.CAPTIONS.NOUN_VOCABULARY = ""
    return cfg


def add_lseg_config(cfg: CN) -> CN:
    """Keys of `LSegSegmentor` (Li et al., ICLR 2022). Defaults follow the authors' code (github.com/isl-org/lang-seg,
    modules/models/lseg_net.py, lseg_blocks.py, lseg_vit.py) for a ViT-B/16 tower (DPT-Base's reassemble channels)."""
    cfg.MODEL.LSEG = CN()
    # Training vocabulary: "" = the vocabulary of DATASETS.TRAIN[0] (every training set must share it); labels index it.
    cfg.MODEL.LSEG.TRAIN_VOCABULARY = ""
    # Backbone features the DPT decoder reassembles, finest level first (MODEL.CLIP.FEATURE_BLOCKS says which blocks).
    cfg.MODEL.LSEG.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Channels of each reassembled level (DPT-Base / ViT-B: 96, 192, 384, 768; LSeg ViT-L/16: 256, 512, 1024, 1024).
    cfg.MODEL.LSEG.REASSEMBLE_CHANNELS = [96, 192, 384, 768]
    # Resampling of each level relative to the patch grid (DPT: x4, x2, x1, x0.5), powers of two, decreasing.
    cfg.MODEL.LSEG.REASSEMBLE_SCALES = [4.0, 2.0, 1.0, 0.5]
    # Channels of the fusion path (LSeg's --num_features, 256).
    cfg.MODEL.LSEG.FEATURES = 256
    # Batch norm in the fusion blocks' residual units (LSegNet sets use_bn=True).
    cfg.MODEL.LSEG.USE_BN = True
    # Fixed temperature of the pixel-text cosines: LSeg's exp(log(1 / 0.07)), not learned.
    cfg.MODEL.LSEG.LOGIT_SCALE = 14.285714
    # Spatial regularisation of the logits: "none", "depthwise" or "bottleneck" (LSeg's --arch_option 0, 2, 1;
    # its train.sh uses 0), applied BLOCK_DEPTH times with shared weights (--block_depth), BLOCK_ACTIVATION between
    # applications ("lrelu" = LSeg's default --activation, "relu", "tanh").
    cfg.MODEL.LSEG.BLOCK_KIND = "none"
    cfg.MODEL.LSEG.BLOCK_DEPTH = 1
    cfg.MODEL.LSEG.BLOCK_ACTIVATION = "lrelu"
    return cfg


def add_catseg_config(cfg: CN) -> CN:
    """CAT-Seg (`CATSegSegmentor`). Defaults are the authors' ViT-B/16 recipe (github.com/KU-CVLAB/CAT-Seg,
    configs/vitb_384.yaml over configs/config.yaml, cat_seg/config.py)."""
    cfg.MODEL.CATSEG = CN()
    # Training vocabulary (labels index it): "" = the classes of DATASETS.TRAIN[0].
    cfg.MODEL.CATSEG.TRAIN_VOCABULARY = ""
    # (H, W) every image / window is resized to before CLIP (384 for ViT-B/16, 336 for ViT-L/14: a 24x24 grid).
    cfg.MODEL.CATSEG.CLIP_RESOLUTION = [384, 384]
    # Cost-embedding channels, aggregation layers and heads (HIDDEN_DIMS, NUM_LAYERS, NUM_HEADS).
    cfg.MODEL.CATSEG.HIDDEN_DIM = 128
    cfg.MODEL.CATSEG.NUM_LAYERS = 2
    cfg.MODEL.CATSEG.NUM_HEADS = 4
    # Projected dims of the text guidance (class aggregation) and appearance guidance (spatial aggregation).
    cfg.MODEL.CATSEG.TEXT_GUIDANCE_PROJ_DIM = 128
    cfg.MODEL.CATSEG.APPEARANCE_GUIDANCE_PROJ_DIM = 128
    # Upsampling decoder: channels after its two blocks; channels of the x2 / x4 CLIP guidance maps, before and
    # after their projection. The guiding blocks are MODEL.CLIP.FEATURE_BLOCKS (two of them).
    cfg.MODEL.CATSEG.DECODER_DIMS = [64, 32]
    cfg.MODEL.CATSEG.DECODER_GUIDANCE_DIMS = [256, 128]
    cfg.MODEL.CATSEG.DECODER_GUIDANCE_PROJ_DIMS = [32, 16]
    # Average pooling of the grid before class aggregation ([] = none), and spatial aggregation's window.
    cfg.MODEL.CATSEG.POOLING_SIZE = [2, 2]
    # The pooling at test time ([] = POOLING_SIZE); the authors' eval.sh tests with [1, 1] (no pooling).
    cfg.MODEL.CATSEG.TEST_POOLING_SIZE = [1, 1]
    cfg.MODEL.CATSEG.WINDOW_SIZE = 12
    # Attention over classes: "linear" (elu + 1 kernel, the authors') or "full" (softmax).
    cfg.MODEL.CATSEG.ATTENTION_TYPE = "linear"
    # Class-token length of class aggregation: fewer classes are padded with learned tokens, more are cut to the
    # PAD_LEN most CLIP-similar ones (the rest get logit -100). The authors' Aggregator default; 0 = off.
    cfg.MODEL.CATSEG.PAD_LEN = 256
    # Classes per chunk of the per-class work (cost embedding, spatial aggregation, decoder); 0 = all at once.
    # Memory only: the result does not depend on it.
    cfg.MODEL.CATSEG.CLASS_CHUNK = 0
    # SED-style early rejection at test time (Xie et al., CVPR 2024): keep a class only where it is among the
    # SED_TOPK best of some feature-grid cell by CLIP cost, before the per-class stages; rejected: logit -100. 0 = off.
    cfg.MODEL.CATSEG.SED_TOPK = 0
    # A class's synonyms ("sofa|couch"): "first" (its first name's text embedding, the authors'), "mean" (the names'
    # embeddings averaged) or "max" (each name a class channel of the head, the class's probability the max over its
    # names': CAT-Seg's PAS-20b, background = 39 Pascal-Context names; tools/eval_all.py's PAS-20b column sets it).
    cfg.MODEL.CATSEG.SYNONYMS = "first"
    # Fine-tune the attention query / value projection weights of both CLIP towers (CLIP_FINETUNE "attention").
    cfg.MODEL.CATSEG.FINETUNE_CLIP = True
    # Learning rate of the fine-tuned CLIP weights as a multiple of SOLVER.BASE_LR (SOLVER.CLIP_MULTIPLIER).
    cfg.MODEL.CATSEG.CLIP_LR_MULTIPLIER = 0.01
    # Test: "slide" (the authors' TEST.SLIDING_WINDOW: windows over the image resized to SLIDE_RESIZE, plus the
    # whole image as a global view, probabilities averaged) or "whole" (the image as the one view).
    cfg.MODEL.CATSEG.INFERENCE_MODE = "slide"
    # Sliding-window geometry in pixels: the square the image is resized to, window side and stride
    # (the authors' out_res 640, kernel 384, stride int(384 * (1 - 0.333)) = 256).
    cfg.MODEL.CATSEG.SLIDE_RESIZE = [640, 640]
    cfg.MODEL.CATSEG.SLIDE_WINDOW = 384
    cfg.MODEL.CATSEG.SLIDE_STRIDE = 256
    return cfg


def get_ovseg_cfg() -> CN:
    """detectron2's default config extended with ovseg's keys."""
    from detectron2.config import get_cfg

    return add_ovseg_config(get_cfg())
