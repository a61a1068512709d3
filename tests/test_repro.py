import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

import phantom
import repro

FILES = ("config.json", "history.csv", "metrics.json", "best.pt", "last.pt", "fig6.png", "fig7.png")
TINY = ["--epochs", "2", "--patch-size", "32", "--patches-per-scan", "2", "--base-filters", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 subjects x 2 time points of the built-in phantom at 4 mm (46 x 55 x 46 voxels)."""
    root = tmp_path_factory.mktemp("phantom")
    return phantom.generate(root, seed=0, spacing=4.0, subjects=3, timepoints=(2, 2, 2), progress=False)


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY]) == 0
    return out


def history(out):
    with open(out / "history.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_a_run_writes_every_file(finished, dataset):
    for name in FILES:
        assert (finished / name).is_file(), name
    config = json.loads((finished / "config.json").read_text())
    ids = [i for part in config["split_ids"].values() for i in part]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6
    assert [len(config["split_ids"][k]) for k in ("train", "val", "test")] == [4, 1, 1]
    assert config["lr"] == 1e-4 and config["model"] == "residual" and config["versions"]["torch"]
    assert config["dataset"].startswith("synthetic MS data (phantom.py")
    assert len(history(finished)) == 2
    results = json.loads((finished / "metrics.json").read_text())
    assert set(results["scans"]) == set(config["split_ids"]["test"])
    assert 0 <= results["mean"]["dsc"] <= 1 and 0 <= results["mean"]["iou"] <= results["mean"]["dsc"]
    for key in ("ltpr", "lfpr", "hd95_mm", "isbi_score", "ppv", "tpr"):
        assert key in results["mean"]


def test_predictions_are_in_the_original_grid(finished, dataset):
    test_id = json.loads((finished / "config.json").read_text())["split_ids"]["test"][0]
    subject = test_id.split("_")[0]
    source = nib.load(dataset / "training" / subject / "preprocessed" / f"{test_id}_flair_pp.nii")
    pred = nib.load(finished / "predictions" / f"{test_id}_pred.nii.gz")
    assert pred.shape == source.shape
    np.testing.assert_allclose(pred.affine, source.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_predict_writes_a_mask_in_the_input_grid(finished, dataset, tmp_path):
    source = next((dataset / "training").glob("*/preprocessed/*_flair_pp.nii"))
    output = tmp_path / "sub" / "mask.nii.gz"
    assert repro.main(["predict", "--checkpoint", str(finished / "best.pt"), "--input", str(source),
                       "--output", str(output), "--device", "cpu"]) == 0
    mask, image = nib.load(output), nib.load(source)
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine)
    assert not list(output.parent.glob(".tmp-*"))


def test_interrupted_run_resumed_matches_uninterrupted(finished, dataset, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    evaluate, calls = repro.evaluate, []

    def interrupt_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(repro, "evaluate", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        repro.main(["--data", str(dataset), "--out", str(out), *TINY])
    assert len(history(out)) == 1 and not (out / "metrics.json").exists()
    monkeypatch.setattr(repro, "evaluate", evaluate)
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--resume"]) == 0
    assert history(out) == history(finished)
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, finished))
    assert ours == theirs


def test_same_seed_same_weights(finished, dataset, tmp_path):
    out = tmp_path / "again"
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--epochs", "1"]) == 0
    first = torch.load(finished / "last.pt", weights_only=False)
    assert history(out)[0] == history(finished)[0]
    again = torch.load(out / "last.pt", weights_only=False)
    assert again["state"]["history"][0]["train_loss"] == first["state"]["history"][0]["train_loss"]


def error_of(capsys, argv):
    assert repro.main(argv) == 2
    return capsys.readouterr().err


def test_unknown_model_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        repro.main(["--model", "vnet"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_unknown_channel_is_refused(capsys, tmp_path):
    assert "unknown channel 'DWI'" in error_of(capsys, ["--channel", "DWI", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_missing_data_path_is_refused(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    err = error_of(capsys, ["--data", str(missing), "--out", str(tmp_path / "o"), *TINY])
    assert str(missing) in err and not (tmp_path / "o").exists()


def test_patch_larger_than_every_scan_is_refused(capsys, dataset, tmp_path):
    err = error_of(capsys, ["--data", str(dataset), "--out", str(tmp_path / "o"), *TINY, "--patch-size", "128"])
    assert "larger than every cropped scan" in err and not (tmp_path / "o").exists()


def test_unwritable_out_is_refused(capsys, dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = error_of(capsys, ["--data", str(dataset), "--out", str(blocker / "run"), *TINY])
    assert "cannot write" in err


def test_existing_out_needs_resume_or_overwrite(capsys, finished, dataset):
    before = (finished / "metrics.json").read_bytes()
    err = error_of(capsys, ["--data", str(dataset), "--out", str(finished), *TINY])
    assert "--resume" in err and "--overwrite" in err
    assert (finished / "metrics.json").read_bytes() == before


def test_checkpoint_of_another_model_is_refused(capsys, finished, dataset, tmp_path):
    err = error_of(capsys, ["--data", str(dataset), "--out", str(finished), *TINY, "--model", "unet", "--resume",
                            "--base-filters", "4"])
    assert "model='residual'" in err
    source = next((dataset / "training").glob("*/preprocessed/*_flair_pp.nii"))
    err = error_of(capsys, ["predict", "--checkpoint", str(finished / "best.pt"), "--input", str(source),
                            "--output", str(tmp_path / "m.nii.gz"), "--model", "unet"])
    assert "Residual 3D U-Net" in err and not (tmp_path / "m.nii.gz").exists()
    err = error_of(capsys, ["predict", "--checkpoint", str(finished / "history.csv"), "--input", str(source),
                            "--output", str(tmp_path / "m.nii.gz")])
    assert "not a checkpoint" in err


def test_sliding_window_blends_to_the_whole_scan_result():
    # A network that sees only single voxels (1x1x1 convolution) gives the same logits tiled or whole.
    net = torch.nn.Conv3d(1, 1, 1)
    image = torch.randn(40, 33, 20)
    whole = repro.predict_logits(net, image)
    tiled = repro.predict_logits(net, image, window=16)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
