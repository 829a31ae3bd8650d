"""The demo CLI: a subprocess on the bundled image, and its handling of bad input."""
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))
import demo  # noqa: E402

EXAMPLE = ROOT / "demo" / "examples" / "scene.jpg"
TINY = ["--random-init", "--opts", "MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16", "MODEL.TEXT.TEMPLATES", "single"]


@pytest.mark.slow
def test_demo_subprocess_default_config_on_bundled_image(tmp_path):
    """What `make demo` runs offline: the default ViT-B/16 config with random weights."""
    out = tmp_path / "vis.png"
    proc = subprocess.run(
        [sys.executable, "demo/demo.py", "--vocab", "sky,grass,house", "--input", str(EXAMPLE), "--output", str(out),
         "--random-init"], cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    vis = np.array(Image.open(out))
    assert vis.shape == (256, 384, 3)
    assert not np.array_equal(vis, np.array(Image.open(EXAMPLE).convert("RGB")))  # something was drawn
    log = proc.stdout + proc.stderr
    assert "scene.jpg: 384x256 in" in log and "%" in log


def test_demo_folder_glob_and_odd_images(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.open(EXAMPLE).convert("L").save(src / "gray.png")
    Image.open(EXAMPLE).convert("RGBA").save(src / "rgba.png")
    Image.open(EXAMPLE).convert("P").save(src / "palette.png")
    assert demo.main(["--vocab", "sky,grass", "--input", str(src), "--output", str(tmp_path / "out")] + TINY) == 0
    for n in ("gray", "rgba", "palette"):
        assert np.array(Image.open(tmp_path / "out" / f"{n}.png")).shape == (256, 384, 3)
    assert demo.main(["--vocab", "sky", "--input", str(src / "*.png"), "--output", str(tmp_path / "g")] + TINY) == 0
    assert len(os.listdir(tmp_path / "g")) == 3


def test_demo_bad_inputs(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image.*broken.jpg"):
        demo.main(["--vocab", "sky", "--input", str(bad)] + TINY)
    with pytest.raises(FileNotFoundError, match="no such file"):
        demo.main(["--vocab", "sky", "--input", str(tmp_path / "nope.jpg")] + TINY)
    with pytest.raises(ValueError, match="empty"):
        demo.main(["--vocab", " ", "--input", str(EXAMPLE)] + TINY)
    with pytest.raises(ValueError, match="duplicate"):
        demo.main(["--vocab", "sky,sky", "--input", str(EXAMPLE)] + TINY)


def test_demo_missing_weights(tmp_path):
    args = ["--vocab", "sky", "--input", str(EXAMPLE), "--opts", "MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16"]
    with pytest.raises(FileNotFoundError, match="MODEL.CLIP.PRETRAINED"):
        demo.main(args + ["MODEL.CLIP.PRETRAINED", str(tmp_path / "missing.pt")])
    # an unreachable download is exit code 3, which `make demo` turns into a --random-init run
    with mock.patch("open_clip.create_model", side_effect=OSError("offline")):
        assert demo.main(["--vocab", "sky", "--input", str(EXAMPLE)]) == demo.EXIT_NO_WEIGHTS
        # bad arguments are reported before any weights are looked for
        with pytest.raises(ValueError, match="empty"):
            demo.main(["--vocab", "", "--input", str(EXAMPLE)])
        with pytest.raises(FileNotFoundError, match="no such file"):
            demo.main(["--vocab", "sky", "--input", str(tmp_path / "nope.jpg")])
