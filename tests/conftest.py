import os

import pytest
import torch

from ovseg.modeling.clip_model import load_open_clip
from ovseg.modeling.tiny_models import register_tiny_models

# the tiny random CLIPs under their open_clip names, for tests that use open_clip directly (tokenizers, configs)
register_tiny_models()

# keep tests deterministic and light on the 2-core CI machine
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

@pytest.fixture
def tiny_clip():
    """Factory: a freshly built, seeded tiny open_clip model (random weights)."""

    def make(name: str = "ovseg-tiny-ViT-16", seed: int = 0):
        torch.manual_seed(seed)
        return load_open_clip(name, "")

    return make
