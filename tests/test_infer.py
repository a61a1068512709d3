import os

import nibabel as nib
import numpy as np
import pytest
import torch

import infer
import repro


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
    assert written == sorted(f"{s.name[:-4]}_mask.nii.gz" for s in (sources[0], sources[2]))


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
