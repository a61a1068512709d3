from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import figures


def head(shape=(30, 36, 24)):
    """A synthetic head in RAS+ voxel order: an ellipsoid of brain, two lesions in its right hemisphere."""
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1)[:, None, None, None] / 2
    image = (((grid - centre) / (np.array(shape)[:, None, None, None] * 0.42)) ** 2).sum(0) < 1
    image = image * (100.0 + np.random.default_rng(0).random(shape))
    mask = np.zeros(shape, np.uint8)
    mask[20:24, 20:24, 12:15] = 1  # right (high x), the larger
    mask[18:20, 10:12, 8:10] = 1
    image[mask > 0] = 180
    return image, mask, np.diag([1.0, 1.0, 1.5, 1.0])


def test_qc_writes_a_png_with_and_without_lesions(tmp_path):
    image, mask, affine = head()
    for name, m in (("lesions", mask), ("none", np.zeros_like(mask))):
        figures.qc(tmp_path / f"{name}.png", image, m, affine, name)
        height, width = imread(tmp_path / f"{name}.png").shape[:2]
        assert 800 <= width <= 1400 and 600 <= height <= 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lesions.png", "none.png"]


def test_qc_draws_the_subject_and_not_the_voxel_order(tmp_path):
    # The same head stored as (Z, X, Y) with X flipped, its affine saying so, gives the same picture.
    image, mask, affine = head()
    to_old = np.zeros((4, 4))
    to_old[0, 1], to_old[0, 3], to_old[1, 2], to_old[2, 0], to_old[3, 3] = -1, image.shape[0] - 1, 1, 1, 1
    stored = [np.ascontiguousarray(np.transpose(v, (2, 0, 1))[:, ::-1]) for v in (image, mask)]
    figures.qc(tmp_path / "ras.png", image, mask, affine, "head")
    figures.qc(tmp_path / "other.png", *stored, affine @ to_old, "head")
    assert (tmp_path / "ras.png").read_bytes() == (tmp_path / "other.png").read_bytes()


@pytest.mark.parametrize("view, voxel, drawn", [
    ("axial", (4, 0, 2), (0, 0)),  # subject's right, posterior: bottom left
    ("coronal", (4, 2, 3), (-1, 0)),  # right, superior: top left
    ("sagittal", (2, 5, 0), (0, 0)),  # anterior, inferior: bottom left
])
def test_panels_are_radiological(view, voxel, drawn):
    volume = np.zeros((5, 6, 4))
    volume[voxel] = 1
    plane = figures._plane(volume, view, voxel[figures.VIEWS[view][0]])
    assert plane[drawn] == 1 and plane.sum() == 1  # drawn with origin="lower": row 0 at the bottom


def test_history_and_slices_write_pngs(tmp_path):
    rows = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_dsc": 0.2 * e} for e in (1, 2, 3)]
    figures.history(tmp_path / "fig6.png", rows, "tiny")
    mask = torch.zeros(8, 8, 6, dtype=torch.uint8)
    mask[2:4, 2:4, 3] = 1
    scan = SimpleNamespace(id="s1", image=torch.rand(1, 8, 8, 6), mask=mask)
    figures.slices(tmp_path / "fig7.png", [scan], {"run": {"s1": mask.numpy()}}, "FLAIR")
    for name in ("fig6.png", "fig7.png"):
        assert imread(tmp_path / name).shape[0] > 100
