import csv
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.image import imread
from scipy import ndimage
from scipy.spatial.transform import Rotation

import infer
import metrics
import repro
import train


class Voxelwise(torch.nn.Module):
    """A stand-in network with the project's call form, ``net(x, pad_value=...)``."""

    def __init__(self, kernel):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, kernel, padding=kernel // 2)

    def forward(self, x, pad_value=0.0):
        return self.conv(x)


def predict(*args):
    return repro.main(["predict", *map(str, args), "--device", "cpu"])


def scans_of(dataset, n=1):
    return sorted((dataset / "training").glob("*/preprocessed/*_flair_pp.nii"))[:n]


def test_sliding_window_blends_to_the_whole_scan_result():
    # A network that sees only single voxels (1x1x1 convolution) gives the same logits tiled or whole.
    net = Voxelwise(1)
    image = torch.randn(1, 40, 33, 20)
    whole = infer.predict_logits(net, image)
    tiled = infer.predict_logits(net, image, window=16)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.9])
def test_segment_is_the_sigmoid_above_the_threshold(threshold):
    logits = torch.linspace(-6, 6, 1001)
    expected = torch.sigmoid(logits.double()) > threshold
    away = (torch.sigmoid(logits.double()) - threshold).abs() > 1e-6  # ties decided by rounding either way
    assert torch.equal(infer.segment(logits, threshold)[away], expected[away])
    with pytest.raises(ValueError):
        infer.segment(logits, 1.0)


def test_tta_averages_the_logits_of_the_eight_mirrorings():
    torch.manual_seed(0)
    net = Voxelwise(3)  # no dropout, not symmetric: flips change its output
    image = torch.randn(1, 12, 10, 8)
    flips = [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]
    expected = torch.stack([net(image.flip(a)[None])[0, 0].flip([d - 1 for d in a]) if a else net(image[None])[0, 0]
                            for a in flips]).mean(0)
    got = infer.predict_logits(net, image, amp=False, tta=True)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, infer.predict_logits(net, image, amp=False), atol=1e-3)


def test_predict_writes_a_mask_in_the_input_grid(finished, dataset, tmp_path):
    source = scans_of(dataset)[0]
    output = tmp_path / "sub" / "mask.nii.gz"
    assert predict("--checkpoint", finished / "best.pt", "--input", source, "--output", output) == 0
    mask, image = nib.load(output), nib.load(source)
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine)
    assert not list(output.parent.glob(".tmp-*"))


def test_predict_a_folder_writes_one_mask_per_scan_named_after_it(finished, dataset, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for source in scans_of(dataset, 3):
        (folder / source.name).write_bytes(source.read_bytes())
    out = tmp_path / "masks"
    assert predict("--checkpoint", finished / "best.pt", "--input", folder, "--output", out,
                   "--save-probabilities") == 0
    for source in folder.iterdir():
        stem = source.name[:-len(".nii")]
        mask, prob = nib.load(out / f"{stem}_mask.nii.gz"), nib.load(out / f"{stem}_prob.nii.gz")
        assert mask.shape == prob.shape == nib.load(source).shape
        values = np.asarray(prob.dataobj)
        assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= 1
        # the mask is the probability map thresholded at 0.5
        assert np.array_equal(np.asarray(mask.dataobj) == 1, values > 0.5)


def test_predict_refuses_a_corrupt_scan_in_a_folder_before_the_model_runs(finished, dataset, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for source in scans_of(dataset, 2):
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.nii").write_bytes(b"not a nifti file")
    out = tmp_path / "masks"
    assert predict("--checkpoint", finished / "best.pt", "--input", folder, "--output", out) == 2
    err = capsys.readouterr().err
    assert "broken.nii" in err and "Traceback" not in err and not out.exists()


def test_a_scan_that_fails_during_prediction_is_named_and_the_others_written(finished, dataset, tmp_path,
                                                                             monkeypatch, capsys):
    sources = scans_of(dataset, 3)
    predict_logits = infer.predict_logits

    def fail_on_the_second(model, image, *args, **kwargs):
        fail_on_the_second.calls += 1
        if fail_on_the_second.calls == 2:
            raise RuntimeError("out of memory")
        return predict_logits(model, image, *args, **kwargs)
    fail_on_the_second.calls = 0
    monkeypatch.setattr(infer, "predict_logits", fail_on_the_second)
    out = tmp_path / "masks"
    assert predict("--checkpoint", finished / "best.pt", "--input", *sources, "--output", out) == 1
    err = capsys.readouterr().err
    assert sources[1].name in err and "1 of 3 scans failed" in err
    written = sorted(p.name for p in out.iterdir())
    stems = [s.name[:-4] for s in (sources[0], sources[2])]
    assert written == sorted(["summary.csv", *(f"{s}_{o}" for s in stems for o in ("mask.nii.gz", "lesions.csv"))])
    assert [row["scan"] for row in csv.DictReader(open(out / "summary.csv"))] == [s + ".nii" for s in stems]


def test_predict_never_writes_over_its_input(finished, dataset, tmp_path, capsys):
    source = tmp_path / "scan.nii.gz"
    nib.save(nib.load(scans_of(dataset)[0]), source)
    before = source.read_bytes()
    link = tmp_path / "link.nii.gz"
    link.symlink_to(source)
    for output in (source, link, tmp_path / "." / "scan.nii.gz"):
        assert predict("--checkpoint", finished / "best.pt", "--input", source, "--output", output,
                       "--overwrite") == 2
        assert "is one of the inputs" in capsys.readouterr().err
    assert source.read_bytes() == before


def test_predict_refuses_an_existing_output_unless_overwrite(finished, dataset, tmp_path, capsys):
    source, output = scans_of(dataset)[0], tmp_path / "mask.nii.gz"
    output.write_bytes(b"the user's own file")
    assert predict("--checkpoint", finished / "best.pt", "--input", source, "--output", output) == 2
    assert "--overwrite" in capsys.readouterr().err and output.read_bytes() == b"the user's own file"
    assert predict("--checkpoint", finished / "best.pt", "--input", source, "--output", output, "--overwrite") == 0
    assert nib.load(output).shape == nib.load(source).shape


def test_predict_resamples_a_scan_of_another_voxel_size_to_the_training_one(finished, dataset, tmp_path):
    source_path = scans_of(dataset)[0]
    source = nib.load(source_path)
    fine = np.repeat(np.asarray(source.dataobj, dtype=np.float32), 2, axis=0)  # half the voxel size along x
    affine = source.affine @ np.diag([0.5, 1, 1, 1])
    affine[:3, 3] -= source.affine[:3, 0] / 4  # voxel centres of the halves: the same field of view
    path = tmp_path / "fine.nii.gz"
    nib.save(nib.Nifti1Image(fine, affine), path)
    for name, scan in (("ref", source_path), ("fine", path)):
        assert predict("--checkpoint", finished / "best.pt", "--input", scan, "--output", tmp_path / f"{name}_mask.nii.gz",
                       "--save-probabilities") == 0
    out = nib.load(tmp_path / "fine_mask.nii.gz")
    assert out.shape == fine.shape
    np.testing.assert_allclose(out.affine, affine)
    ref = np.asarray(nib.load(tmp_path / "ref_mask_prob.nii.gz").dataobj)
    back = np.asarray(nib.load(tmp_path / "fine_mask_prob.nii.gz").dataobj)
    back = (back[0::2] + back[1::2]) / 2  # the fine grid averaged back to the training one
    # Resampled to the checkpoint's 4 mm, the fine scan is the training-grid scan again: the same probabilities
    # up to the interpolation at the brain's edge.
    assert np.abs(back - ref).mean() < 0.02 and np.abs(back - ref).max() < 0.5


def test_any_orientation_of_a_scan_gives_the_same_mask_in_world_space(finished, dataset, tmp_path):
    source = nib.load(scans_of(dataset)[0])
    array = np.asarray(source.dataobj, dtype=np.float32)
    flip_x = np.diag([-1.0, 1, 1, 1])
    flip_x[0, 3] = array.shape[0] - 1
    flip_xy = np.diag([-1.0, -1, 1, 1])
    flip_xy[:2, 3] = np.array(array.shape[:2]) - 1
    permute = np.eye(4)[[2, 0, 1, 3]]  # voxel (i, j, k) of the copy is voxel (j, k, i) of the RAS scan
    copies = {"RAS": (array, source.affine),
              "LAS": (array[::-1], source.affine @ flip_x),
              "LPS": (array[::-1, ::-1], source.affine @ flip_xy),
              "PIL-like": (array.transpose(2, 0, 1), source.affine @ permute.T)}
    masks = {}
    for name, (data_, affine) in copies.items():
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data_), affine), path)
        out = tmp_path / f"{name}_mask.nii.gz"
        assert predict("--checkpoint", finished / "best.pt", "--input", path, "--output", out) == 0
        written = nib.load(out)
        assert written.shape == data_.shape and np.allclose(written.affine, affine)  # the input's own grid
        masks[name] = np.asarray(nib.as_closest_canonical(written).dataobj)  # the same world-space grid
    assert masks["RAS"].any()
    for name, mask in masks.items():
        assert np.array_equal(mask, masks["RAS"]), name


def test_inside_resolves_links_and_dots(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "link.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    assert infer.inside(out / "a_mask.nii.gz", out) == out.resolve() / "a_mask.nii.gz"
    for path in (out / ".." / "a_mask.nii.gz", out / "link.nii.gz", out, tmp_path / "outside" / "x.nii.gz"):
        with pytest.raises(infer.UsageError, match="outside the output folder"):
            infer.inside(path, out)


def test_atomic_names_its_temporary_so_that_leftovers_are_told_apart(tmp_path):
    seen = []
    infer.atomic(tmp_path / "a.txt", lambda tmp: (seen.append(tmp.name), tmp.write_text("a")))
    assert seen == [f".tmp-{os.getpid()}-a.txt"] and (tmp_path / "a.txt").read_text() == "a"
    assert not infer.remove_leftovers(tmp_path / "absent")


def oblique_folder(dataset, folder):
    """A folder of two scans: a phantom scan as it is, and the same voxels under an anisotropic (3 x 4 x 5 mm),
    rotated affine, so that lesion volumes need the affine's determinant and centroids its rotation."""
    source = nib.load(scans_of(dataset)[0])
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("zx", [25, 10], degrees=True).as_matrix() @ np.diag([3.0, 4.0, 5.0])
    affine[:3, 3] = [-70, -100, -60]
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj, dtype=np.float32), affine), folder / "oblique.nii.gz")
    nib.save(source, folder / "plain.nii.gz")
    return folder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_a_folder_writes_lesion_tables_and_a_summary_that_an_independent_count_confirms(
        finished, dataset, tmp_path):
    folder, out = oblique_folder(dataset, tmp_path / "in"), tmp_path / "out"
    assert predict("--checkpoint", finished / "best.pt", "--input", folder, "--output", out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "oblique_lesions.csv", "oblique_mask.nii.gz", "plain_lesions.csv", "plain_mask.nii.gz", "summary.csv"]
    summary = {row["scan"]: row for row in read_csv(out / "summary.csv")}
    assert list(summary) == ["oblique.nii.gz", "plain.nii.gz"]
    for name in ("oblique", "plain"):
        written = nib.load(out / f"{name}_mask.nii.gz")
        mask = np.asarray(written.dataobj)
        labels, count = ndimage.label(mask, ndimage.generate_binary_structure(3, 2))  # 18-connectivity
        voxel_mm3 = abs(np.linalg.det(written.affine[:3, :3]))
        assert count > 1
        row = summary[f"{name}.nii.gz"]
        assert int(row["lesion_count"]) == count and float(row["threshold"]) == 0.5
        assert float(row["lesion_volume_ml"]) == pytest.approx(mask.sum() * voxel_mm3 / 1000, rel=1e-5)
        lesions = read_csv(out / f"{name}_lesions.csv")
        assert len(lesions) == count and list(lesions[0]) == list(metrics.LESION_COLUMNS)
        sizes = sorted(np.bincount(labels.ravel())[1:].tolist(), reverse=True)
        assert [int(r["voxels"]) for r in lesions] == sizes  # numbered by decreasing size
        largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        centroid = np.argwhere(largest).mean(0)
        world = written.affine @ [*centroid, 1]
        got = lesions[0]
        assert float(got["volume_ml"]) == pytest.approx(largest.sum() * voxel_mm3 / 1000, rel=1e-5)
        np.testing.assert_allclose([float(got[f"centroid_{a}"]) for a in "ijk"], centroid, atol=1e-3)
        np.testing.assert_allclose([float(got[f"centroid_{a}_mm"]) for a in "xyz"], world[:3], atol=1e-3)
        assert 0.5 < float(got["mean_probability"]) <= float(got["max_probability"]) <= 1


def test_min_lesion_size_drops_small_lesions_from_the_mask_the_tables_and_the_lesion_map(finished, dataset, tmp_path):
    folder = oblique_folder(dataset, tmp_path / "in")
    for name, size in (("all", 0), ("large", 300)):
        assert predict("--checkpoint", finished / "best.pt", "--input", folder, "--output", tmp_path / name,
                       "--min-lesion-size", size, "--lesion-map") == 0
    every = np.asarray(nib.load(tmp_path / "all" / "oblique_mask.nii.gz").dataobj)
    large = nib.load(tmp_path / "large" / "oblique_mask.nii.gz")
    labels, count = ndimage.label(every, ndimage.generate_binary_structure(3, 2))
    volumes = np.bincount(labels.ravel())[1:] * abs(np.linalg.det(large.affine[:3, :3]))
    kept = np.flatnonzero(volumes >= 300) + 1
    assert 0 < len(kept) < count
    assert np.array_equal(np.asarray(large.dataobj) == 1, np.isin(labels, kept))
    lesions = read_csv(tmp_path / "large" / "oblique_lesions.csv")
    assert len(lesions) == len(kept) and min(float(r["volume_ml"]) for r in lesions) >= 0.3
    assert read_csv(tmp_path / "large" / "summary.csv")[0]["min_lesion_size_mm3"] == "300"
    lesion_map = np.asarray(nib.load(tmp_path / "large" / "oblique_lesions.nii.gz").dataobj)
    assert [int((lesion_map == int(r["lesion_id"])).sum()) for r in lesions] == [int(r["voxels"]) for r in lesions]
    assert np.array_equal(lesion_map > 0, np.asarray(large.dataobj) == 1)
    assert predict("--checkpoint", finished / "best.pt", "--input", folder, "--output", tmp_path / "x",
                   "--min-lesion-size", "-1") == 2 and not (tmp_path / "x").exists()


def test_qc_writes_a_picture_per_scan_beside_its_mask(finished, dataset, tmp_path):
    source, output = scans_of(dataset)[0], tmp_path / "sub" / "mask.nii.gz"
    assert predict("--checkpoint", finished / "best.pt", "--input", source, "--output", output, "--qc") == 0
    assert sorted(p.name for p in output.parent.iterdir()) == ["mask.nii.gz", "mask_lesions.csv", "mask_qc.png"]
    height, width = imread(output.parent / "mask_qc.png").shape[:2]
    assert width > 800 and height > 600


def test_participant_label_needs_a_bids_dataset(finished, dataset, tmp_path, capsys):
    assert predict("--checkpoint", finished / "best.pt", "--input", scans_of(dataset)[0], "--output",
                   tmp_path / "m.nii.gz", "--participant-label", "01") == 2
    assert "--participant-label applies to a BIDS dataset" in capsys.readouterr().err


def test_the_pace_line_projects_an_epoch_and_a_run_and_shows_once(tmp_path, capsys, monkeypatch):
    line = train.pace_line(2.0, 100, 50, suggest_quick=True)
    assert line.startswith("pace: 2 s per training step: about 3 min per epoch of 100 steps, 2.8 h for 50 epochs")
    assert "--quick" in line and "--quick" not in train.pace_line(0.1, 10, 5, suggest_quick=False)
    cpu = torch.device("cpu")
    for seconds, shown_after in ((1e9, train.PACE_STEPS), (0.0, 2)):  # slow steps: shown after the second
        monkeypatch.setattr(train, "PACE_SECONDS", seconds)
        log = train.Log(tmp_path / f"{seconds}.log")
        for epoch in range(2):
            for step in range(1, 11):
                log.pace(step, 10, cpu, train.PAPER)
                if epoch == 0 and step == shown_after - 1:
                    assert "pace: " not in capsys.readouterr().out
        printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pace: ")]
        assert len(printed) == 1 and "--quick" in printed[0]  # the paper's 144³ patches on a CPU
        assert (tmp_path / f"{seconds}.log").read_text().splitlines() == printed


def test_the_docs_describe_every_column_as_the_code_does():
    text = (Path(__file__).resolve().parent.parent / "docs" / "predict.md").read_text()
    for columns in (metrics.LESION_COLUMNS, metrics.SUMMARY_COLUMNS):
        for name, (description, units) in columns.items():
            assert f"| `{name}` | {units or ''} | {description} |" in text, name
