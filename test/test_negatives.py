"""Negative pasting for DenseHybrid: masks, ignore labels, pixels copied, determinism."""

from __future__ import annotations

import pytest
import torch

from training.negatives import paste_negative

H, W = 32, 64


def _inlier() -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    target = torch.full((H, W), 7, dtype=torch.long)
    return image, target


def _negative(h: int = 20, w: int = 24) -> torch.Tensor:
    # Distinct non-zero values per pixel so copied pixels can be traced to their source.
    values = torch.arange(1, h * w + 1).view(1, h, w) % 250 + 1
    return torch.cat([values, values, values]).to(torch.uint8)


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def test_rectangle_mode_pastes_a_solid_rectangle_with_ignore_label():
    image, target = _inlier()
    negative = _negative()
    gen = torch.Generator().manual_seed(3)
    new_image, new_target, mask = paste_negative(image, target, negative, gen, p_rect=1.0)
    top, bottom, left, right = _bbox(mask)
    assert mask.sum().item() == (bottom - top) * (right - left)  # solid rectangle
    assert 16 <= bottom - top <= 20 and 16 <= right - left <= 24
    assert (new_target[mask] == 255).all() and (new_target[~mask] == 7).all()
    assert (new_image[:, ~mask] == 0).all() and (new_image[:, mask] > 0).all()
    # The patch is a contiguous window of the negative.
    patch = new_image[0, top:bottom, left:right]
    hits = [
        (i, j)
        for i in range(negative.shape[1] - patch.shape[0] + 1)
        for j in range(negative.shape[2] - patch.shape[1] + 1)
        if torch.equal(negative[0, i : i + patch.shape[0], j : j + patch.shape[1]], patch)
    ]
    assert hits
    assert image.sum() == 0 and (target == 7).all()  # inputs untouched


def test_instance_mode_pastes_the_union_of_instance_masks():
    image, target = _inlier()
    negative = _negative()
    instances = torch.zeros(20, 24, dtype=torch.long)
    instances[2:6, 3:9] = 1  # 24 px
    instances[10:13, 15:20] = 2  # 15 px
    gen = torch.Generator().manual_seed(5)
    new_image, new_target, mask = paste_negative(
        image, target, negative, gen, instances=instances, p_rect=0.0
    )
    assert mask.sum().item() == 24 + 15
    top, _, left, _ = _bbox(mask)
    # The union's bounding box starts at instance row 2, column 3 of the negative.
    shifted = torch.zeros_like(mask)
    shifted[top : top + 11, left : left + 17] = instances[2:13, 3:20] > 0
    assert torch.equal(mask, shifted)
    assert torch.equal(new_image[:, top : top + 4, left : left + 6], negative[:, 2:6, 3:9])
    assert (new_target[mask] == 255).all() and (new_target[~mask] == 7).all()


def test_same_seed_same_sample_and_positions_vary_with_the_seed():
    image, target = _inlier()
    negative = _negative()
    instances = torch.zeros(20, 24, dtype=torch.long)
    instances[4:9, 4:9] = 3

    def sample(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return paste_negative(image, target, negative, gen, instances=instances)

    a, b = sample(11), sample(11)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    corners = {_bbox(sample(s).outlier_mask)[::2] for s in range(20)}
    assert len(corners) > 5
    areas = {int(sample(s).outlier_mask.sum()) for s in range(20)}
    assert 25 in areas and any(a != 25 for a in areas)  # both modes occur at p = 0.5


def test_no_instances_falls_back_to_rectangle_and_big_negatives_are_clipped():
    image, target = _inlier()
    gen = torch.Generator().manual_seed(0)
    empty = torch.zeros(20, 24, dtype=torch.long)
    _, _, mask = paste_negative(image, target, _negative(), gen, instances=empty, p_rect=0.0)
    top, bottom, left, right = _bbox(mask)
    assert mask.sum().item() == (bottom - top) * (right - left) > 0

    big = _negative(80, 100)
    everything = torch.ones(80, 100, dtype=torch.long)
    _, new_target, mask = paste_negative(image, target, big, gen, instances=everything, p_rect=0)
    assert mask.all() and (new_target == 255).all()


def test_rectangle_sides_take_every_size_from_min_size_to_the_negative_inclusive():
    image, target = _inlier()
    heights, widths = set(), set()
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        _, _, mask = paste_negative(image, target, _negative(20, 24), gen, p_rect=1.0)
        top, bottom, left, right = _bbox(mask)
        heights.add(bottom - top)
        widths.add(right - left)
    assert heights == set(range(16, 21)) and widths == set(range(16, 25))


def test_an_instance_box_larger_than_the_image_is_cut_to_a_random_window_inside_it():
    image, target = _inlier()
    # Channel 0 holds the row, channel 1 the column: a pasted pixel names its source.
    rows = torch.arange(80).view(80, 1).expand(80, 100)
    cols = torch.arange(100).view(1, 100).expand(80, 100)
    negative = torch.stack([rows, cols, rows]).to(torch.uint8)
    instances = torch.zeros(80, 100, dtype=torch.long)
    instances[2:60, 5:90] = 4  # 58×85 box, larger than the 32×64 image
    corners = set()
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        new_image, _, mask = paste_negative(
            image, target, negative, gen, instances=instances, p_rect=0.0
        )
        assert mask.all()
        top, left = int(new_image[0, 0, 0]), int(new_image[1, 0, 0])
        assert 2 <= top <= 60 - H and 5 <= left <= 90 - W
        assert torch.equal(new_image, negative[:, top : top + H, left : left + W])
        corners.add((top, left))
    tops, lefts = {t for t, _ in corners}, {c for _, c in corners}
    assert len(tops) > 3 and len(lefts) > 3  # the window moves both down and across


def test_float_images_and_shape_errors():
    image = torch.rand(3, H, W)
    target = torch.zeros(H, W, dtype=torch.long)
    negative = torch.full((3, 18, 18), 2.0)
    gen = torch.Generator().manual_seed(1)
    new_image, _, mask = paste_negative(image, target, negative, gen, p_rect=1.0)
    assert new_image.dtype == torch.float32 and (new_image[:, mask] == 2.0).all()
    with pytest.raises(ValueError, match="channels"):
        paste_negative(image, target, torch.zeros(1, 8, 8), gen)
    with pytest.raises(ValueError, match="target"):
        paste_negative(image, target[:4], negative, gen)
    with pytest.raises(ValueError, match="instances"):
        paste_negative(image, target, negative, gen, instances=torch.ones(3, 3))


def test_scene_sample_keeps_decoys_as_outliers_through_augmentation():
    from training.train_densehybrid import scene_sample

    image = torch.arange(3 * 16 * 32, dtype=torch.float32).reshape(3, 16, 32).to(torch.uint8)
    label = torch.zeros(16, 32, dtype=torch.long)
    label[:4] = 10  # sky on top
    decoys = torch.zeros(16, 32, dtype=torch.bool)
    decoys[8:12, 20:26] = True
    config = {"crop_size": [16, 32], "scale_range": [1.0, 1.0], "flip": 1.0}
    sample = scene_sample([(image, label, decoys)], torch.Generator().manual_seed(0), config)
    flipped = decoys.flip(-1)
    assert torch.equal(sample["outlier"], flipped)  # flipped with the image
    assert (sample["label"][flipped] == 255).all()
    assert set(sample["label"].unique().tolist()) == {0, 10, 255}
    assert torch.equal(sample["image"], image.flip(-1))
    # Rescaled: the mask follows (nearest), and no marker value leaks into the labels.
    config["scale_range"] = [2.0, 2.0]
    sample = scene_sample([(image, label, decoys)], torch.Generator().manual_seed(1), config)
    assert 0 < int(sample["outlier"].sum()) and set(sample["label"].unique().tolist()) <= {
        0,
        10,
        255,
    }
