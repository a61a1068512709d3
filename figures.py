"""The paper's figures for a run, Fig. 6 (loss and validation DSC per epoch) and Fig. 7 (test slices), and the
picture that checks one prediction (`qc`).

Drawn on ``matplotlib.figure.Figure`` objects, never through pyplot, so that importing or calling this
module changes no global state (no backend switch, no open figure left behind).
"""
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

import data
import infer
import metrics


def save(fig, path):
    infer.atomic(path, lambda tmp: fig.savefig(tmp, dpi=110))


def history(path, rows, title):
    """Fig. 6: training and validation loss per epoch, and the validation DSC; the best epoch marked."""
    epochs = [h["epoch"] for h in rows]
    fig = Figure(figsize=(10, 3.8), layout="tight")
    ax_loss, ax_dsc = fig.subplots(1, 2)
    val_loss = [h["val_loss"] for h in rows]
    best = epochs[int(np.argmin(val_loss))]
    ax_loss.plot(epochs, [h["train_loss"] for h in rows], ".-", label="train")
    ax_loss.plot(epochs, val_loss, ".-", label="validation")
    ax_loss.axvline(best, color="gray", linestyle=":", label=f"best (epoch {best})")
    ax_loss.set(xlabel="epoch", ylabel="BCE-Dice loss", title=f"Loss ({title})")
    ax_loss.legend()
    ax_dsc.plot(epochs, [h["val_dsc"] for h in rows], ".-", color="C2")
    ax_dsc.axvline(best, color="gray", linestyle=":")
    ax_dsc.set(xlabel="epoch", ylabel="DSC", ylim=(0, 1), title="Validation DSC")
    save(fig, path)


def slices(path, scans, runs, channel):
    """Fig. 7: per test scan, the axial slice with the most lesion: the image, the ground truth, and each
    run's prediction in red over the image, as the paper's figure. ``runs``: {title: {scan id: mask}}, the
    masks in the scans' prepared grid (X, Y, Z)."""
    red = ListedColormap(["red"])
    columns = 2 + len(runs)
    fig = Figure(figsize=(2.6 * columns, 2.8 * len(scans)), layout="tight")
    axes = fig.subplots(len(scans), columns, squeeze=False)
    for row, scan in zip(axes, scans):
        z = int(scan.mask.sum(dim=(0, 1)).argmax())
        image = np.rot90(scan.image[0, :, :, z].numpy())
        panels = [(None, f"{scan.id} {channel}"), (scan.mask[:, :, z].numpy(), "ground truth")]
        panels += [(np.asarray(masks[scan.id])[:, :, z], title) for title, masks in runs.items()]
        for ax, (mask, title) in zip(row, panels):
            ax.imshow(image, cmap="gray")
            if mask is not None:
                ax.imshow(np.ma.masked_equal(np.rot90(mask), 0), cmap=red, alpha=0.7)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    save(fig, path)


OUTLINE, LARGEST, LETTERS = "#ff2a2a", "#ffe000", "#8fd8ff"
"""The colours of `qc`: lesion outlines red, the largest lesion's yellow, the edges' letters light blue; no grey
level of the image is any of them."""

VIEWS = {"axial": (2, 0, 1, "RL"), "coronal": (1, 0, 2, "RL"), "sagittal": (0, 1, 2, "AP")}
"""The views of a RAS+ volume: the axis each slices, the axis drawn across (flipped so that the radiological
convention puts the subject's right, or front, on the left), the axis drawn upwards, and the letters of the
left and right edges."""


def _plane(volume, view, index):
    """One slice of a RAS+ volume as drawn with origin="lower": rows upwards, columns in radiological order."""
    # the two other axes in RAS order, which in every view is (across, up): flip across, put up first
    return np.take(volume, index, axis=VIEWS[view][0])[::-1].T


def _brain_box(image, margin=3):
    """Index slices of the box around the voxels above the image's minimum (the whole image if none), so that
    the panels show the head, not the empty field around it."""
    inside = np.nonzero(image > image.min())
    if not len(inside[0]):
        return tuple(slice(0, n) for n in image.shape)
    return tuple(slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + margin + 1))
                 for i, n in zip(inside, image.shape))


def _slices(labels, spacing):
    """Where `qc` cuts a RAS+ volume: the (sagittal, coronal, axial) indices of the slices holding most of the
    largest lesion (label 1), or the middle ones, and the axial levels of the bottom row (`_levels`, 10 mm
    apart; without a lesion three fixed fractions of the height)."""
    if not labels.any():
        return [n // 2 for n in labels.shape], [int(round(f * (labels.shape[2] - 1))) for f in (0.3, 0.65, 0.8)]
    largest = labels == 1
    centre = [int(np.argmax(np.count_nonzero(largest, axis=tuple(a for a in range(3) if a != axis))))
              for axis in range(3)]
    return centre, _levels(labels, centre[2], max(1, int(round(10 / spacing[2]))))


def _levels(labels, first, gap, count=3):
    """Up to `count` axial levels crossing the most lesions (then the most lesion voxels), each at least `gap`
    slices from the others and from `first`, inferior to superior."""
    x, y, z = np.nonzero(labels)
    lesions = np.bincount(np.unique(z * (labels.max() + 1) + labels[x, y, z]) // (labels.max() + 1),
                          minlength=labels.shape[2])
    voxels = np.bincount(z, minlength=labels.shape[2])
    chosen = []
    for level in np.lexsort((-voxels, -lesions)):
        if lesions[level] and all(abs(level - other) >= gap for other in [first, *chosen]):
            chosen.append(int(level))
    return sorted(chosen[:count])


def _draw(ax, image, labels, view, index, window, geometry, box, title):
    """One panel: the slice in grey, the lesion outlines (the largest in its own colour), the edges lettered,
    and the slice's world coordinate at its centre (mm)."""
    axis, across, up, letters = VIEWS[view]
    picture = _plane(image, view, index)
    ax.imshow(picture, cmap="gray", origin="lower", vmin=window[0], vmax=window[1], interpolation="nearest",
              aspect=geometry.spacing[up] / geometry.spacing[across])
    for lesions, colour in ((labels > 0, OUTLINE), (labels == 1, LARGEST)):
        outline = _plane(lesions, view, index)
        if outline.any():
            ax.contour(outline.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.0)
    ax.set(xlim=(-0.5, picture.shape[1] - 0.5), ylim=(-0.5, picture.shape[0] - 0.5))
    for x, letter in zip((0.0, 1.0), letters):
        ax.text(x, 0.5, letter, transform=ax.transAxes, color=LETTERS, fontsize=12, fontweight="bold",
                ha="left" if x < 0.5 else "right", va="center",
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "black", "alpha": 0.6, "linewidth": 0})
    centre = [(b.start + b.stop - 1) / 2 for b in box]
    centre[axis] = box[axis].start + index
    world = (geometry.canonical_affine @ [*centre, 1])[axis]
    ax.set_title(f"{title}\n{view} {'xyz'[axis]} = {world:.0f} mm", color="white", fontsize=9)
    ax.axis("off")


def qc(path, image, mask, affine, name):
    """The picture that checks one prediction: `image` (one channel, (X, Y, Z), in its own grid with `affine`)
    with the outline of `mask` (same grid; its lesions as `metrics.lesion_table` counts them).

    Top row: the axial, coronal and sagittal slices through the largest lesion (the slices holding most of
    it; its outline yellow, the others red); bottom row: up to three axial slices crossing the most lesions,
    at least 10 mm apart and from the top row's. Without a lesion, the middle slices and three other axial
    levels, and the title says so. Drawn in the closest RAS+ orientation of the affine (`data.Geometry`: a
    permutation and flips, no resampling), cropped to the head, with the grid's voxel aspect, in the
    radiological convention (the subject's right on the left), as the caption and the panels' letters say.
    The title gives `name`, the lesion count and the total volume in mL; each panel the slice's world
    coordinate (scanner RAS+ mm).
    """
    labels, _ = metrics.lesion_table(mask, affine)
    summary = metrics.lesion_summary(labels, affine)
    geometry = data.Geometry.of(np.shape(image), affine)
    image = geometry.apply(np.asarray(image, dtype=np.float32), order=1, crop=False)
    box = _brain_box(image)
    image, labels = image[box], geometry.apply(labels, order=0, crop=False)[box]
    foreground = image[image > image.min()]
    window = np.percentile(foreground if foreground.size else image, (0.5, 99.9))  # lesions: the brightest few ‰
    count, volume = summary["lesion_count"], summary["lesion_volume_ml"]
    centre, levels = _slices(labels, geometry.spacing)

    fig = Figure(figsize=(10, 7.6), facecolor="black", layout="constrained")
    axes = fig.subplots(2, 3)
    for ax, view in zip(axes[0], VIEWS):
        _draw(ax, image, labels, view, centre[VIEWS[view][0]], window, geometry, box,
              "through the largest lesion" if count else "middle slice")
    for ax, level in zip(axes[1], levels):
        lesions = len(np.unique(labels[:, :, level])) - 1
        _draw(ax, image, labels, "axial", level, window, geometry, box,
              f"{lesions} lesion{'s' * (lesions != 1)} in this slice" if count else "")
    for ax in axes[1][len(levels):]:
        ax.axis("off")
    if len(levels) < 3:
        spare = axes[1][len(levels)]
        spare.text(0.5, 0.5, "no other axial level with lesions\n10 mm or more from these", color="white",
                   fontsize=9, ha="center", va="center", transform=spare.transAxes)
    found = f"{count} lesion{'s' * (count != 1)}, {volume:.3g} mL" if count else "no lesion found"
    outlines = "; lesion outlines red, the largest yellow" if count else ""
    fig.suptitle(f"{name}: {found}\nradiological convention: the subject's right on the left{outlines}",
                 color="white", fontsize=11)
    save(fig, path)
