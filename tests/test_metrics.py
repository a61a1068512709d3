import math

import numpy as np
import pytest
import torch

from metrics import (BCEDiceLoss, components, dice, hausdorff95, iou, isbi_score, lesion_metrics, precision,
                     relative_volume_difference, sensitivity, volume_correlation)


def empty(shape=(10, 10, 10)):
    return torch.zeros(shape, dtype=torch.uint8)


def box(lo, hi, shape=(10, 10, 10)):
    m = empty(shape)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return m


def test_voxel_metrics_on_known_overlap():
    truth = box((0, 0, 0), (4, 5, 1))  # 20 voxels
    pred = box((2, 0, 0), (6, 5, 1))  # 20 voxels, 10 shared
    assert dice(pred, truth).item() == pytest.approx(0.5)
    assert iou(pred, truth).item() == pytest.approx(10 / 30)
    assert precision(pred, truth).item() == pytest.approx(0.5)
    assert sensitivity(pred, truth).item() == pytest.approx(0.5)
    assert relative_volume_difference(pred, truth).item() == pytest.approx(0.0)
    bigger = box((0, 0, 0), (8, 5, 1))
    assert relative_volume_difference(bigger, truth).item() == pytest.approx(1.0)
    assert relative_volume_difference(truth, bigger).item() == pytest.approx(-0.5)


def test_metrics_accept_bool_uint8_and_float_and_stay_on_device():
    truth = box((0, 0, 0), (3, 3, 3))
    for cast in (torch.bool, torch.uint8, torch.float32):
        out = dice(truth.to(cast), truth.to(cast))
        assert out.item() == 1.0 and out.ndim == 0 and out.device == truth.device


@pytest.mark.parametrize("metric", [dice, iou, precision, sensitivity])
def test_empty_against_empty_scores_one(metric):
    assert metric(empty(), empty()).item() == 1.0


@pytest.mark.parametrize("metric", [dice, iou, precision, sensitivity])
def test_empty_against_lesion_scores_zero(metric):
    lesion = box((1, 1, 1), (2, 2, 2))
    assert metric(empty(), lesion).item() == 0.0
    assert metric(lesion, empty()).item() == 0.0


def test_relative_volume_difference_of_empty_truth():
    assert relative_volume_difference(empty(), empty()).item() == 0.0
    assert math.isinf(relative_volume_difference(box((1, 1, 1), (2, 2, 2)), empty()).item())


def test_one_voxel_lesions():
    a, b = box((3, 3, 3), (4, 4, 4)), box((3, 3, 4), (4, 4, 5))
    assert dice(a, a).item() == 1.0 and dice(a, b).item() == 0.0
    assert lesion_metrics(a, a)["ltpr"] == 1.0
    assert lesion_metrics(b, a) == {"ltpr": 0.0, "lfpr": 1.0, "truth_lesions": 1, "pred_lesions": 1,
                                    "detected_lesions": 0, "false_lesions": 1}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice(empty((4, 4, 4)), empty((4, 4, 5)))


def two_diagonal_voxels(kind):
    m = np.zeros((5, 5, 5), bool)
    m[1, 1, 1] = True
    if kind == "edge":
        m[2, 2, 1] = True  # shares an edge
    else:
        m[2, 2, 2] = True  # shares a corner only
    return m


@pytest.mark.parametrize("kind, expected", [("edge", {6: 2, 18: 1, 26: 1}), ("corner", {6: 2, 18: 2, 26: 1})])
def test_diagonal_lesions_under_each_connectivity(kind, expected):
    mask = two_diagonal_voxels(kind)
    for connectivity, count in expected.items():
        assert components(mask, connectivity)[1] == count
        assert lesion_metrics(mask, mask, connectivity)["truth_lesions"] == count


def test_unknown_connectivity_is_an_error():
    with pytest.raises(ValueError, match="connectivity"):
        components(np.zeros((3, 3, 3)), 8)


def test_lesion_detection_counts():
    truth = np.zeros((20, 20, 20), bool)
    truth[2:5, 2:5, 2:5] = True  # found (one shared voxel is enough)
    truth[10:13, 10:13, 10:13] = True  # missed
    pred = np.zeros_like(truth)
    pred[4:7, 4:7, 4:7] = True  # touches the first lesion at one voxel
    pred[15:17, 15:17, 15:17] = True  # false positive
    pred[0, 19, 0] = True  # false positive
    m = lesion_metrics(torch.from_numpy(pred), torch.from_numpy(truth))
    assert m == {"ltpr": 0.5, "lfpr": 2 / 3, "truth_lesions": 2, "pred_lesions": 3,
                 "detected_lesions": 1, "false_lesions": 2}


def test_lesion_metrics_when_nothing_is_there():
    nothing = np.zeros((4, 4, 4), bool)
    lesion = nothing.copy()
    lesion[1, 1, 1] = True
    assert lesion_metrics(nothing, nothing)["ltpr"] == 1.0 and lesion_metrics(nothing, nothing)["lfpr"] == 0.0
    assert lesion_metrics(nothing, lesion)["ltpr"] == 0.0 and lesion_metrics(nothing, lesion)["lfpr"] == 0.0
    assert lesion_metrics(lesion, nothing)["lfpr"] == 1.0


def test_hausdorff95_of_a_shifted_cube_in_mm():
    a = np.zeros((30, 30, 30), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 3, axis=0)
    assert hausdorff95(a, a) == 0.0
    assert hausdorff95(a, b) == pytest.approx(3.0)
    assert hausdorff95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hausdorff95(a, np.zeros_like(a)) == math.inf
    assert hausdorff95(np.zeros_like(a), np.zeros_like(a)) == 0.0


def test_hausdorff95_matches_monai():
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(0)
    a = np.zeros((32, 32, 32), bool)
    b = np.zeros_like(a)
    a[8:20, 6:25, 10:18] = True
    b[10:22, 8:20, 9:16] = True
    b[rng.integers(0, 32, (30, 3)).T.tolist()] = True  # scattered false positives
    spacing = (1.0, 1.5, 2.0)
    ours = hausdorff95(a, b, spacing)
    theirs = monai_metrics.compute_hausdorff_distance(
        torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None], percentile=95, spacing=spacing).item()
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_isbi_score_of_a_perfect_prediction_is_one_and_of_nothing_is_low():
    truth = np.zeros((16, 16, 16), bool)
    truth[3:6, 3:6, 3:6] = True
    truth[10:12, 10:12, 10:12] = True
    assert isbi_score(truth, truth) == pytest.approx(1.0)
    assert isbi_score(truth, [truth, truth]) == pytest.approx(1.0)
    assert isbi_score(truth, truth, corr=1.0) == pytest.approx(1.0)
    # Nothing predicted: DSC 0, PPV 0, LTPR 0, LFPR 0 -> (1 - 0)/4 * 4/3.
    assert isbi_score(np.zeros_like(truth), truth) == pytest.approx(1 / 3)


def test_isbi_score_averages_two_raters():
    r1 = np.zeros((16, 16, 16), bool)
    r1[3:6, 3:6, 3:6] = True
    r2 = r1.copy()
    r2[10:12, 10:12, 10:12] = True  # a lesion only rater 2 saw
    both = isbi_score(r1, [r1, r2])
    assert both == pytest.approx((isbi_score(r1, r1) + isbi_score(r1, r2)) / 2)
    assert both < 1.0
    with pytest.raises(ValueError, match="one or two"):
        isbi_score(r1, [r1, r1, r1])


def test_volume_correlation():
    assert volume_correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        volume_correlation([1], [1])


def test_bce_dice_loss_formula():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 6, 6, 6)
    target = (torch.rand(1, 1, 6, 6, 6) > 0.7).float()
    p = torch.sigmoid(logits)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    expected = bce + 1 - 2 * (p * target).sum() / ((p * p).sum() + target.sum())
    torch.testing.assert_close(BCEDiceLoss()(logits, target), expected)


def test_bce_dice_loss_with_empty_mask_is_finite_and_pushes_predictions_down():
    logits = torch.zeros(1, 1, 6, 6, 6, requires_grad=True)
    loss = BCEDiceLoss()(logits, torch.zeros(1, 1, 6, 6, 6))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(math.log(2) + 1)
    assert (logits.grad > 0).all()  # gradient descent lowers every logit


def test_bce_dice_loss_is_float32_under_bf16_logits():
    logits = torch.randn(1, 1, 4, 4, 4).bfloat16()
    loss = BCEDiceLoss()(logits, torch.ones(1, 1, 4, 4, 4))
    assert loss.dtype == torch.float32
