"""Region pooling against brute-force computations."""
import torch

from ovseg.modeling import pool_boxes, pool_masks


def test_pool_masks_equals_manual_average():
    torch.manual_seed(0)
    dense = torch.randn(2, 5, 6, 7)
    masks = (torch.rand(2, 3, 6, 7) > 0.5).float()
    masks[1, 2] = 0  # an empty mask pools to zeros
    out = pool_masks(dense, masks)
    for b in range(2):
        for q in range(3):
            sel = masks[b, q].bool()
            ref = dense[b][:, sel].mean(dim=1) if sel.any() else torch.zeros(5)
            torch.testing.assert_close(out[b, q], ref)


def test_pool_masks_soft_masks_at_other_resolution():
    dense = torch.randn(1, 4, 3, 3)
    masks = torch.rand(1, 2, 3, 3)
    out = pool_masks(dense, masks)
    ref = torch.stack([(dense[0] * m).sum(dim=(1, 2)) / m.sum() for m in masks[0]])
    torch.testing.assert_close(out[0], ref)
    # masks at input resolution (stride 2): an all-ones mask gives the global mean either way
    torch.testing.assert_close(pool_masks(dense, torch.ones(1, 1, 6, 6))[0, 0], dense[0].mean(dim=(1, 2)))


def test_pool_boxes_linear_field_gives_box_centre():
    # Bilinear sampling reproduces a linear field exactly, so the RoIAlign average over a box that stays
    # inside the map is the field's value at the box centre (in feature coordinates, pixel centres at +0.5).
    stride = 16
    h, w = 8, 10
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    dense = torch.stack([2 * xs + 3 * ys + 1, -xs + 0.5 * ys, torch.ones_like(xs)])[None]  # (1, 3, h, w)
    boxes = torch.tensor([[16.0, 16.0, 80.0, 48.0], [24.0, 40.0, 120.0, 100.0]])
    out = pool_boxes(dense, [boxes], stride=stride)
    for box, feat in zip(boxes, out):
        cx = (box[0] + box[2]) / 2 / stride - 0.5
        cy = (box[1] + box[3]) / 2 / stride - 0.5
        ref = torch.stack([2 * cx + 3 * cy + 1, -cx + 0.5 * cy, torch.tensor(1.0)])
        torch.testing.assert_close(feat, ref, atol=1e-4, rtol=1e-4)


def test_pool_boxes_batch_index_format_matches_list_format():
    dense = torch.randn(2, 4, 5, 5)
    b0, b1 = torch.tensor([[0.0, 0, 40, 40]]), torch.tensor([[10.0, 20, 60, 70], [0, 0, 80, 80]])
    as_list = pool_boxes(dense, [b0, b1], stride=16)
    rois = torch.cat([torch.cat([torch.zeros(1, 1), b0], 1), torch.cat([torch.ones(2, 1), b1], 1)])
    torch.testing.assert_close(pool_boxes(dense, rois, stride=16), as_list)
    assert as_list.shape == (3, 4)
