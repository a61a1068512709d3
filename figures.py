"""The paper's figures for a run: Fig. 6 (loss and validation DSC per epoch) and Fig. 7 (test slices).

Drawn on ``matplotlib.figure.Figure`` objects, never through pyplot, so that importing or calling this
module changes no global state (no backend switch, no open figure left behind).
"""
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

import infer


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
