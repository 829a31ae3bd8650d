"""GroupViT's parts: the grouping image encoder, its text tower and projections, its losses, and the zero-shot
group-to-class segmentation rule.

Xu et al., "GroupViT: Semantic Segmentation Emerges from Text Supervision" (CVPR 2022). The rules follow the
authors' code (github.com/NVlabs/GroupViT @ 13b7861: models/group_vit.py, models/multi_label_contrastive.py,
segmentation/evaluation/group_vit_seg.py); the implementation is ours.

Shapes: B images, N image tokens (patches), G group tokens of a stage, D channels, K prompted nouns per caption,
C classes.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

__all__ = ["GroupViTEncoder", "GroupingBlock", "ProjectionMLP", "build_text_tower", "contrastive_loss",
           "group_to_class_segmentation", "multi_label_contrastive_loss", "straight_through_assignment"]


# ---------------------------------------------------------------------------------------------- assignment
def straight_through_assignment(logits: torch.Tensor, dim: int, tau: float = 1.0, gumbel: bool = True,
                                hard: bool = True) -> torch.Tensor:
    """Assignment of each token to one group along `dim`.

    soft = softmax((logits + g) / tau) with g ~ Gumbel(0, 1) i.i.d. (`gumbel`; else g = 0). With `hard` the
    forward value is the one-hot of soft's argmax and the gradient is soft's (straight-through:
    ``one_hot - soft.detach() + soft``); otherwise soft itself.
    """
    if gumbel:
        # -log(Exp(1)) is Gumbel(0, 1); exponential_ never returns 0 in float32
        logits = logits - torch.empty_like(logits).exponential_().log()
    soft = (logits / tau).softmax(dim)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


class _Mlp(nn.Sequential):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class _TokenMixer(nn.Module):
    """An MLP across the token axis: (B, G_in, D) -> (B, G_out, D) (the MLP-Mixer's token mixing)."""

    def __init__(self, g_in: int, hidden: int, g_out: int):
        super().__init__()
        self.mlp = _Mlp(g_in, hidden, g_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)


class _CrossAttentionBlock(nn.Module):
    """Queries attend to keys, then an MLP, each with a residual; one LayerNorm after both (post-norm, as the
    grouping block's pre-assignment attention in the authors' code)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        x = query + self.attn(query, key, key, need_weights=False)[0]
        x = x + self.mlp(self.norm_mlp(x))
        return self.norm_out(x)


class GroupingBlock(nn.Module):
    """Merges N image tokens into G_out segment tokens.

    The G_in group tokens are mixed into G_out (token MLP), attend to the image tokens, then each image token is
    assigned to one of them (`straight_through_assignment` over the groups, Gumbel noise in training only); each
    segment token is its assigned tokens' values averaged (divided by count + 1, the authors' `assign_eps`), plus
    its own token, then an MLP (with a linear reduction when the next stage is narrower).
    """

    def __init__(self, dim: int, out_dim: int, num_heads: int, num_group_tokens: int, num_output_groups: int,
                 hard: bool = True, gumbel: bool = True, tau: float = 1.0,
                 mlp_ratios: Tuple[float, float] = (0.5, 4.0)):
        super().__init__()
        self.hard, self.gumbel, self.tau = hard, gumbel, tau
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.mix_tokens = _TokenMixer(num_group_tokens, int(mlp_ratios[0] * dim), num_output_groups)
        self.norm_mixed = nn.LayerNorm(dim)
        self.pre_assign = _CrossAttentionBlock(dim, num_heads)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_new = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(mlp_ratios[1] * dim), out_dim)
        self.reduction = (nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out_dim, bias=False)) if out_dim != dim
                          else nn.Identity())

    def assignment_logits(self, groups: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, G, D) groups, (B, N, D) tokens -> (B, G, N) scaled dot products."""
        return self.q(groups) @ self.k(x).transpose(1, 2) / math.sqrt(groups.shape[-1])

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: (B, N, D) image tokens; group_tokens: (B, G_in, D).
        Returns:
            (B, G_out, D_out) segment tokens and the (B, G_out, N) soft assignment (softmax over the groups, no
            noise), which inference chains across stages.
        """
        x = self.norm_x(x)
        groups = self.norm_mixed(self.mix_tokens(self.norm_tokens(group_tokens)))  # (B, G_out, D)
        groups = self.pre_assign(groups, x)
        logits = self.assignment_logits(groups, x)  # (B, G_out, N)
        assign = straight_through_assignment(logits, dim=1, tau=self.tau, gumbel=self.gumbel and self.training,
                                             hard=self.hard)
        # mean of the assigned values; the +1 keeps an empty group finite (its output is its own token)
        weights = assign / (assign.sum(-1, keepdim=True) + 1.0)
        new = self.proj(weights @ self.v(x)) + groups  # (B, G_out, D)
        new = self.reduction(new) + self.mlp(self.norm_new(new))
        return new, logits.detach().softmax(1)


class _Stage(nn.Module):
    """Transformer blocks over [image tokens; group tokens], then (all stages but the last) a grouping block."""

    def __init__(self, dim: int, depth: int, num_heads: int, num_group_tokens: int, prev_groups: int, prev_dim: int,
                 drop_path: Sequence[float], grouping: Optional[GroupingBlock]):
        super().__init__()
        self.num_group_tokens = num_group_tokens
        self.group_token = nn.Parameter(torch.zeros(1, num_group_tokens, dim)) if num_group_tokens else None
        # later stages start their group tokens from the previous stage's (the authors' group_projector)
        self.from_previous = None
        if num_group_tokens and prev_groups:
            layers: List[nn.Module] = [nn.LayerNorm(prev_dim),
                                       _TokenMixer(prev_groups, prev_dim // 2, num_group_tokens)]
            if prev_dim != dim:
                layers += [nn.LayerNorm(prev_dim), nn.Linear(prev_dim, dim, bias=False)]
            self.from_previous = nn.Sequential(*layers)
        elif num_group_tokens:
            trunc_normal_(self.group_token, std=0.02)  # zero-initialised where a projection adds to them
        self.blocks = nn.ModuleList(Block(dim, num_heads, qkv_bias=True, drop_path=dp, norm_layer=nn.LayerNorm)
                                    for dp in drop_path)
        self.grouping = grouping

    def forward(self, x: torch.Tensor, prev_groups: Optional[torch.Tensor]):
        n = x.shape[1]
        groups = None
        if self.group_token is not None:
            groups = self.group_token.expand(x.shape[0], -1, -1)
            if self.from_previous is not None:
                groups = groups + self.from_previous(prev_groups)
            x = torch.cat([x, groups], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x, groups = x[:, :n], (x[:, n:] if self.group_token is not None else None)
        assignment = None
        if self.grouping is not None:
            x, assignment = self.grouping(x, groups)
        return x, groups, assignment


class GroupViTEncoder(nn.Module):
    """The grouping ViT: patches + learned positions, then stages; stage i ends by grouping its tokens into
    NUM_OUTPUT_GROUPS[i] segments, which the next stage takes as its image tokens.

    GroupViT-S (the paper): embed_dim 384, depths (6, 3, 3), heads 6, group tokens (64, 8, 0), output groups (64, 8).
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384,
                 depths: Sequence[int] = (6, 3, 3), num_heads: int = 6, num_group_tokens: Sequence[int] = (64, 8, 0),
                 num_output_groups: Sequence[int] = (64, 8), hard_assignment: bool = True, gumbel: bool = True,
                 gumbel_tau: float = 1.0, drop_path_rate: float = 0.1):
        super().__init__()
        depths, tokens, outputs = list(depths), list(num_group_tokens), list(num_output_groups)
        if not (len(depths) == len(tokens) == len(outputs) + 1) or any(t <= 0 for t in tokens[:-1]):
            raise ValueError(f"GroupViT stages: DEPTHS {depths} and NUM_GROUP_TOKENS {tokens} need one entry per "
                             f"stage, NUM_OUTPUT_GROUPS {outputs} one per stage but the last, and every stage "
                             "but the last needs group tokens")
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            grouping = None
            if i < len(depths) - 1:
                grouping = GroupingBlock(embed_dim, embed_dim, num_heads, tokens[i], outputs[i], hard=hard_assignment,
                                         gumbel=gumbel, tau=gumbel_tau)
            self.stages.append(_Stage(embed_dim, depth, num_heads, tokens[i], tokens[i - 1] if i else 0, embed_dim,
                                      rates[sum(depths[:i]):sum(depths[:i + 1])], grouping))
        self.norm = nn.LayerNorm(embed_dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """(1, h*w, D) position embeddings for an h x w patch grid (bicubic from the training grid)."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        grid = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], Tuple[int, int]]:
        """(B, 3, H, W) normalised images, H and W multiples of the patch size -> the (B, G_last, D) normed
        segment tokens, the soft assignment of each grouping stage [(B, G_1, N), (B, G_2, G_1), ...], and the
        (h, w) patch grid."""
        x = self.patch_embed(images)  # (B, D, h, w)
        hw = tuple(x.shape[-2:])
        x = self.patch_norm(x.flatten(2).transpose(1, 2)) + self.positions(*hw)  # (B, N, D)
        groups, assignments = None, []
        for stage in self.stages:
            x, groups, assignment = stage(x, groups)
            if assignment is not None:
                assignments.append(assignment)
        return self.norm(x), assignments, hw


# ---------------------------------------------------------------------------------------------- text, projection
def build_text_tower(context_length: int = 77, vocab_size: int = 49408, width: int = 256, layers: int = 12,
                     heads: int = 4) -> nn.Module:
    """open_clip's causal text transformer, randomly initialised, without its own projection (GroupViT trains its
    text encoder from scratch and projects with `ProjectionMLP`): tokens (T, L) -> (T, width) EOT features."""
    from open_clip.transformer import TextTransformer

    return TextTransformer(context_length=context_length, vocab_size=vocab_size, width=width, heads=heads,
                           layers=layers, output_dim=None)


class ProjectionMLP(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear applied to each token (the authors' 2-layer 1x1-conv projector; the
    batch statistics run over images and tokens together). `num_layers` 1 = one Linear."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 4096, num_layers: int = 2):
        super().__init__()
        layers: List[nn.Module] = []
        for i in range(num_layers - 1):
            layers += [nn.Linear(d_in if i == 0 else hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(hidden if num_layers > 1 else d_in, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_out)."""
        return self.net(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------- losses
def _gather(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """All processes' rows (gradients flow back to each process's own), and this process's row offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous())), dist.get_rank() * x.shape[0]


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (-target * logits.log_softmax(-1)).sum(-1).mean()


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over the batch (all processes' rows as negatives).

    Args:
        image, text: (B, D) embeddings of matching pairs (normalised here).
        logit_scale: log of the inverse temperature (clamped to at most 100 after exp).
    """
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    all_image, offset = _gather(image)
    all_text, _ = _gather(text)
    scale = logit_scale.exp().clamp(max=100)
    labels = torch.arange(image.shape[0], device=image.device) + offset
    return 0.5 * (F.cross_entropy(scale * image @ all_text.t(), labels)
                  + F.cross_entropy(scale * text @ all_image.t(), labels))


def multi_label_contrastive_loss(image: torch.Tensor, prompts: torch.Tensor, logit_scale: torch.Tensor
                                 ) -> torch.Tensor:
    """GroupViT's multi-label contrastive loss between each image and the K prompted nouns of its caption.

    Image side: each image's row over all B*K prompts, with target 1/K on its own K prompts; prompt side: each
    prompt's row over all B images, target 1 on its image. Soft-target cross-entropy, the two sides averaged.

    Args:
        image: (B, D) image embeddings; prompts: (B, K, D) prompt embeddings (both normalised here).
        logit_scale: log inverse temperature (its own parameter in GroupViT), clamped to 100 after exp.
    """
    b, k, _ = prompts.shape
    image, prompts = F.normalize(image, dim=-1), F.normalize(prompts, dim=-1).flatten(0, 1)  # (B, D), (B*K, D)
    all_image, offset = _gather(image)
    all_prompts, _ = _gather(prompts)
    scale = logit_scale.exp().clamp(max=100)
    owner = torch.arange(all_prompts.shape[0], device=image.device) // k  # image index of each gathered prompt
    mine = torch.arange(b, device=image.device) + offset
    target_img = (owner[None] == mine[:, None]).to(image.dtype) / k  # (B, W*B*K)
    target_txt = (torch.arange(all_image.shape[0], device=image.device)[None] == mine.repeat_interleave(k)[:, None])
    return 0.5 * (_soft_cross_entropy(scale * image @ all_prompts.t(), target_img)
                  + _soft_cross_entropy(scale * prompts @ all_image.t(), target_txt.to(image.dtype)))


# ---------------------------------------------------------------------------------------------- segmentation
def group_to_class_segmentation(assignments: Sequence[torch.Tensor], groups: torch.Tensor, image: torch.Tensor,
                                text: torch.Tensor, logit_scale: float | torch.Tensor, grid: Tuple[int, int],
                                output_size: Tuple[int, int], top_k: int = 5,
                                bg_threshold: Optional[float] = None) -> torch.Tensor:
    """GroupViT's zero-shot segmentation of one image (the authors' `GroupViTSegInference.encode_decode`).

    1. Pixel-to-group: the stages' soft assignments multiplied, (N, G_1) @ (G_1, G_2) @ ... = (N, G), resized
       bilinearly from the patch grid to `output_size`; each pixel takes its argmax group.
    2. Group-to-class: p = softmax(scale * cos(group, class)) over the classes, times softmax of the same logits
       restricted to the `top_k` classes the whole image (mean token) is most similar to (0 = all classes).
    3. A pixel's class scores are its group's. With `bg_threshold`, a background channel (returned first) is 1
       where a pixel's best score is below min(bg_threshold, the best score of any group), else 0.

    Args:
        assignments: per stage (G_i, G_{i-1}) soft assignments, G_0 = N patches (one image, no batch axis).
        groups: (G, D) projected segment embeddings; image: (D,) projected image embedding.
        text: (C, D) class embeddings (foreground classes only when `bg_threshold` is given).
        grid: the (h, w) patch grid, N = h * w.
    Returns:
        (C, H, W) scores, or (1 + C, H, W) with the background channel first.
    """
    pix = assignments[0].t()  # (N, G_1)
    for a in assignments[1:]:
        pix = pix @ a.t()  # (N, G_i)
    n, g = pix.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not form the {grid} patch grid")
    pix = F.interpolate(pix.t().reshape(1, g, *grid), size=tuple(output_size), mode="bilinear",
                        align_corners=False)[0]  # (G, H, W)
    group = pix.argmax(0)  # (H, W)
    groups, image, text = F.normalize(groups, dim=-1), F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale * groups @ text.t()  # (G, C)
    probs = logits.softmax(-1)
    if top_k > 0:
        image_probs = (logit_scale * image @ text.t()).softmax(-1)
        keep = torch.zeros_like(image_probs, dtype=torch.bool)
        keep[image_probs.topk(min(top_k, text.shape[0])).indices] = True
        probs = logits.masked_fill(~keep, float("-inf")).softmax(-1) * probs
    # each pixel takes its group's row (a gather; F.one_hot would read its input's range back on the host)
    scores = probs.t()[:, group]  # (C, H, W)
    if bg_threshold is None:
        return scores
    threshold = probs.max().clamp(max=float(bg_threshold))  # on the device: no host read
    background = (scores.max(0).values < threshold).to(scores.dtype)
    return torch.cat([background[None], scores])
