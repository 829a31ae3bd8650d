"""ovseg.data.image_io: the one home of the COCO panoptic colour code, image->tensor and the image suffixes; and the
import layering it restores (data/ and the prepare scripts never import evaluation/ or modeling/)."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg.data.image_io import IMAGE_SUFFIXES, id2rgb, image_to_tensor, rgb2id

REPO = Path(__file__).resolve().parents[1]


def test_panoptic_colour_code_matches_the_written_out_rule():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256**3, (5, 7))
    ids[0, :4] = [0, 255, 256, 256**3 - 1]
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 7, 3)
    for (y, x), v in np.ndenumerate(ids):  # COCO panoptic: id = R + 256 G + 256^2 B, per pixel
        r, g, b = (int(c) for c in rgb[y, x])
        assert r + 256 * g + 65536 * b == v and max(r, g, b) < 256
    np.testing.assert_array_equal(rgb2id(rgb), ids)
    assert rgb2id(rgb).dtype == np.int64


def test_panoptic_colour_code_refuses_what_it_cannot_encode():
    with pytest.raises(ValueError, match="segment ids must be in 0..16777215"):
        id2rgb(np.array([[256**3]]))
    with pytest.raises(ValueError, match="segment ids"):
        id2rgb(np.array([[-1]]))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        rgb2id(np.zeros((4, 4), np.uint8))


def test_image_to_tensor_is_channels_first():
    image = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    out = image_to_tensor(image[:, ::-1])  # a negative-stride view, as a BGR flip gives
    assert out.shape == (3, 4, 6) and out.dtype == torch.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[c].numpy(), image[:, ::-1, c])


def test_image_suffixes_are_lower_case_and_written_once():
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)
    files = [p for folder in ("ovseg", "demo", "tools", "datasets") for p in (REPO / folder).rglob("*.py")]
    lists = [str(p.relative_to(REPO)) for p in files if '".webp"' in p.read_text()]
    assert lists == ["ovseg/data/image_io.py"]


def _ovseg_imports(path: Path) -> list:
    """Absolute ovseg modules imported by a file (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.append(".".join(base + ([node.module] if node.module else [])))
            else:
                out.append(node.module or "")
    return [m for m in out if m.startswith("ovseg")]


@pytest.mark.parametrize("folder", ["ovseg/data", "datasets"])
def test_data_layer_never_imports_evaluation_or_modeling(folder):
    offenders = {str(p.relative_to(REPO)): m for p in sorted((REPO / folder).rglob("*.py"))
                 for m in _ovseg_imports(p) if m.startswith(("ovseg.evaluation", "ovseg.modeling"))}
    assert not offenders, offenders
