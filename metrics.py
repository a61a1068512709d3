"""The loss (BCE-Dice) and the evaluation metrics: DSC, IoU, voxel-wise and lesion-wise scores, HD95, ISBI scores.

Voxel-wise metrics take binary masks as torch tensors of any shape and dtype (bool, uint8, float {0, 1})
on any device and return 0-d float tensors on that device: no host copy, so they can run inside a loop.
When a score's denominator is zero, it is 1 if both masks are empty and 0 otherwise: an empty prediction
against an empty truth is perfect, anything else against nothing is not.

Lesion-wise metrics need connected components, which come from scipy.ndimage on the host: they run once per
scan at evaluation time, never in the training loop. A lesion is a connected component and counts as
detected on any shared voxel (Carass et al. 2017). Connectivity is 6 (faces), 18 (faces and edges, our
default: skimage's connectivity=2 in the Python re-implementation of the ISBI 2015 metrics by Zhang et al.
2019, MedICL-VU/LesionSeg `test.py`; the challenge's own evaluation is MATLAB code we have not run) or 26
(jcreinhold/lesion-metrics, skimage's default).

`lesion_table` lists the lesions of one mask in its own grid (voxels, volume from the affine's determinant,
centroid, probabilities) and numbers them in a labelled mask; `lesion_summary` gives a scan's lesion count and
volume. The columns of both tables are described once, in `LESION_COLUMNS` and `SUMMARY_COLUMNS`.

A test scan's report is `scan_scores` (one dict, JSON-ready: an undefined value is None, never inf or nan),
and a test set's is `summarise` over the keys named once in `REPORTED`; `isbi2015_score` is the ISBI 2015
challenge's score over a set of scans scored against both raters.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from nibabel.affines import voxel_sizes
from scipy import ndimage


class BCEDiceLoss(nn.Module):
    """BCE-Dice: binary cross-entropy on the logits plus one minus the soft Dice of the sigmoid, equal weights.

        L = mean(BCEWithLogits(x, y)) + 1 - 2 sum(p y) / max(sum(p^2) + sum(y^2), eps),   p = sigmoid(x)

    This is pytorch-3dunet's BCEDiceLoss as of 2021 (alpha = beta = 1, V-Net squared denominator), the
    sums running over the whole batch (with the paper's batch size of 1, per-sample and batch Dice agree).
    The target may be soft, any value in [0, 1] (mix-up): BCE with logits is the cross-entropy
    -(y log p + (1 - y) log(1 - p)) for any such y, and the soft Dice above is V-Net's (Milletari et al.
    2016), defined for soft y as it is for soft p. The range is not checked (a check would copy to the host
    every step). With an empty mask the Dice term is 1 with no gradient and BCE alone pushes the prediction
    down. Computed in float32 whatever the autocast dtype of the logits.
    """

    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, logits, target):
        logits, target = logits.float(), target.float()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        p = torch.sigmoid(logits)
        dice = 2 * (p * target).sum() / ((p * p).sum() + (target * target).sum()).clamp_min(self.eps)
        return bce + 1 - dice


def _counts(pred, truth):
    pred, truth = pred.bool(), truth.bool()
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} and truth shape {tuple(truth.shape)} differ")
    return (pred & truth).sum().float(), pred.sum().float(), truth.sum().float()


def _ratio(num, den, both_empty):
    return torch.where(den > 0, num / den.clamp_min(1), both_empty.float())


def dice(pred, truth):
    """DSC = 2 |P & T| / (|P| + |T|)."""
    tp, p, t = _counts(pred, truth)
    return _ratio(2 * tp, p + t, (p == 0) & (t == 0))


def iou(pred, truth):
    """Lesion IoU (Jaccard) of one scan = |P & T| / |P | T|.

    The paper's "mean IoU" is the IoU averaged over the test scans; it does not say over which classes. We
    average the lesion-class IoU over scans, as we do DSC. A mean over both classes would be near
    (1 + IoU) / 2, far above the paper's figures. The paper's IoUs are also below D / (2 - D) of its DSCs
    (0.528 against 0.547 for the residual net), which a per-scan mean of the same masks cannot give, so
    its DSC and IoU were probably not averaged the same way; we report ours from the same masks.
    """
    tp, p, t = _counts(pred, truth)
    return _ratio(tp, p + t - tp, (p == 0) & (t == 0))


def precision(pred, truth):
    """PPV = |P & T| / |P|."""
    tp, p, t = _counts(pred, truth)
    return _ratio(tp, p, (p == 0) & (t == 0))


def sensitivity(pred, truth):
    """TPR = |P & T| / |T|."""
    tp, p, t = _counts(pred, truth)
    return _ratio(tp, t, (p == 0) & (t == 0))


def relative_volume_difference(pred, truth):
    """Signed RVD = (|P| - |T|) / |T|; 0 when both are empty, inf when only the truth is. ISBI's VD is its abs."""
    _, p, t = _counts(pred, truth)
    return torch.where(t > 0, (p - t) / t.clamp_min(1), torch.where(p > 0, torch.inf, 0.0))


STRUCTURES = {c: ndimage.generate_binary_structure(3, rank) for c, rank in ((6, 1), (18, 2), (26, 3))}


def _host(mask):
    mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"lesion-wise metrics take one 3D mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def components(mask, connectivity=18):
    """Label the lesions (connected components) of a 3D mask; returns (labels, count)."""
    if connectivity not in STRUCTURES:
        raise ValueError(f"connectivity must be one of {sorted(STRUCTURES)}, got {connectivity}")
    return ndimage.label(_host(mask), STRUCTURES[connectivity])


def lesion_metrics(pred, truth, connectivity=18):
    """Lesion-wise detection of one scan (ISBI 2015 definitions).

    Returns a dict of floats: `ltpr` = truth lesions touched by the prediction / truth lesions (1 if there are
    none and the prediction is empty, else 0); `lfpr` = predicted lesions touching no truth voxel / predicted
    lesions (0 if nothing is predicted); `truth_lesions`, `pred_lesions`, `detected_lesions`, `false_lesions`.
    """
    pred, truth = _host(pred), _host(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} and truth shape {truth.shape} differ")
    truth_labels, n_truth = components(truth, connectivity)
    pred_labels, n_pred = components(pred, connectivity)
    detected = np.count_nonzero(np.unique(truth_labels[pred]))  # distinct truth lesions under P (0 is not one)
    false = n_pred - np.count_nonzero(np.unique(pred_labels[truth]))
    return {
        "ltpr": detected / n_truth if n_truth else float(n_pred == 0),
        "lfpr": false / n_pred if n_pred else 0.0,
        "truth_lesions": int(n_truth), "pred_lesions": int(n_pred),
        "detected_lesions": int(detected), "false_lesions": int(false),
    }


LESION_CONNECTIVITY = 18
"""The connectivity of a lesion in the lesion tables: that of the lesion-wise metrics' default."""

NEIGHBOURS = {6: "a face", 18: "a face or an edge", 26: "a face, an edge or a corner"}
"""What joins two voxels into one component, for each connectivity of `STRUCTURES`."""

LESION_COLUMNS = {
    "lesion_id": ("The lesion's number and its value in the labelled lesion mask. A lesion is a connected "
                  f"component of the mask with {LESION_CONNECTIVITY}-connectivity (voxels sharing "
                  f"{NEIGHBOURS[LESION_CONNECTIVITY]}). Lesions are "
                  "numbered by decreasing volume, 1 the largest; equal volumes in the order the voxel array "
                  "first meets them (last index fastest)", None),
    "voxels": ("Number of voxels of the lesion in the input's own grid", None),
    "volume_ml": ("Lesion volume: its voxels times the volume of one voxel, the absolute determinant of the "
                  "affine's 3x3 part, which is right for anisotropic and oblique grids", "mL"),
    "centroid_x_mm": ("Centre of mass of the lesion in world coordinates (the input's affine applied to the "
                      "voxel centroid; scanner RAS+, as nibabel reads it): x, increasing towards the subject's "
                      "right", "mm"),
    "centroid_y_mm": ("Centre of mass in world coordinates: y, increasing towards anterior", "mm"),
    "centroid_z_mm": ("Centre of mass in world coordinates: z, increasing towards superior", "mm"),
    "centroid_i": ("Centre of mass of the lesion in the input's voxel indices, first axis (0-based, "
                   "fractional)", None),
    "centroid_j": ("Centre of mass in voxel indices, second axis", None),
    "centroid_k": ("Centre of mass in voxel indices, third axis", None),
    "mean_probability": ("Mean over the lesion's voxels of the network's lesion probability (the sigmoid of "
                         "its output); n/a when no probabilities were given", None),
    "max_probability": ("Largest lesion probability among the lesion's voxels; n/a when no probabilities were "
                        "given", None),
}
"""The columns of a lesion table (`lesion_table`'s rows): {name: (description, units or None)}. One description
per column, for the tables' sidecars and the docs alike."""

SUMMARY_COLUMNS = {
    "scan": ("The scan: its input file, or its BIDS source entities", None),
    "lesion_count": ("Number of lesions (rows of the scan's lesion table)", None),
    "lesion_volume_ml": ("Total lesion volume: lesion voxels times the volume of one voxel (absolute determinant "
                         "of the affine's 3x3 part)", "mL"),
    "threshold": ("Probability above which a voxel is lesion", None),
    "min_lesion_size_mm3": ("Lesions smaller than this were dropped from the mask and the tables", "mm^3"),
    "connectivity": ("Two lesion voxels are one lesion when a chain of lesion voxels joins them, each sharing "
                     "with the next " + "; ".join(f"{w} ({c})" for c, w in NEIGHBOURS.items()), None),
}
"""The columns of a per-scan summary table: {name: (description, units or None)}; `lesion_summary` gives the
lesion count and volume, the caller the scan and the settings it used."""


def voxel_volume_mm3(affine):
    """The volume of one voxel of a grid: |det| of the affine's 3x3 part, right for any grid (anisotropic,
    rotated or sheared), where the product of the voxel sizes is right only for orthogonal axes."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"an affine is a 4x4 matrix, got shape {affine.shape}")
    return float(abs(np.linalg.det(affine[:3, :3])))


def _kept(voxels, voxel_mm3, min_size_mm3):
    """Which components are at least `min_size_mm3` large (to rounding, so that k voxels of v mm³ pass k v)."""
    if not (math.isfinite(min_size_mm3) and min_size_mm3 >= 0):
        raise ValueError(f"the minimum lesion size must be a finite number of mm³ >= 0, got {min_size_mm3}")
    volumes = voxels * voxel_mm3
    return (volumes >= min_size_mm3) | np.isclose(volumes, min_size_mm3, rtol=1e-9, atol=0)


def lesion_table(mask, affine, probabilities=None, connectivity=LESION_CONNECTIVITY, min_size_mm3=0.0):
    """The lesions of one scan's mask, one row each, and the labelled mask they are numbered in.

    `mask`: binary 3D array or tensor in the grid of `affine` (4x4, voxel -> world mm). `probabilities`: the
    lesion probabilities in the same grid, or None. A lesion is a connected component (`components`,
    `LESION_CONNECTIVITY` by default); components smaller than `min_size_mm3` (mm³) are dropped.

    Returns (labels, rows). `labels` (int32, the mask's shape) numbers the kept lesions 1..n by decreasing
    volume (ties in the order the voxel array first meets them), 0 elsewhere: `labels > 0` is the mask with
    the small components dropped. `rows`: one dict per lesion in that order, with the keys of
    `LESION_COLUMNS` (the probabilities None without `probabilities`). Sums and maxima by label (numpy
    bincount, maximum.at) over the lesion voxels only, no Python loop over voxels.
    """
    affine = np.asarray(affine, dtype=float)
    voxel_mm3 = voxel_volume_mm3(affine)
    labels, count = components(mask, connectivity)
    if probabilities is not None:
        probabilities = probabilities.detach().cpu().numpy() if isinstance(probabilities, torch.Tensor) \
            else np.asarray(probabilities)
        if probabilities.shape != labels.shape:
            raise ValueError(f"probabilities of shape {probabilities.shape} for a mask of shape {labels.shape}")
    where = np.nonzero(labels)
    ids = _renumbered(labels[where], count, voxel_mm3, min_size_mm3)
    where, ids = tuple(axis[ids > 0] for axis in where), ids[ids > 0]
    labels = np.zeros(labels.shape, dtype=np.int32)
    labels[where] = ids
    n = int(ids.max(initial=0))
    voxels = np.bincount(ids, minlength=n + 1)[1:]
    centroids = np.stack([np.bincount(ids, weights=axis, minlength=n + 1)[1:] for axis in where], 1) / voxels[:, None]
    world = centroids @ affine[:3, :3].T + affine[:3, 3]
    mean = peak = [None] * n
    if probabilities is not None:
        values = probabilities[where].astype(np.float64)
        mean = (np.bincount(ids, weights=values, minlength=n + 1)[1:] / voxels).tolist()
        peak = np.full(n + 1, -np.inf)
        np.maximum.at(peak, ids, values)
        peak = peak[1:].tolist()
    rows = [dict(zip(LESION_COLUMNS, (i + 1, int(voxels[i]), float(voxels[i] * voxel_mm3 / 1000), *world[i].tolist(),
                                      *centroids[i].tolist(), mean[i], peak[i]))) for i in range(n)]
    return labels, rows


def _renumbered(ids, count, voxel_mm3, min_size_mm3):
    """New numbers for the voxels' component `ids` (1..count, from ndimage.label): 1..n by decreasing size, the
    stable sort keeping label's raster order among equal sizes; 0 for a component under `min_size_mm3`."""
    voxels = np.bincount(ids, minlength=count + 1)[1:]
    order = np.argsort(-voxels, kind="stable")
    order = order[_kept(voxels[order], voxel_mm3, min_size_mm3)]
    number = np.zeros(count + 1, dtype=np.int32)
    number[order + 1] = np.arange(1, len(order) + 1, dtype=np.int32)
    return number[ids]


def lesion_summary(labels, affine):
    """The lesion count and total volume of one scan from the `labels` of `lesion_table` (numbered 1..n):
    {"lesion_count": n, "lesion_volume_ml": lesion voxels x voxel volume / 1000}, keys of SUMMARY_COLUMNS."""
    labels = np.asarray(labels)
    return {"lesion_count": int(labels.max(initial=0)),
            "lesion_volume_ml": float(np.count_nonzero(labels) * voxel_volume_mm3(affine) / 1000)}


def hausdorff95(pred, truth, spacing=(1.0, 1.0, 1.0)):
    """95th-percentile symmetric Hausdorff distance in mm between the masks' surfaces.

    The surface is the mask minus its 6-connected erosion; each directed distance set is taken from one
    surface to the other with the voxel spacing (mm per axis), and the larger of the two 95th percentiles is
    returned, as MONAI's compute_hausdorff_distance(percentile=95). 0 when both are empty, inf when one is.
    """
    pred, truth = _host(pred), _host(truth)
    if not pred.any() or not truth.any():
        return 0.0 if pred.any() == truth.any() else float("inf")
    surfaces = [m & ~ndimage.binary_erosion(m, STRUCTURES[6]) for m in (pred, truth)]
    to_truth = ndimage.distance_transform_edt(~surfaces[1], sampling=spacing)[surfaces[0]]
    to_pred = ndimage.distance_transform_edt(~surfaces[0], sampling=spacing)[surfaces[1]]
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


def volume_correlation(pred_volumes, truth_volumes):
    """Pearson correlation of predicted and true lesion volumes across scans (ISBI's Corr term)."""
    pred_volumes, truth_volumes = np.asarray(pred_volumes, float), np.asarray(truth_volumes, float)
    if len(pred_volumes) < 2 or pred_volumes.std() == 0 or truth_volumes.std() == 0:
        raise ValueError("volume correlation needs at least two scans whose volumes vary")
    return float(np.corrcoef(pred_volumes, truth_volumes)[0, 1])


def _defined(value):
    """None for a value that does not exist (inf or nan), so that a report is valid JSON and says so."""
    return value if math.isfinite(value) else None


def _isbi_terms(dsc, ppv, ltpr, lfpr):
    """Carass et al. 2017's per-scan terms without Corr, their weights 1/8, 1/8, 1/4, 1/4 rescaled by 4/3 to sum
    to 1, as jcreinhold/lesion-metrics' isbi15_score(reweighted=True): a perfect segmentation scores 1."""
    return (dsc / 8 + ppv / 8 + (1 - lfpr) / 4 + ltpr / 4) * 4 / 3


def _pair_terms(segmentation, reference, voxel_mm3, connectivity):
    """What the ISBI 2015 score needs of one segmentation against one reference mask (torch, same device)."""
    dsc, ppv, seg_voxels, ref_voxels = torch.stack([
        dice(segmentation, reference), precision(segmentation, reference),
        segmentation.bool().sum().float(), reference.bool().sum().float()]).tolist()
    lesions = lesion_metrics(segmentation, reference, connectivity)
    return {"dsc": dsc, "ppv": ppv, "ltpr": lesions["ltpr"], "lfpr": lesions["lfpr"],
            "seg_volume_mm3": seg_voxels * voxel_mm3, "ref_volume_mm3": ref_voxels * voxel_mm3}


def scan_scores(pred, truth, affine=None, raters=None, connectivity=LESION_CONNECTIVITY):
    """Every score of one test scan, as a JSON-ready dict.

    `pred`, `truth`: binary (X, Y, Z) torch tensors (bool, uint8, float {0, 1}) on any device; the voxel
    metrics run there and come back in one copy, the lesion-wise ones and HD95 run on the host. `affine`:
    the masks' grid, 4x4 voxel -> world mm (None: the identity, 1 mm voxels); HD95 measures with its voxel
    sizes (nibabel's `voxel_sizes`, the lengths of its columns) and a volume is voxels x `voxel_volume_mm3`,
    so that `pred_lesions` and `pred_volume_mm3` / 1000 (and the truth's) are the lesion count and volume in
    mL that `lesion_summary` gives for the same mask: one definition of a lesion and of its volume.
    `raters`: both raters' masks (rater 1, rater 2) where they exist, for `isbi2015_score`.

    Keys: `dsc`, `iou`, `ppv`, `tpr`, `rvd` (signed), `ltpr`, `lfpr`, `truth_lesions`, `pred_lesions`,
    `detected_lesions`, `false_lesions`, `hd95_mm`, `pred_volume_mm3`, `truth_volume_mm3`, and
    `isbi_unnormalised_1rater`: Carass et al. 2017's terms against `truth` alone, without Corr and without the
    challenge's normalisation (`_isbi_terms`), so it is not comparable with the ISBI 2015 leaderboard.
    With `raters`, also `raters` (the prediction against rater 1 and rater 2) and `inter_rater` (rater 1
    against rater 2 and rater 2 against rater 1), each a list of two dicts with `dsc`, `ppv`, `ltpr`,
    `lfpr`, `seg_volume_mm3`, `ref_volume_mm3`.

    Undefined values are None: `rvd` when only the prediction has voxels (no truth to compare with) and
    `hd95_mm` when one mask is empty and the other is not (no surface to measure to). Both empty follows the
    module's rule and is perfect (`rvd` 0, `hd95_mm` 0).
    """
    pred, truth = torch.as_tensor(pred), torch.as_tensor(truth)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    voxel_mm3 = voxel_volume_mm3(affine)
    dsc, iou_, ppv, tpr, rvd, pred_voxels, truth_voxels = torch.stack([
        dice(pred, truth), iou(pred, truth), precision(pred, truth), sensitivity(pred, truth),
        relative_volume_difference(pred, truth), pred.bool().sum().float(), truth.bool().sum().float()]).tolist()
    pred_host, truth_host = _host(pred), _host(truth)  # one copy each for the lesions and HD95
    lesions = lesion_metrics(pred_host, truth_host, connectivity)
    scores = {
        "dsc": dsc, "iou": iou_, "ppv": ppv, "tpr": tpr, "rvd": _defined(rvd), **lesions,
        "hd95_mm": _defined(hausdorff95(pred_host, truth_host, voxel_sizes(affine))),
        "pred_volume_mm3": pred_voxels * voxel_mm3, "truth_volume_mm3": truth_voxels * voxel_mm3,
        "isbi_unnormalised_1rater": _isbi_terms(dsc, ppv, lesions["ltpr"], lesions["lfpr"]),
    }
    if raters is not None:
        raters = [torch.as_tensor(r) for r in raters]
        if len(raters) != 2:
            raise ValueError(f"the ISBI 2015 score takes both raters' masks, got {len(raters)}")
        scores["raters"] = [_pair_terms(pred, r, voxel_mm3, connectivity) for r in raters]
        scores["inter_rater"] = [_pair_terms(raters[0], raters[1], voxel_mm3, connectivity),
                                 _pair_terms(raters[1], raters[0], voxel_mm3, connectivity)]
    return scores


HUMAN_RATER_SCORE = 90.0
"""Where the ISBI 2015 score puts a human rater: the two raters scored against each other (Carass et al. 2017;
also Roy et al. 2018, arXiv 1803.09172, who read a score of about 90 as a human rater's)."""

MIN_SCANS_FOR_CORR = 10
"""The fewest scans over which `isbi2015_score` includes Corr, a Pearson correlation across scans. With 2
scans (the paper's test split) r is +-1 whatever the masks; 10 is the fewest at which a typical r = 0.9 has a
95 % interval (Fisher z, standard error 1 / sqrt(n - 3)) whose lower end stays above 0.6 (0.62 at 10 scans,
0.59 at 9). The challenge itself scored 61 test scans."""


def _challenge_sc(pairs_per_scan, with_corr):
    """Carass et al. 2017's SC before normalisation: the mean over references and scans of
    DSC/8 + PPV/8 + (1 - LFPR)/4 + LTPR/4 + Corr/4, Corr being per reference across scans. Without Corr the
    other weights are rescaled by 4/3 (`_isbi_terms`), so that a perfect segmentation scores 1 either way."""
    terms = np.mean([_isbi_terms(p["dsc"], p["ppv"], p["ltpr"], p["lfpr"]) for pairs in pairs_per_scan
                     for p in pairs])
    if not with_corr:
        return float(terms)
    corr = []
    for r in range(len(pairs_per_scan[0])):
        seg = [pairs[r]["seg_volume_mm3"] for pairs in pairs_per_scan]
        ref = [pairs[r]["ref_volume_mm3"] for pairs in pairs_per_scan]
        # A segmentation whose volume never varies explains none of the reference's variation: Corr 0.
        corr.append(volume_correlation(seg, ref) if np.std(seg) > 0 and np.std(ref) > 0 else 0.0)
    return float(terms * 3 / 4 + np.mean(corr) / 4)


def isbi2015_score(scans, min_scans_for_corr=MIN_SCANS_FOR_CORR):
    """The ISBI 2015 challenge's score of a set of scans, each scored against both raters (Carass et al. 2017).

    `scans`: the dicts of `scan_scores(..., raters=(rater1, rater2))`. The method's SC is

        SC = 1 / (|R| N) sum over raters r and scans s of  DSC/8 + PPV/8 + (1 - LFPR)/4 + LTPR/4 + Corr/4

    with the weights 1/8, 1/8, 1/4, 1/4, 1/4 of Carass et al. 2017 (as in jcreinhold/lesion-metrics and
    MedICL-VU/LesionSeg), |R| = 2 raters, and Corr the Pearson correlation of the segmented and the rater's
    lesion volumes across the N scans. The same SC of the raters against each other (rater 1 against rater 2
    and the reverse) sets the scale: score = `HUMAN_RATER_SCORE` (90) x SC / SC_inter-rater, so 90 is a human
    rater. Constants not checked here: the paper and the challenge site state that 90 is the raters' level,
    but we could not read how the official MATLAB code rescales; the proportional map (0 stays 0) is our
    reading. The leaderboard's scale comes from its 61 test scans' inter-rater agreement, ours from the scans
    given, so the number is the challenge's rule applied to these scans, not a leaderboard entry.

    Corr enters only over at least `min_scans_for_corr` scans (`MIN_SCANS_FOR_CORR`); with fewer, the key
    says so. Returns {"isbi2015_score" or "isbi2015_score_without_corr": the score, "sc": the method's SC,
    "inter_rater_sc": the raters' SC, "scans": N}.
    """
    scans = list(scans)
    if not scans or any("raters" not in scan for scan in scans):
        raise ValueError("the ISBI 2015 score needs every scan scored with scan_scores(..., raters=(r1, r2))")
    with_corr = len(scans) >= min_scans_for_corr
    sc = _challenge_sc([scan["raters"] for scan in scans], with_corr)
    inter = _challenge_sc([scan["inter_rater"] for scan in scans], with_corr)
    name = "isbi2015_score" if with_corr else "isbi2015_score_without_corr"
    return {name: HUMAN_RATER_SCORE * sc / inter, "sc": sc, "inter_rater_sc": inter, "scans": len(scans)}


REPORTED = ("dsc", "iou", "ppv", "tpr", "rvd", "ltpr", "lfpr", "hd95_mm", "isbi_unnormalised_1rater")
"""The per-scan keys that a test report averages; lesion counts and volumes stay per scan."""


def summarise(per_scan):
    """A test set's report from {scan id: scan_scores(...)}.

    Returns {key: mean over the scans where it is defined, or None where it is nowhere, for each key of
    REPORTED; "defined": {key: how many scans that mean is over}; "scans": how many scans}, plus
    "isbi2015": `isbi2015_score` when every scan was scored against both raters.
    """
    scans = list(per_scan.values())
    result, defined = {}, {}
    for key in REPORTED:
        values = [scan[key] for scan in scans if scan[key] is not None]
        result[key] = float(np.mean(values)) if values else None
        defined[key] = len(values)
    result["defined"], result["scans"] = defined, len(scans)
    if scans and all("raters" in scan for scan in scans):
        result["isbi2015"] = isbi2015_score(scans)
    return result
