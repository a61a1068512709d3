import csv
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import infer
import repro
import train
from conftest import TINY


def history(out):
    with open(out / "history.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_a_run_writes_every_file(finished):
    for name in train.OUTPUTS:
        assert (finished / name).exists(), name
    config = json.loads((finished / "config.json").read_text())
    ids = [i for part in config["split_ids"].values() for i in part]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6
    assert [len(config["split_ids"][k]) for k in ("train", "val", "test")] == [4, 1, 1]
    assert config["protocol"]["lr"] == 1e-4 and config["protocol"]["model"] == "residual"
    assert config["versions"]["torch"] and config["data_fingerprint"]
    assert config["dataset"].startswith("synthetic MS data (phantom.py")
    assert len(history(finished)) == 2
    results = json.loads((finished / "metrics.json").read_text())
    assert set(results["scans"]) == set(config["split_ids"]["test"])
    assert 0 <= results["mean"]["dsc"] <= 1 and 0 <= results["mean"]["iou"] <= results["mean"]["dsc"]
    for key in ("ltpr", "lfpr", "hd95_mm", "ppv", "tpr"):
        assert key in results["mean"]


def test_config_records_the_protocol_that_ran(finished):
    config = json.loads((finished / "config.json").read_text())
    protocol = train.Protocol(**{**config["protocol"], "channels": tuple(config["protocol"]["channels"])})
    assert protocol.patch_size == 32 and protocol.epochs == 2 and protocol.base_filters == 4
    assert "command" not in config  # sys.argv is not what ran under --table2 or main(argv)


def test_predictions_are_in_the_original_grid(finished, dataset):
    test_id = json.loads((finished / "config.json").read_text())["split_ids"]["test"][0]
    subject = test_id.split("_")[0]
    source = nib.load(dataset / "training" / subject / "preprocessed" / f"{test_id}_flair_pp.nii")
    pred = nib.load(finished / "predictions" / f"{test_id}_pred.nii.gz")
    assert pred.shape == source.shape
    np.testing.assert_allclose(pred.affine, source.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def interrupt_in_epoch_two(monkeypatch):
    """Ctrl-C during the second validation; returns the real validate, to undo it."""
    validate, calls = train.validate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return validate(*args, **kwargs)
    monkeypatch.setattr(train, "validate", interrupted)
    return validate


def test_interrupted_run_resumed_matches_uninterrupted(finished, dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "interrupted"
    validate = interrupt_in_epoch_two(monkeypatch)
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY]) == 130
    err = capsys.readouterr().err
    assert "last saved after epoch 1" in err and "--resume" in err and "Traceback" not in err
    assert len(history(out)) == 1 and not (out / "metrics.json").exists()
    monkeypatch.setattr(train, "validate", validate)
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--resume"]) == 0
    assert history(out) == history(finished)
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, finished))
    assert ours == theirs


def test_resume_needs_only_the_folder(finished, dataset, tmp_path, monkeypatch):
    out = tmp_path / "short"
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--epochs", "1"]) == 0
    # --resume with --out alone continues with config.json's settings; --epochs may grow.
    assert repro.main(["--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert history(out) == history(finished)


def test_same_seed_same_weights(finished, dataset, tmp_path):
    out = tmp_path / "again"
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--epochs", "1"]) == 0
    first = torch.load(finished / "last.pt", weights_only=False)
    assert history(out)[0] == history(finished)[0]
    again = torch.load(out / "last.pt", weights_only=False)
    assert again["history"][0]["train_loss"] == first["history"][0]["train_loss"]


def test_a_run_stopped_before_its_first_epoch_leaves_nothing_and_a_killed_one_is_replaced(
        finished, dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "failed"

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_one_epoch", die)
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY]) == 130
    assert "no epoch of" in capsys.readouterr().err and not out.exists()  # what it wrote went, and the folder
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--resume"]) == 2
    assert "start the run without --resume" in capsys.readouterr().err
    monkeypatch.undo()
    out.mkdir()  # a run killed (SIGKILL) before its first epoch leaves its config.json and train.log
    for name in ("config.json", "train.log"):
        shutil.copy(finished / name, out)
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--epochs", "1"]) == 0
    assert "replacing a run that stopped before its first epoch" in capsys.readouterr().out


def test_a_non_finite_loss_stops_the_run_and_keeps_what_was_good(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    validate, calls = train.validate, []

    def nan_in_epoch_two(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return validate(model, *args, **kwargs)

    monkeypatch.setattr(train, "validate", nan_in_epoch_two)
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY]) == 1
    err = capsys.readouterr().err
    assert "validation loss is nan" in err and "--lr" in err and "Traceback" not in err
    assert (out / "best.pt").exists() and len(history(out)) == 1
    best = torch.load(out / "best.pt", weights_only=False)
    assert all(torch.isfinite(p).all() for p in best["model"].values())


def test_the_log_without_a_terminal_is_one_plain_line_per_epoch(finished):
    log = (finished / "train.log").read_text()
    assert "\r" not in log
    assert len(re.findall(r"^epoch \d+/2: train loss [\d.]+, val loss [\d.]+, val DSC [\d.]+, .*ETA", log, re.M)) == 2


def test_report_names_files_that_exist(finished):
    report = (finished / "report.md").read_text()
    embedded = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert set(embedded) == {"fig6.png", "fig7.png"}
    for name in embedded:
        assert (finished / name).is_file()
    assert "Dataset: synthetic MS data" in report and "| **mean** |" in report


def test_test_metrics_are_measured_in_each_scans_own_grid(dataset, tmp_path):
    # The data are at 4 mm and the network runs at 3.5 mm: the prepared grid is not the scans' own.
    out = tmp_path / "resampled"
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--spacing", "3.5", "--label", "union"]) == 0
    results = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    assert results["grid"] == "native" and results["scans"]
    masks = dataset / "training"
    for sid, scores in results["scans"].items():
        pred = nib.load(out / "predictions" / f"{sid}_pred.nii.gz")
        raters = [nib.load(masks / sid.split("_")[0] / "masks" / f"{sid}_mask{r}.nii") for r in (1, 2)]
        p = np.asarray(pred.dataobj) != 0
        t = (np.asarray(raters[0].dataobj) != 0) | (np.asarray(raters[1].dataobj) != 0)  # --label union
        assert p.shape == t.shape == raters[0].shape
        assert p.any() and t.any()
        expected = 2 * (p & t).sum() / (p.sum() + t.sum())
        assert scores["dsc"] == pytest.approx(expected, abs=1e-6)
        assert scores["spacing_mm"] == pytest.approx([4.0, 4.0, 4.0])
        # lesions and volumes: 18-connected components and the header's voxel volume, in that same grid
        voxel_ml = abs(np.linalg.det(raters[0].affine[:3, :3])) / 1000
        structure = ndimage.generate_binary_structure(3, 2)
        for who, mask in (("pred", p), ("truth", t)):
            assert scores[f"{who}_lesions"] == ndimage.label(mask, structure)[1]
            assert scores[f"{who}_volume_mm3"] / 1000 == pytest.approx(mask.sum() * voxel_ml)
        row = (f"| {sid} | {scores['truth_lesions']} | {scores['pred_lesions']} | {t.sum() * voxel_ml:.3f} | "
               f"{p.sum() * voxel_ml:.3f} | 4 x 4 x 4 |")
        assert row in report
        rater1 = np.asarray(raters[0].dataobj) != 0  # the ISBI terms against each rater, also in that grid
        assert scores["raters"][0]["dsc"] == pytest.approx(2 * (p & rater1).sum() / (p.sum() + rater1.sum()),
                                                            abs=1e-6)


def test_early_stopping_records_improvements():
    stopper = train.EarlyStopping(patience=2)
    assert stopper.record(1.0) and not stopper.record(1.0) and stopper.record(0.5)
    assert not stopper.record(0.6) and not stopper.stop and not stopper.record(0.7) and stopper.stop
    assert (stopper.epoch, stopper.best_epoch, stopper.best_loss) == (5, 3, 0.5)


@pytest.mark.skipif(not infer.amp_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_bf16_autocast_on_a_cpu_that_has_it(dataset, tmp_path):
    out = tmp_path / "bf16"
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--epochs", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16 autocast"
    net = torch.nn.Conv3d(1, 1, 3)
    with infer.autocast(torch.device("cpu"), True):
        assert net(torch.zeros(1, 1, 4, 4, 4)).dtype == torch.bfloat16
    with infer.autocast(torch.device("cpu"), False):
        assert net(torch.zeros(1, 1, 4, 4, 4)).dtype == torch.float32


def constant_patches(value, n=20):
    return [(torch.full((1, 1, 4, 4, 4), float(value)), torch.full((1, 1, 4, 4, 4), float(value)))
            for _ in range(n)]


def test_mix_up_mixes_image_and_mask_with_the_same_lambda():
    mixed = list(train.mix_up(constant_patches(1), constant_patches(0), 0.4, torch.Generator().manual_seed(0)))
    lams = [image.flatten()[0].item() for image, _ in mixed]
    for (image, label), lam in zip(mixed, lams):
        assert torch.equal(image, label) and (image == lam).all()  # one λ per pair, image and mask alike
    assert min(lams) >= 0.5 and max(lams) < 1 and len(set(lams)) == len(lams)  # λ = max(λ, 1 - λ), drawn anew
    again = list(train.mix_up(constant_patches(1), constant_patches(0), 0.4, torch.Generator().manual_seed(0)))
    assert [i.flatten()[0].item() for i, _ in again] == lams  # seeded by the run's generator


def test_mix_up_with_alpha_near_zero_gives_back_the_first_patch():
    mixed = list(train.mix_up(constant_patches(1), constant_patches(0), 1e-4, torch.Generator().manual_seed(0)))
    for image, label in mixed:
        torch.testing.assert_close(image, torch.ones_like(image), atol=1e-3, rtol=0)
        torch.testing.assert_close(label, torch.ones_like(label), atol=1e-3, rtol=0)


def test_a_two_channel_mix_up_run_resumes_exactly(dataset, tmp_path, monkeypatch):
    argv = ["--data", str(dataset), *TINY, "--channel", "FLAIR,T2W", "--mixup", "0.4"]
    whole = tmp_path / "whole"
    assert repro.main([*argv, "--out", str(whole)]) == 0
    config = json.loads((whole / "config.json").read_text())
    assert config["channels"] == ["FLAIR", "T2W"] and config["network"]["in_channels"] == 2
    assert torch.load(whole / "best.pt", weights_only=False)["config"]["channels"] == ["FLAIR", "T2W"]
    validate = interrupt_in_epoch_two(monkeypatch)
    part = tmp_path / "part"
    assert repro.main([*argv, "--out", str(part)]) == 130
    monkeypatch.setattr(train, "validate", validate)
    assert repro.main([*argv, "--out", str(part), "--resume"]) == 0
    assert history(part) == history(whole)
    plain = tmp_path / "plain"
    assert repro.main(["--data", str(dataset), *TINY, "--channel", "FLAIR,T2W", "--out", str(plain)]) == 0
    assert history(plain) != history(whole)  # mix-up changed what was trained on


DDP_WRAPPER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import repro, train
save_epoch = train.save_epoch
def save_and_dump(run, model, *args, **kwargs):
    save_epoch(run, model, *args, **kwargs)  # every rank dumps its parameters: they must agree
    torch.save(model.state_dict(), {dump!r} + f"/rank{{dist.get_rank()}}.pt")
train.save_epoch = save_and_dump
sys.exit(repro.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs two GPUs"))])
def test_two_processes_under_torchrun_write_a_run_and_agree(device, finished, dataset, tmp_path):
    import os
    import subprocess
    import sys
    dump = tmp_path / "dump"
    dump.mkdir()
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(DDP_WRAPPER.format(root=str(os.getcwd()), dump=str(dump)))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(wrapper),
               "--data", str(dataset), "--out", str(out), *TINY, "--device", device]  # gloo on cpu, NCCL on cuda
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in finished.iterdir())
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and len(history(out)) == 2
    ranks = [torch.load(dump / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    last = torch.load(out / "last.pt", weights_only=False)
    assert len(last["ranks"]) == 2 and "patch_generator" in last["ranks"][1]
    assert all(torch.equal(last["model"][k], ranks[0][k]) for k in ranks[0])
    # the log says how the epoch was shared, once (rank 0 alone prints)
    assert done.stdout.count("2 processes (torchrun) of 4 each") == 1
    # a resume on another process count is refused by name
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--resume", "--epochs", "3"]) == 2


def test_norm_crop_trains_and_predicts_with_the_scans_own_background(dataset, tmp_path, monkeypatch):
    seen = []
    paper_augmentation = train.augment.paper_augmentation

    def spy(**kwargs):
        seen.append(kwargs["background"])
        return paper_augmentation(**kwargs)
    monkeypatch.setattr(train.augment, "paper_augmentation", spy)
    out = tmp_path / "crop"
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--epochs", "1", "--norm", "crop"]) == 0
    assert seen and all(b[0] < -0.1 for b in seen)  # TorchIO's whole-crop z-score puts the background below 0
    assert json.loads((out / "config.json").read_text())["norm"] == "crop"
    source = sorted((dataset / "training").glob("*/preprocessed/*_flair_pp.nii"))[0]
    assert repro.main(["predict", "--checkpoint", str(out / "best.pt"), "--input", str(source), "--output",
                       str(tmp_path / "m.nii.gz")]) == 0
