"""ATSS assignment on constructed cases whose correct answer is worked out in the comments."""
import statistics

import torch

from gfocal.modeling.atss import atss_assign, center_distances, nearest_candidates, pad_gt_boxes

# One row of four 10x10 anchors with centers at x = 5, 15, 25, 35 (y = 5).
ROW = torch.tensor(
    [[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [20.0, 0.0, 30.0, 10.0], [30.0, 0.0, 40.0, 10.0]]
)


def assign(gts, anchors=ROW, levels=None, topk=3):
    gt_boxes, valid = pad_gt_boxes([torch.tensor(gts, dtype=torch.float32).reshape(-1, 4)])
    return atss_assign(anchors, levels or [len(anchors)], gt_boxes, valid, topk)[0].tolist()


def test_known_assignment():
    # GT [0, 0, 14, 10], center (7, 5). Nearest 3 anchors: 0 (d=2), 1 (d=8), 2 (d=18).
    # IoUs: 100/140, 40/200, 0. Threshold = mean + unbiased std.
    ious = [100 / 140, 40 / 200, 0.0]
    threshold = statistics.mean(ious) + statistics.stdev(ious)
    assert ious[0] >= threshold > ious[1]
    assert assign([[0, 0, 14, 10]]) == [0, -1, -1, -1]


def test_anchor_claimed_by_two_gts_goes_to_highest_iou():
    # GT A [0,0,14,10] takes anchor 0 alone (above); GT B [0,0,12,10] also does
    # (IoUs 100/120, 20/200, 0, threshold ~0.77), with the higher IoU 0.83 > 0.71: B wins.
    assert assign([[0, 0, 14, 10], [0, 0, 12, 10]]) == [1, -1, -1, -1]
    # Order of the GTs does not matter.
    assert assign([[0, 0, 12, 10], [0, 0, 14, 10]]) == [0, -1, -1, -1]


def test_gt_without_anchor_center_inside_gets_nothing():
    # GT [36, 0, 40, 10]: anchor 3 (center x=35) has IoU 0.4 above the threshold, but its
    # center lies outside the GT, so it is not a positive.
    assert assign([[36, 0, 40, 10]]) == [-1, -1, -1, -1]


def test_level_with_fewer_anchors_than_topk():
    # Level 1: the row above; level 2: a single 20x20 anchor centered at (10, 10).
    anchors = torch.cat([ROW, torch.tensor([[0.0, 0.0, 20.0, 20.0]])])
    result = assign([[0, 0, 14, 10]], anchors=anchors, levels=[4, 1], topk=9)
    # topk = 9 becomes 4 and 1: all 5 anchors are candidates. IoUs: 100/140, 40/200, 0, 0, 140/400.
    ious = [100 / 140, 40 / 200, 0.0, 0.0, 140 / 400]
    threshold = statistics.mean(ious) + statistics.stdev(ious)
    assert ious[0] >= threshold > ious[4]
    assert result == [0, -1, -1, -1, -1]


def test_no_gt_and_padding():
    assert assign([]) == [-1, -1, -1, -1]
    # A batch of an image with two GTs and one with none: padding changes nothing.
    gt_boxes, valid = pad_gt_boxes(
        [torch.tensor([[0.0, 0, 14, 10], [0, 0, 12, 10]]), torch.zeros((0, 4))]
    )
    batch = atss_assign(ROW, [4], gt_boxes, valid, 3)
    assert batch.tolist() == [[1, -1, -1, -1], [-1, -1, -1, -1]]


def test_batched_equals_per_image():
    torch.manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(0, 64, 8.0), torch.arange(0, 64, 8.0), indexing="ij")
    centers = torch.stack([xs.flatten(), ys.flatten()], dim=1)
    level1 = torch.cat([centers - 16, centers + 16], dim=1)
    coarse = centers[::5]
    level2 = torch.cat([coarse - 32, coarse + 32], dim=1)
    anchors = torch.cat([level1, level2])
    levels = [len(level1), len(level2)]
    images = []
    for n in (3, 1, 5):
        xy = torch.rand(n, 2) * 40
        wh = torch.rand(n, 2) * 30 + 4
        images.append(torch.cat([xy, xy + wh], dim=1))
    gt_boxes, valid = pad_gt_boxes(images)
    batched = atss_assign(anchors, levels, gt_boxes, valid, topk=9)
    for i, boxes in enumerate(images):
        single = atss_assign(anchors, levels, boxes[None], torch.ones(1, len(boxes), dtype=torch.bool), 9)
        assert torch.equal(batched[i], single[0])
    assert (batched >= 0).any()


def test_nearest_candidates_exact_on_a_near_tie():
    # Anchor centers on a stride-8 grid of an 800x1344 image; the GT center (1200.502, 701.5)
    # makes the 9th and 10th nearest centers differ by ~1e-3 px. The exact distances (computed
    # from coordinate differences) pick the same 9 as float64; torch.cdist's default mode
    # (a matrix-product formula for large inputs) rounds the squared norms at ~1e6 and swaps them.
    xs, ys = torch.arange(0, 1344, 8.0), torch.arange(0, 800, 8.0)
    centers = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    gt_center = torch.tensor([[[1200.5 + 0.002, 701.5]]])

    exact64 = (centers.double()[:, None, :] - gt_center.double()[0]).pow(2).sum(-1).sqrt()[:, 0]
    ordered = exact64.sort().values
    assert 0 < ordered[9] - ordered[8] < 2e-3  # a real near-tie between the 9th and 10th
    want = exact64.topk(9, largest=False).indices.sort().values

    got = nearest_candidates(centers, [len(centers)], gt_center, topk=9)[0, :, 0].sort().values
    assert torch.equal(got, want)
    assert torch.allclose(center_distances(centers, gt_center)[0, :, 0].double(), exact64, atol=1e-4)

    with_cdist = torch.cdist(centers[None], gt_center)[0, :, 0].topk(9, largest=False).indices
    assert not torch.equal(with_cdist.sort().values, want)  # what the old code got wrong


def test_nearest_candidates_per_level_offsets():
    # Two levels: 3 anchors (centers x = 0, 10, 20) then 2 anchors (x = 100, 200); topk 2.
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [100.0, 0.0], [200.0, 0.0]])
    got = nearest_candidates(centers, [3, 2], torch.tensor([[[12.0, 0.0]]]), topk=2)
    assert got[0, :, 0].tolist() == [1, 2, 3, 4]  # level 1: 10, 20 nearest; level 2: both
