import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from metrics import (LESION_COLUMNS, MIN_SCANS_FOR_CORR, REPORTED, SUMMARY_COLUMNS, BCEDiceLoss, components, dice,
                     hausdorff95, iou, isbi2015_score, lesion_metrics, lesion_summary, lesion_table, precision,
                     relative_volume_difference, scan_scores, sensitivity, summarise, volume_correlation)


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


def two_lesions(shape=(16, 16, 16)):
    truth = torch.zeros(shape, dtype=torch.bool)
    truth[3:6, 3:6, 3:6] = True
    truth[10:12, 10:12, 10:12] = True
    return truth


def test_scan_scores_holds_every_per_scan_metric():
    truth = two_lesions()
    pred = torch.roll(truth, 1, 0)
    pred[0, 15, 0] = True  # a false lesion
    scores = scan_scores(pred, truth, affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    assert scores["dsc"] == pytest.approx(dice(pred, truth).item())
    assert scores["iou"] == pytest.approx(iou(pred, truth).item())
    assert scores["ppv"] == pytest.approx(precision(pred, truth).item())
    assert scores["tpr"] == pytest.approx(sensitivity(pred, truth).item())
    assert scores["rvd"] == pytest.approx(relative_volume_difference(pred, truth).item())
    assert scores["hd95_mm"] == pytest.approx(hausdorff95(pred, truth, (1.0, 1.0, 2.0)))
    assert lesion_metrics(pred, truth).items() <= scores.items()
    assert scores["pred_volume_mm3"] == pred.sum().item() * 2 and scores["truth_volume_mm3"] == truth.sum().item() * 2
    assert set(REPORTED) <= set(scores)
    json.dumps(scores, allow_nan=False)


def test_undefined_scores_are_none_and_the_report_is_valid_json():
    lesion, nothing = two_lesions(), torch.zeros(16, 16, 16, dtype=torch.bool)
    missed = scan_scores(nothing, lesion)
    assert missed["hd95_mm"] is None and missed["rvd"] == -1.0
    only_predicted = scan_scores(lesion, nothing)
    assert only_predicted["hd95_mm"] is None and only_predicted["rvd"] is None
    both_empty = scan_scores(nothing, nothing)  # perfect, as the voxel metrics say
    assert both_empty["hd95_mm"] == 0.0 and both_empty["rvd"] == 0.0 and both_empty["dsc"] == 1.0
    for scores in (missed, only_predicted, both_empty):
        json.dumps(scores, allow_nan=False)


def test_isbi_unnormalised_1rater_of_a_perfect_prediction_is_one_and_of_nothing_is_low():
    truth = two_lesions()
    assert scan_scores(truth, truth)["isbi_unnormalised_1rater"] == pytest.approx(1.0)
    # Nothing predicted: DSC 0, PPV 0, LTPR 0, LFPR 0 -> (1 - 0)/4 * 4/3.
    assert scan_scores(torch.zeros_like(truth), truth)["isbi_unnormalised_1rater"] == pytest.approx(1 / 3)


def scans_with_raters(n, rater2_extra=True, pred_of=lambda r1, r2, i: r1):
    """n scans of growing lesion load; rater 2 sees one lesion more than rater 1 when rater2_extra."""
    scans = {}
    for i in range(n):
        r1 = torch.zeros(16, 16, 16, dtype=torch.bool)
        r1[3:6 + i % 5, 3:6, 3:6] = True
        r2 = r1.clone()
        if rater2_extra:
            r2[10:12, 10:12, 10:10 + 1 + i % 3] = True
        scans[f"s{i}"] = scan_scores(pred_of(r1, r2, i), r1, raters=(r1, r2))
    return scans


def test_isbi2015_of_a_prediction_equal_to_both_raters_is_the_human_level():
    scans = scans_with_raters(MIN_SCANS_FOR_CORR, rater2_extra=False)
    result = isbi2015_score(scans.values())
    assert result["sc"] == pytest.approx(1.0) and result["inter_rater_sc"] == pytest.approx(1.0)
    assert result["isbi2015_score"] == pytest.approx(90.0) and result["scans"] == MIN_SCANS_FOR_CORR
    few = isbi2015_score(list(scans.values())[:2])
    assert "isbi2015_score" not in few and few["isbi2015_score_without_corr"] == pytest.approx(90.0)
    assert few["sc"] == pytest.approx(1.0)


def test_isbi2015_averages_two_raters_and_normalises_by_their_agreement():
    # Predicting rater 1 exactly: SC is the mean of (1 against rater 1) and (rater 1 against rater 2).
    scans = scans_with_raters(2)
    r1 = torch.zeros(16, 16, 16, dtype=torch.bool)
    r1[3:6, 3:6, 3:6] = True
    r2 = r1.clone()
    r2[10:12, 10:12, 10:11] = True

    def terms(seg, ref):
        lesions = lesion_metrics(seg, ref)
        return (dice(seg, ref).item() / 8 + precision(seg, ref).item() / 8 + (1 - lesions["lfpr"]) / 4
                + lesions["ltpr"] / 4) * 4 / 3

    one = isbi2015_score([scans["s0"]], min_scans_for_corr=2)
    assert one["sc"] == pytest.approx((terms(r1, r1) + terms(r1, r2)) / 2)
    assert one["inter_rater_sc"] == pytest.approx((terms(r1, r2) + terms(r2, r1)) / 2)
    assert one["isbi2015_score_without_corr"] == pytest.approx(90 * one["sc"] / one["inter_rater_sc"])
    assert one["sc"] < 1.0
    with pytest.raises(ValueError, match="both raters"):
        scan_scores(r1, r1, raters=(r1, r1, r1))
    with pytest.raises(ValueError, match="raters"):
        isbi2015_score([scan_scores(r1, r1)])


def test_isbi2015_includes_corr_from_min_scans_for_corr():
    # A prediction whose volume runs against the truth's loses the Corr term it would have if it ran with it.
    def against(r1, r2, i):
        pred = torch.zeros_like(r1)
        pred[3:6 + (4 - i % 5), 3:6, 3:6] = True
        return pred

    n = MIN_SCANS_FOR_CORR
    scans = scans_with_raters(n, pred_of=against)
    with_corr = isbi2015_score(scans.values())
    without = isbi2015_score(scans.values(), min_scans_for_corr=n + 1)
    assert set(with_corr) == {"isbi2015_score", "sc", "inter_rater_sc", "scans"}
    assert set(without) == {"isbi2015_score_without_corr", "sc", "inter_rater_sc", "scans"}
    corrs = [volume_correlation([s["raters"][r]["seg_volume_mm3"] for s in scans.values()],
                                [s["raters"][r]["ref_volume_mm3"] for s in scans.values()]) for r in (0, 1)]
    assert np.mean(corrs) < 0
    assert with_corr["sc"] == pytest.approx(without["sc"] * 3 / 4 + np.mean(corrs) / 4)
    assert with_corr["sc"] < without["sc"]


def test_min_scans_for_corr_is_where_a_typical_correlation_becomes_informative():
    # The documented reason: the 95 % Fisher-z interval of r = 0.9 stays above 0.6 from this many scans on.
    def lower(n, r=0.9):
        return math.tanh(math.atanh(r) - 1.96 / math.sqrt(n - 3))
    assert lower(MIN_SCANS_FOR_CORR) > 0.6 > lower(MIN_SCANS_FOR_CORR - 1)


def test_summarise_means_over_defined_values_and_counts_them():
    lesion, nothing = two_lesions(), torch.zeros(16, 16, 16, dtype=torch.bool)
    per_scan = {"a": scan_scores(lesion, lesion), "b": scan_scores(nothing, lesion)}
    report = summarise(per_scan)
    assert set(report) == set(REPORTED) | {"defined", "scans"}
    assert report["dsc"] == pytest.approx(0.5) and report["defined"]["dsc"] == 2
    assert report["hd95_mm"] == 0.0 and report["defined"]["hd95_mm"] == 1  # b's HD95 does not exist
    assert report["scans"] == 2
    assert summarise({"b": per_scan["b"]})["hd95_mm"] is None
    json.dumps(report, allow_nan=False)


def test_summarise_adds_the_challenge_score_when_both_raters_exist():
    scans = scans_with_raters(3)
    assert summarise(scans)["isbi2015"] == isbi2015_score(scans.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scan_scores_on_cuda_equal_the_cpu_ones():
    truth = two_lesions()
    pred = torch.roll(truth, 1, 0)
    assert scan_scores(pred.cuda(), truth.cuda(), raters=(truth.cuda(), pred.cuda())) == scan_scores(
        pred, truth, raters=(truth, pred))


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


def test_bce_dice_loss_takes_soft_targets():
    # A mix-up target: soft BCE and V-Net's soft Dice, written out from their textbook definitions.
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 6, 6, 6, dtype=torch.float64)
    a, b = (torch.rand(1, 1, 6, 6, 6) > 0.7).double(), (torch.rand(1, 1, 6, 6, 6) > 0.6).double()
    target = 0.3 * a + 0.7 * b
    assert ((target > 0) & (target < 1)).any()
    p = torch.sigmoid(logits)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    expected = bce + 1 - 2 * (p * target).sum() / ((p * p).sum() + (target * target).sum())
    torch.testing.assert_close(BCEDiceLoss()(logits, target).double(), expected, rtol=1e-5, atol=1e-6)


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


def oblique_scan(tmp_path):
    """A mask of blobs of many sizes saved as NIfTI with an anisotropic, rotated and sheared affine, read back."""
    rotation = np.array([[np.cos(0.4), -np.sin(0.4), 0], [np.sin(0.4), np.cos(0.4), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    shear = np.array([[1, 0.2, 0], [0, 1, 0.1], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ tilt @ shear @ np.diag([0.9, 1.2, 3.0])
    affine[:3, 3] = (-40, 12.5, 7)
    rng = np.random.default_rng(0)
    mask = ndimage.binary_dilation(rng.random((24, 20, 12)) > 0.98) | (rng.random((24, 20, 12)) > 0.93)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), tmp_path / "mask.nii.gz")
    image = nib.load(tmp_path / "mask.nii.gz")
    return np.asarray(image.dataobj).astype(bool), image.affine


def test_lesion_table_against_an_independent_count_on_an_oblique_anisotropic_grid(tmp_path):
    mask, affine = oblique_scan(tmp_path)
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))  # the header's sform
    assert voxel_mm3 != pytest.approx(np.prod(nib.load(tmp_path / "mask.nii.gz").header.get_zooms()), rel=1e-3)
    faces_and_edges = np.ones((3, 3, 3), bool)
    faces_and_edges[::2, ::2, ::2] = False  # 18-connectivity: all but the 8 corners
    truth, n = ndimage.label(mask, faces_and_edges)
    sizes = np.bincount(truth.ravel())[1:]
    assert n > 20 and len(set(sizes)) > 3
    probabilities = np.random.default_rng(1).random(mask.shape)
    labels, rows = lesion_table(mask, affine, probabilities)
    assert [r["lesion_id"] for r in rows] == list(range(1, n + 1))
    assert [r["voxels"] for r in rows] == sorted(sizes, reverse=True)
    np.testing.assert_allclose([r["volume_ml"] for r in rows], np.sort(sizes)[::-1] * voxel_mm3 / 1000)
    np.testing.assert_array_equal(labels > 0, mask)
    for r in rows:
        voxels = np.argwhere(labels == r["lesion_id"])
        assert len(np.unique(truth[labels == r["lesion_id"]])) == 1 and len(voxels) == r["voxels"]
        centroid = voxels.mean(axis=0)
        np.testing.assert_allclose([r["centroid_i"], r["centroid_j"], r["centroid_k"]], centroid)
        np.testing.assert_allclose([r["centroid_x_mm"], r["centroid_y_mm"], r["centroid_z_mm"]],
                                   (affine @ [*centroid, 1])[:3])
        values = probabilities[labels == r["lesion_id"]]
        assert r["mean_probability"] == pytest.approx(values.mean()) and r["max_probability"] == values.max()
    assert list(rows[0]) == list(LESION_COLUMNS)
    assert lesion_summary(labels, affine) == {"lesion_count": n,
                                              "lesion_volume_ml": pytest.approx(mask.sum() * voxel_mm3 / 1000)}
    assert set(lesion_summary(labels, affine)) < set(SUMMARY_COLUMNS)


def test_lesion_table_min_size_drops_exactly_the_smaller_components(tmp_path):
    mask, affine = oblique_scan(tmp_path)
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))
    truth, _ = ndimage.label(mask, ndimage.generate_binary_structure(3, 2))
    sizes = np.bincount(truth.ravel())
    big = np.flatnonzero(sizes >= 3)[1:]  # component ids (0 is the background) of 3 voxels or more
    assert 0 < len(big) < len(sizes) - 1 and 3 in sizes[1:]
    labels, rows = lesion_table(mask, affine, min_size_mm3=3 * voxel_mm3)
    np.testing.assert_array_equal(labels > 0, np.isin(truth, big))
    assert sorted(r["voxels"] for r in rows) == sorted(sizes[big])
    assert labels.max() == len(rows) == len(big)
    _, rows = lesion_table(mask, affine, min_size_mm3=3 * voxel_mm3 * (1 + 1e-6))
    assert min(r["voxels"] for r in rows) > 3  # just above 3 voxels: the 3-voxel lesions go too
    with pytest.raises(ValueError, match="minimum lesion size"):
        lesion_table(mask, affine, min_size_mm3=-1)


def test_lesion_table_of_an_empty_mask_and_without_probabilities():
    labels, rows = lesion_table(np.zeros((6, 6, 6)), np.diag([2.0, 2.0, 2.0, 1.0]), np.zeros((6, 6, 6)))
    assert rows == [] and not labels.any()
    assert lesion_summary(labels, np.eye(4)) == {"lesion_count": 0, "lesion_volume_ml": 0.0}
    _, rows = lesion_table(torch.ones(2, 2, 2), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert rows[0]["volume_ml"] == pytest.approx(0.064)
    assert rows[0]["mean_probability"] is None and rows[0]["max_probability"] is None


def test_lesion_table_numbers_equal_volumes_in_raster_order_and_uses_18_connectivity():
    mask = np.zeros((6, 6, 6), bool)
    mask[4, 0, 0] = mask[0, 4, 0] = True  # two one-voxel lesions: the first in C order comes first
    mask[2, 2, 2] = mask[3, 3, 3] = True  # corners only: two more lesions under 18-connectivity
    mask[0, 0, 4] = mask[1, 1, 4] = True  # an edge: one lesion of two voxels, the largest
    labels, rows = lesion_table(mask, np.eye(4))
    assert [r["voxels"] for r in rows] == [2, 1, 1, 1, 1]
    assert labels[0, 0, 4] == 1 and labels[0, 4, 0] == 2 and labels[2, 2, 2] == 3 and labels[3, 3, 3] == 4
    assert labels[4, 0, 0] == 5
