"""The demo CLI: a subprocess on the bundled image, and its handling of bad input."""
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import cv2
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
    assert demo.main(["--vocab", "sky", "--input", str(bad)] + TINY) == demo.EXIT_UNREADABLE_IMAGES
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


def _digest(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def demo_log(caplog):
    """The demo's logger does not propagate (detectron2's setup_logger): listen to it directly."""
    log = logging.getLogger("ovseg.demo")
    log.addHandler(caplog.handler)
    yield caplog
    log.removeHandler(caplog.handler)


def test_demo_never_overwrites_inputs_and_keeps_outputs_distinct(tmp_path):
    src, other, out = tmp_path / "src", tmp_path / "other", tmp_path / "out"
    src.mkdir()
    other.mkdir()
    Image.open(EXAMPLE).save(src / "a.png")
    Image.open(EXAMPLE).convert("L").save(src / "a.jpg")
    Image.open(EXAMPLE).convert("RGBA").save(other / "a.png")
    before = _digest(src), _digest(other)
    with mock.patch.object(demo, "Predictor", side_effect=AssertionError("checks come first")):
        with pytest.raises(ValueError, match="folder the input images come from"):
            demo.main(["--vocab", "sky", "--input", str(src), "--output", str(src)] + TINY)
        with pytest.raises(ValueError, match="is an input image"):
            demo.main(["--vocab", "sky", "--input", str(src / "a.png"), "--output", str(src / "a.png")] + TINY)
    assert demo.main(["--vocab", "sky", "--input", str(src), str(other), "--output", str(out)] + TINY) == 0
    assert (_digest(src), _digest(other)) == before
    # every stem is "a": each output is named by its path from the inputs' common folder
    expected = {rel.replace("/", "__").replace(".", "_") + ".png" for rel in ("src/a.jpg", "src/a.png", "other/a.png")}
    assert set(os.listdir(out)) == expected
    assert demo.main(["--vocab", "sky", "--input", str(src / "a.png"), "--output", str(out / "one.png")] + TINY) == 0
    assert (out / "one.png").exists()


def test_demo_skips_unreadable_images_and_reports(tmp_path, demo_log):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    Image.open(EXAMPLE).save(src / "good1.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    Image.open(EXAMPLE).save(src / "good2.png")
    vocab = tmp_path / "many.txt"
    vocab.write_text("\n".join(f"class {i}" for i in range(300)))
    assert demo.main(["--vocab", str(vocab), "--input", str(src), "--output", str(out)] + TINY) == \
        demo.EXIT_UNREADABLE_IMAGES
    assert sorted(os.listdir(out)) == ["good1.png", "good2.png"]  # the run went on past the broken file
    assert "skipped: cannot read image" in demo_log.text
    assert "1 of 3 images could not be read" in demo_log.text and "broken.jpg" in demo_log.text
    # a long vocabulary is logged as a count and a few names
    line = next(r.getMessage() for r in demo_log.records if r.getMessage().startswith("vocabulary"))
    assert "300 classes" in line and "(+280 more)" in line and len(line) < 500


def _write_video(path, frames=3):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()


def test_demo_video_checks_come_before_the_model(tmp_path):
    video = tmp_path / "clip.mp4"
    _write_video(video)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    cases = [
        (["--video-input", str(text), "--output", str(tmp_path)], "reads no frame"),
        (["--video-input", str(EXAMPLE), "--output", str(tmp_path)], "is an image: use --input"),
        (["--video-input", str(video), "--output", str(tmp_path / "out.avi")], "written as .mp4"),
        (["--video-input", str(video), "--output", str(video)], "input video"),
        (["--input", str(EXAMPLE), "--output", str(tmp_path / "vis.gif")], "cannot write '.gif'"),
    ]
    if not demo.opencv_has_gui():  # what we install: headless OpenCV
        cases += [(["--video-input", str(video)], "headless.*--output"), (["--webcam"], "headless.*--output")]
    with mock.patch.object(demo, "Predictor", side_effect=AssertionError("checks come first")):
        for args, match in cases:
            with pytest.raises(ValueError, match=match):
                demo.main(["--vocab", "sky"] + args + TINY)


def test_demo_video_to_file(tmp_path):
    video = tmp_path / "clip.mp4"
    _write_video(video, frames=3)
    assert demo.main(["--vocab", "sky,grass", "--video-input", str(video), "--output", str(tmp_path / "out")]
                     + TINY) == 0
    cap = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 3
