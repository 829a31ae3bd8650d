"""Bad data on disk: missing label maps, labels of the wrong size, 16-bit greyscale images."""
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from PIL import Image

from ovseg.data import BENCHMARKS_BY_NAME, register_all_ovseg_datasets
from ovseg.data.datasets import load_semantic
from ovseg.data.image_io import read_image
from ovseg.data.mappers import MaskSemanticMapper

ADE_VAL = BENCHMARKS_BY_NAME["ade20k_150_sem_seg_val"]
VOC_VAL = BENCHMARKS_BY_NAME["pascal_voc_21_sem_seg_val"]


def _semantic_split(root, bench, stems, labelled, size=(24, 32)):
    """Images for `stems` and label maps for `labelled` in the row's layout."""
    rng = np.random.default_rng(0)
    layout = ((bench.image_dir, stems, bench.image_ext), (bench.sem_seg_dir, labelled, bench.label_ext))
    for folder, names, ext in layout:
        os.makedirs(root / folder, exist_ok=True)
        for n in names:
            arr = rng.integers(0, 255, (*size, 3) if folder == bench.image_dir else size, dtype=np.uint8)
            Image.fromarray(arr).save(root / folder / f"{n}.{ext}")


def test_image_without_label_map_is_an_error_naming_it(tmp_path):
    stems = [f"ADE_val_{i:08d}" for i in range(1, 7)]
    _semantic_split(tmp_path, ADE_VAL, stems, stems[:2] + stems[3:])  # the third image lost its label map
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) .* no label map.*ADE_val_00000003\.png"):
        load_semantic(ADE_VAL, str(tmp_path))
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / ADE_VAL.sem_seg_dir / f"{stems[2]}.png")
    assert len(load_semantic(ADE_VAL, str(tmp_path))) == 6
    # ... and through the catalog, as evaluation loads it
    register_all_ovseg_datasets(str(tmp_path))
    try:
        os.remove(tmp_path / ADE_VAL.sem_seg_dir / f"{stems[5]}.png")
        with pytest.raises(FileNotFoundError, match="ADE_val_00000006"):
            DatasetCatalog.get(ADE_VAL.name)
    finally:
        register_all_ovseg_datasets()


def test_label_map_without_image_and_shared_image_folders(tmp_path):
    stems = ["2008_000001", "2008_000002", "2008_000003"]
    _semantic_split(tmp_path, VOC_VAL, stems + ["2008_000099"], stems)  # JPEGImages also holds a train image
    assert [r["image_id"] for r in load_semantic(VOC_VAL, str(tmp_path))] == stems
    os.remove(tmp_path / VOC_VAL.image_dir / "2008_000002.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 label map\(s\) .* no image.*2008_000002\.jpg"):
        load_semantic(VOC_VAL, str(tmp_path))


def test_label_of_another_size_names_both_files(tmp_path):
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "a.png")
    mapper = MaskSemanticMapper(augmentations=[T.ResizeShortestEdge(64, 128)])
    with pytest.raises(ValueError, match=r"a\.png' is 40x30 .* image '.*a\.jpg' is 48x32"):
        mapper({"file_name": str(tmp_path / "a.jpg"), "sem_seg_file_name": str(tmp_path / "a.png")})


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    grey = np.arange(24 * 32, dtype=np.int64).reshape(24, 32) * 85  # 0 .. 65195
    grey[0, 0], grey[0, 1] = 65535, 257
    path = tmp_path / "g16.png"
    Image.fromarray(grey.astype(np.uint16)).save(path)
    expected = np.rint(grey / 257.0).astype(np.uint8)  # the full 16-bit range onto 0..255
    rgb = read_image(str(path), "RGB")
    assert rgb.dtype == np.uint8 and rgb.shape == (24, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)
    assert rgb[0, 0, 0] == 255 and rgb[0, 1, 0] == 1
    # 8-bit images are read exactly as detectron2 reads them
    from detectron2.data.detection_utils import read_image as d2_read

    Image.fromarray(expected).save(tmp_path / "g8.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "g8.png"), "BGR"), d2_read(str(tmp_path / "g8.png"), "BGR"))
    # the training mapper feeds the scaled image
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / "g16_label.png")
    out = MaskSemanticMapper(augmentations=[])({"file_name": str(path), "sem_seg_file_name":
                                                str(tmp_path / "g16_label.png")})
    np.testing.assert_array_equal(out["image"][0].numpy(), expected)

