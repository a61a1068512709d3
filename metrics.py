"""The loss (BCE-Dice) and the evaluation metrics: DSC, IoU, voxel-wise and lesion-wise scores, HD95, ISBI score.

Voxel-wise metrics take binary masks as torch tensors of any shape and dtype (bool, uint8, float {0, 1})
on any device and return 0-d float tensors on that device: no host copy, so they can run inside a loop.
When a score's denominator is zero, it is 1 if both masks are empty and 0 otherwise: an empty prediction
against an empty truth is perfect, anything else against nothing is not.

Lesion-wise metrics need connected components, which come from scipy.ndimage on the host: they run once per
scan at evaluation time, never in the training loop. A lesion is a connected component (ISBI 2015 rules,
spec/data_metrics.md §1.4); a component counts as detected on any shared voxel. Connectivity is 6 (faces),
18 (faces and edges, the ISBI 2015 evaluation code's skimage connectivity=2 and our default) or 26.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage


class BCEDiceLoss(nn.Module):
    """BCE-Dice: binary cross-entropy on the logits plus one minus the soft Dice of the sigmoid, equal weights.

        L = mean(BCEWithLogits(x, y)) + 1 - 2 sum(p y) / max(sum(p^2) + sum(y^2), eps),   p = sigmoid(x)

    This is pytorch-3dunet's BCEDiceLoss as of 2021 (alpha = beta = 1, V-Net squared denominator), the
    sums running over the whole batch (with the paper's batch size of 1, per-sample and batch Dice agree).
    With an empty mask the Dice term is 1 with no gradient and BCE alone pushes the prediction down.
    Computed in float32 whatever the autocast dtype of the logits.
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
    return mask.astype(bool)


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


def isbi_score(pred, raters, connectivity=18, corr=None):
    """ISBI 2015 score of one scan against one or two raters' masks, in [0, 1] (x100 for the challenge's scale).

        SC = mean over raters of  DSC/8 + PPV/8 + (1 - LFPR)/4 + LTPR/4 + Corr/4

    Corr is the Pearson correlation of lesion volumes across scans, so it does not exist for one scan: pass
    `corr` (computed over a test set with `volume_correlation`) to use the full formula; without it the Corr
    term is dropped and the rest rescaled by 4/3, as the lesion-metrics package does.
    """
    raters = [raters] if isinstance(raters, torch.Tensor) or np.ndim(raters) == 3 else list(raters)
    if not 1 <= len(raters) <= 2:
        raise ValueError(f"isbi_score takes one or two raters' masks, got {len(raters)}")
    pred_t = torch.as_tensor(_host(pred))
    scores = []
    for truth in raters:
        truth_t = torch.as_tensor(_host(truth))
        lesions = lesion_metrics(pred_t, truth_t, connectivity)
        sc = (dice(pred_t, truth_t).item() / 8 + precision(pred_t, truth_t).item() / 8
              + (1 - lesions["lfpr"]) / 4 + lesions["ltpr"] / 4)
        scores.append(sc + corr / 4 if corr is not None else sc * 4 / 3)
    return float(np.mean(scores))


def volume_correlation(pred_volumes, truth_volumes):
    """Pearson correlation of predicted and true lesion volumes across scans (ISBI's Corr term)."""
    pred_volumes, truth_volumes = np.asarray(pred_volumes, float), np.asarray(truth_volumes, float)
    if len(pred_volumes) < 2 or pred_volumes.std() == 0 or truth_volumes.std() == 0:
        raise ValueError("volume correlation needs at least two scans whose volumes vary")
    return float(np.corrcoef(pred_volumes, truth_volumes)[0, 1])
