
import pytest
import torch

from ovseg.modeling.clip_model import load_open_clip
from ovseg.modeling.tiny_models import register_tiny_models

# the tiny random CLIPs under their open_clip names, for tests that use open_clip directly (tokenizers, configs)
register_tiny_models()

# One intra-op thread: the tiny models' ops are too small to split, and on a shared (loaded) 2-core machine a second
# OpenMP thread spin-waits for its partner. Measured (tiny mask segmentor train step, batch 4 at 96 px, load ~15):
# 1 thread 0.03 CPU s / 0.4 s wall per step, 2 threads 1.5 CPU s / 11-14 s wall.
torch.set_num_threads(1)

@pytest.fixture
def tiny_clip():
    """Factory: a freshly built, seeded tiny open_clip model (random weights)."""

    def make(name: str = "ovseg-tiny-ViT-16", seed: int = 0):
        torch.manual_seed(seed)
        return load_open_clip(name, "")

    return make
