"""Every user error is one clear line naming the flag or file, a non-zero exit, no traceback, and nothing
left behind in --out or beside --output. One case per row; the fixtures build the bad inputs."""
import contextlib
import csv
import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch

import data
import infer
import repro
import train
from conftest import TINY
from infer import UsageError

ROOT = Path(__file__).resolve().parent.parent


def run(argv):
    try:
        return repro.main(argv)
    except SystemExit as e:  # argparse's own refusals
        return e.code


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else None


def interrupt_call(monkeypatch, module, name, n):
    """Ctrl-C at the ``n``-th call of ``module.name`` (the calls before it run as usual)."""
    original, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, interrupted)


def check_refused(capsys, argv, names, watch, code=2):
    before = {w: listing(w) for w in watch}
    assert run(argv) == code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and names in err, err
    for w in watch:
        assert listing(w) == before[w], f"{w} changed"
    return err


@pytest.fixture(scope="module")
def manifests(dataset, tmp_path_factory):
    """Bad manifests built from the phantom's files."""
    root = tmp_path_factory.mktemp("manifests")
    rows = []
    for image in sorted((dataset / "training").glob("*/preprocessed/*_flair_pp.nii")):
        sid = image.name[: -len("_flair_pp.nii")]
        subject, tp = sid.split("_")
        rows.append({"subject": subject, "timepoint": int(tp), "FLAIR": str(image),
                     "mask": str(image.parent.parent / "masks" / f"{sid}_mask1.nii")})

    def write(name, rows, fields=None):
        path = root / name
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path

    out = {"no_val": write("no_val.csv", [{**r, "split": "train" if i < 5 else "test"} for i, r in enumerate(rows)]),
           "missing": write("missing.csv", [*rows[:-1], {**rows[-1], "FLAIR": str(root / "gone.nii")}]),
           "twice": write("twice.csv", [*rows[:-1], {**rows[-1], "FLAIR": rows[0]["FLAIR"]}])}
    empty = root / "empty_masks"
    empty.mkdir()
    blank = []
    for r in rows:
        m = nib.load(r["mask"])
        path = empty / f"{r['subject']}_{r['timepoint']}_mask.nii"
        nib.save(nib.Nifti1Image(np.zeros(m.shape, np.uint8), m.affine), path)
        blank.append({**r, "mask": str(path)})
    out["empty_masks"] = write("empty_masks.csv", blank)
    tiny = root / "tiny"
    tiny.mkdir()
    small = []
    for i in range(6):
        image = np.zeros((8, 8, 8), np.float32)
        image[1:7, 1:7, 1:7] = np.random.default_rng(i).random((6, 6, 6)) + 1
        mask = np.zeros((8, 8, 8), np.uint8)
        mask[3:5, 3:5, 3:5] = 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), tiny / f"s{i}.nii.gz")
        nib.save(nib.Nifti1Image(mask, np.eye(4)), tiny / f"s{i}_mask.nii.gz")
        small.append({"subject": f"s{i}", "timepoint": 1, "FLAIR": str(tiny / f"s{i}.nii.gz"),
                      "mask": str(tiny / f"s{i}_mask.nii.gz")})
    out["tiny"] = write("tiny.csv", small)
    (root / "no_scans").mkdir()
    out["no_scans"] = root / "no_scans"
    return out


TRAIN_CASES = [
    (["--lr", "0"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--lr", "fast"], "--lr"), (["--weight-decay", "-1"], "--weight-decay"), (["--seed", "-1"], "--seed"),
    (["--epochs", "0"], "--epochs"), (["--patience", "0"], "--patience"), (["--patch-size", "0"], "--patch-size"),
    (["--patch-size", "40"], "--patch-size"), (["--patch-size", "16"], "--patch-size"),
    (["--patches-per-scan", "0"], "--patches-per-scan"), (["--base-filters", "0"], "--base-filters"),
    (["--window", "8"], "--window"), (["--device", "mps"], "--device"), (["--device", "meta"], "--device"),
    (["--device", "gpu"], "--device"), (["--channel", "DWI"], "DWI"), (["--channel", "FLAIR,flair"], "repeated"),
    (["--channel", ""], "--channel"), (["--mixup", "0"], "--mixup"), (["--mixup", "-1"], "--mixup"),
    (["--dropout", "1"], "--dropout"), (["--spacing", "0"], "--spacing"), (["--spacing", "-2"], "--spacing"),
    (["--model", "vnet"], "--model"), (["--seeds", "0,1"], "--seeds"),
    (["--table2", "--seeds", "0,0"], "--seeds"), (["--table2", "--seeds", "0,x"], "--seeds"),
    (["--table2", "--seeds", "0,1", "--seed", "2"], "--seeds"), (["--all-channels-row"], "--all-channels-row"),
    (["--unet-norm", "layer"], "--unet-norm"), (["--norm", "zscore"], "--norm"),
]
if not torch.cuda.is_available():
    TRAIN_CASES.append((["--device", "cuda"], "--device"))


@pytest.mark.parametrize("flags,names", TRAIN_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_setting_is_refused_before_anything_is_created(flags, names, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    check_refused(capsys, ["--data", str(dataset), "--out", str(out), *TINY, *flags], names, [tmp_path])
    assert not out.exists()


@pytest.mark.parametrize("name,names", [("no_val", "val empty"), ("missing", "gone.nii"), ("twice", "flair_pp.nii"),
                                        ("empty_masks", "empty"), ("tiny", "smaller than"), ("no_scans", "no_scans")])
def test_a_bad_dataset_is_refused_before_anything_is_created(name, names, manifests, tmp_path, capsys):
    out = tmp_path / "out"
    check_refused(capsys, ["--data", str(manifests[name]), "--out", str(out), *TINY], names, [tmp_path])
    assert not out.exists()


def test_a_missing_data_path_is_refused(tmp_path, capsys):
    check_refused(capsys, ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *TINY], "nowhere",
                  [tmp_path])


def test_a_patch_larger_than_every_scan_is_refused(dataset, tmp_path, capsys):
    check_refused(capsys, ["--data", str(dataset), "--out", str(tmp_path / "o"), *TINY, "--patch-size", "128"],
                  "larger than every cropped scan", [tmp_path])


def test_an_out_that_is_a_file_or_under_one_is_refused(dataset, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "run"):
        check_refused(capsys, ["--data", str(dataset), "--out", str(out), *TINY], str(blocker), [tmp_path])
    assert blocker.read_text() == ""


def test_resume_refusals_say_what_to_do(finished, dataset, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    check_refused(capsys, ["--data", str(dataset), "--out", str(fresh), *TINY, "--resume"], "without --resume",
                  [tmp_path])
    broken = tmp_path / "broken"
    shutil.copytree(finished, broken)
    (broken / "last.pt").write_bytes((finished / "last.pt").read_bytes()[:1000])  # truncated
    check_refused(capsys, ["--data", str(dataset), "--out", str(broken), *TINY, "--resume"], "--overwrite", [])
    (broken / "last.pt").write_bytes((finished / "last.pt").read_bytes())
    (broken / "config.json").unlink()
    check_refused(capsys, ["--data", str(dataset), "--out", str(broken), *TINY, "--resume"], "config.json", [broken])
    before = (finished / "metrics.json").read_bytes()
    check_refused(capsys, ["--data", str(dataset), "--out", str(finished), *TINY, "--resume", "--lr", "0.01"],
                  "lr=0.0001", [finished])
    check_refused(capsys, ["--data", str(dataset), "--out", str(finished), *TINY], "--overwrite", [finished])
    assert (finished / "metrics.json").read_bytes() == before


def test_resume_refuses_changed_data(finished, dataset, tmp_path, capsys):
    data_copy = tmp_path / "data"
    shutil.copytree(dataset, data_copy)
    run_copy = tmp_path / "run"
    shutil.copytree(finished, run_copy)
    subject = sorted((data_copy / "training").iterdir())[0]
    for file in list(subject.rglob(f"{subject.name}_01_*")):  # a scan added to --data: time point 09
        shutil.copy(file, file.with_name(file.name.replace("_01_", "_09_")))
    check_refused(capsys, ["--data", str(data_copy), "--out", str(run_copy), *TINY, "--resume"], "--resume",
                  [run_copy])


@pytest.fixture
def scan(dataset, tmp_path):
    source = sorted((dataset / "training").glob("*/preprocessed/*_flair_pp.nii"))[0]
    path = tmp_path / "in" / "scan.nii.gz"
    path.parent.mkdir()
    nib.save(nib.load(source), path)
    return path


def image_file(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def predict_cases(finished, scan, tmp):
    ckpt = str(finished / "best.pt")
    base = ["predict", "--checkpoint", ckpt, "--device", "cpu"]
    out = str(tmp / "out" / "mask.nii.gz")
    text = tmp / "in" / "notes.txt"
    text.write_text("hello")
    truncated = tmp / "in" / "cut.pt"
    truncated.write_bytes((finished / "best.pt").read_bytes()[:500])
    existing = tmp / "in" / "taken.nii.gz"
    existing.write_bytes(b"someone's file")
    blocker = tmp / "in" / "blocker"
    blocker.write_text("")
    empty = tmp / "in" / "empty"
    empty.mkdir()
    four_d = image_file(tmp / "in" / "4d.nii.gz", np.ones((8, 8, 8, 2), np.float32))
    nonfinite = np.ones((40, 40, 40), np.float32)
    nonfinite[3, 3, 3] = np.nan
    nan_file = image_file(tmp / "in" / "nan.nii.gz", nonfinite)
    corrupt = tmp / "in" / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b garbage")
    return [
        ([*base[:2], str(tmp / "none.pt"), "--input", str(scan), "--output", out], "none.pt"),
        ([*base[:2], str(finished / "history.csv"), "--input", str(scan), "--output", out], "history.csv"),
        ([*base[:2], str(truncated), "--input", str(scan), "--output", out], "cut.pt"),
        ([*base[:2], str(finished), "--input", str(scan), "--output", out], str(finished)),
        ([*base, "--input", str(tmp / "nope.nii.gz"), "--output", out], "nope.nii.gz"),
        ([*base, "--input", str(empty), "--output", str(tmp / "out")], "no NIfTI"),
        ([*base, "--input", str(scan), str(scan), "--output", str(tmp / "out")], "listed twice"),
        ([*base, "--input", str(scan), "--output", str(scan)], "one of the inputs"),
        ([*base, "--input", str(scan), "--output", str(scan.parent)], "is a folder"),
        ([*base, "--input", str(scan), "--output", str(existing)], "--overwrite"),
        ([*base, "--input", str(scan), "--output", str(blocker / "m.nii.gz")], "blocker"),
        ([*base, "--input", str(scan), "--output", str(tmp / "mask.png")], "--output"),
        ([*base, "--input", str(scan), "--output", out, "--threshold", "0"], "--threshold"),
        ([*base, "--input", str(scan), "--output", out, "--threshold", "1.5"], "--threshold"),
        ([*base, "--input", str(scan), "--output", out, "--window", "4"], "--window"),
        ([*base, "--input", str(scan), "--output", out, "--model", "unet"], "3D U-Net"),
        ([*base[:4], "mps", "--input", str(scan), "--output", out], "--device"),
        ([*base, "--input", str(text), "--output", out], "notes.txt"),
        ([*base, "--input", str(four_d), "--output", out], "4d.nii.gz"),
        ([*base, "--input", str(nan_file), "--output", out], "nan.nii.gz"),
        ([*base, "--input", str(corrupt), "--output", out], "corrupt.nii.gz"),
        ([*base, "--input", str(scan), "--output", out, "--threshold", "half"], "--threshold"),
    ]


def test_predict_refuses_bad_input_and_writes_nothing(finished, scan, tmp_path, capsys):
    cases = predict_cases(finished, scan, tmp_path)
    assert len(cases) >= 20
    for argv, names in cases:
        check_refused(capsys, argv, names, [tmp_path])


def test_a_multi_channel_checkpoint_refuses_one_input(dataset, tmp_path, capsys):
    out = tmp_path / "two"
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY, "--epochs", "1", "--channel",
                       "FLAIR,T2W"]) == 0
    flair = sorted((dataset / "training").glob("*/preprocessed/*_flair_pp.nii"))[0]
    check_refused(capsys, ["predict", "--checkpoint", str(out / "best.pt"), "--input", str(flair), "--output",
                           str(tmp_path / "m.nii.gz")], "2 channels", [tmp_path])
    t2 = flair.with_name(flair.name.replace("flair", "t2"))
    assert repro.main(["predict", "--checkpoint", str(out / "best.pt"), "--input", str(flair), str(t2),
                       "--output", str(tmp_path / "m.nii.gz")]) == 0
    assert nib.load(tmp_path / "m.nii.gz").shape == nib.load(flair).shape


def test_a_full_disk_is_told_apart_and_leaves_no_temporary_file(dataset, tmp_path, monkeypatch, capsys):
    import os
    import train
    save = torch.save

    def full(obj, path, *args, **kwargs):  # as torch.save fails on a full disk, after writing part of the file
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 757 vs 0")

    class Stats:
        f_bavail, f_frsize = 10, 4096
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(train.os, "statvfs", lambda path: Stats())
    out = tmp_path / "run"
    assert run(["--data", str(dataset), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and "best.pt" in err and "Traceback" not in err
    assert "were removed" in err and not out.exists()  # no epoch was saved: the run took away what it wrote
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(train.os, "statvfs", os.statvfs)
    assert run(["--data", str(dataset), "--out", str(out), *TINY]) == 0


# ---------------------------------------------------------------------------------------------
# Hostile input: ids, checkpoints, special files, headers, permissions, leftovers

@contextlib.contextmanager
def deadline(seconds=30):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expire(signum, frame):
        raise AssertionError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def phantom_rows(dataset):
    rows = []
    for image in sorted((dataset / "training").glob("*/preprocessed/*_flair_pp.nii")):
        sid = image.name[: -len("_flair_pp.nii")]
        subject, tp = sid.split("_")
        rows.append({"subject": subject, "timepoint": tp, "FLAIR": str(image),
                     "mask": str(image.parent.parent / "masks" / f"{sid}_mask1.nii")})
    return rows


def write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize("subject", ["../../../../victim/notes", "site1/sub1", "..", ".", "a\\b", "tab\there",
                                     "x\u202eevil", "s" * 300],
                         ids=["parent", "subfolder", "dotdot", "dot", "backslash", "tab", "rtl-override", "long"])
def test_an_id_that_is_not_one_file_name_is_refused_before_anything_is_read(subject, dataset, tmp_path, capsys):
    rows = phantom_rows(dataset)
    rows[2]["subject"] = subject
    csv_path = write_manifest(tmp_path / "ids.csv", rows)
    err = check_refused(capsys, ["--data", str(csv_path), "--out", str(tmp_path / "o"), *TINY], "ids.csv, line 4",
                        [tmp_path])
    assert repr(subject)[:40] in err


def test_predict_never_writes_outside_its_output_folder(finished, scan, tmp_path, capsys):
    victim = tmp_path / "victim.nii.gz"
    victim.write_bytes(b"someone's file")
    out = tmp_path / "masks"
    out.mkdir()
    (out / "scan_mask.nii.gz").symlink_to(victim)  # a link placed where the mask goes
    second = scan.with_name("other.nii.gz")
    second.write_bytes(scan.read_bytes())
    check_refused(capsys, ["predict", "--checkpoint", str(finished / "best.pt"), "--device", "cpu", "--input",
                           str(scan), str(second), "--output", str(out), "--overwrite"], "outside the output folder",
                  [tmp_path])
    assert victim.read_bytes() == b"someone's file"


class Payload:
    """A pickle that, when unpickled, creates the file ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_unread(finished, scan, tmp_path, capsys):
    marker = tmp_path / "ran"
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"model": Payload(marker), "config": {}}))
    zipped = tmp_path / "zipped.pt"
    torch.save({"model": Payload(marker), "config": {}}, zipped)
    for evil in (plain, zipped):
        err = check_refused(capsys, ["predict", "--checkpoint", str(evil), "--input", str(scan), "--output",
                                     str(tmp_path / "m.nii.gz")], evil.name, [tmp_path])
        assert "not a checkpoint written by repro.py" in err and "not unpickled" in err
    run_copy = tmp_path / "run"
    shutil.copytree(finished, run_copy)
    shutil.copy(zipped, run_copy / "last.pt")
    check_refused(capsys, ["--data", "unused", "--out", str(run_copy), *TINY, "--resume"], "not unpickled", [run_copy])
    assert not marker.exists()


def test_a_checkpoint_whose_weights_do_not_fit_its_network_is_refused(finished, scan, tmp_path, capsys):
    checkpoint = infer.read_checkpoint(finished / "best.pt")
    wider = {**checkpoint, "config": {**checkpoint["config"], "network": {**checkpoint["config"]["network"],
                                                                       "base_filters": 8}}}
    torch.save(wider, tmp_path / "wider.pt")
    first = next(iter(checkpoint["model"]))
    torch.save({**checkpoint, "model": {k: v for k, v in checkpoint["model"].items() if k != first}},
               tmp_path / "missing.pt")
    for name in ("wider.pt", "missing.pt"):
        err = check_refused(capsys, ["predict", "--checkpoint", str(tmp_path / name), "--input", str(scan),
                                     "--output", str(tmp_path / "m.nii.gz")], name, [tmp_path])
        assert "do not fit" in err


def test_a_fifo_is_refused_not_read(dataset, finished, scan, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    manifest = tmp_path / "fifo.csv"
    os.mkfifo(manifest)
    rows = phantom_rows(dataset)
    scan_fifo = tmp_path / "in" / "pipe.nii.gz"
    os.mkfifo(scan_fifo)
    in_manifest = write_manifest(tmp_path / "m.csv", [{**rows[0], "mask": str(scan_fifo)}, *rows[1:]])
    out = str(tmp_path / "out" / "m.nii.gz")
    with deadline():
        check_refused(capsys, ["--data", str(manifest), "--out", str(tmp_path / "o"), *TINY], "FIFO", [])
        check_refused(capsys, ["--data", str(in_manifest), "--out", str(tmp_path / "o"), *TINY], "FIFO", [])
        check_refused(capsys, ["predict", "--checkpoint", str(fifo), "--input", str(scan), "--output", out], "FIFO",
                      [])
        check_refused(capsys, ["predict", "--checkpoint", str(finished / "best.pt"), "--input", str(scan_fifo),
                               "--output", out], "FIFO", [])


def nifti_with_affine(path, array, rows):
    """A NIfTI whose sform is ``rows`` (3 x 4) as stored, which nibabel would not write itself."""
    header = nib.Nifti1Image(array, np.eye(4)).header
    header["srow_x"], header["srow_y"], header["srow_z"] = rows
    header["sform_code"], header["qform_code"] = 1, 0
    path.write_bytes(header.binaryblock + b"\0" * 4 + array.astype(np.float32).tobytes(order="F"))
    return path


def claiming(path, shape, gz=False):
    """A tiny file whose NIfTI header describes ``shape`` float32 voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    content = header.binaryblock + b"\0" * 700
    path.write_bytes(gzip.compress(content) if gz else content)
    return path


def test_impossible_images_are_refused_in_training_and_predict(dataset, finished, scan, tmp_path, capsys):
    volume = np.asarray(nib.load(scan).dataobj, dtype=np.float32)
    folder = tmp_path / "in"
    bad = {"2d.nii.gz": ("2D image", image_file(folder / "2d.nii.gz", volume[:, :, 20])),
           "slice.nii.gz": ("single slice", image_file(folder / "slice.nii.gz", volume[:, :, 20:21])),
           "singular.nii": ("singular", nifti_with_affine(folder / "singular.nii", volume,
                                                          np.array([[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 0, 0.]]))),
           "nan.nii": ("NaN", nifti_with_affine(folder / "nan.nii", volume, np.full((3, 4), np.nan))),
           "claim.nii": ("more than a scan may hold", claiming(folder / "claim.nii", (2000, 2000, 2000))),
           "short.nii": ("truncated", claiming(folder / "short.nii", (600, 600, 600))),
           "short.nii.gz": ("truncated", claiming(folder / "short.nii.gz", (600, 600, 600), gz=True))}
    nrrd.write(str(folder / "claim.nrrd"), np.zeros((4, 4, 4), np.uint8))
    text = (folder / "claim.nrrd").read_bytes().replace(b"sizes: 4 4 4", b"sizes: 2000 2000 2000")
    (folder / "claim.nrrd").write_bytes(text)
    bad["claim.nrrd"] = ("more than a scan may hold", folder / "claim.nrrd")
    rows = phantom_rows(dataset)
    for name, (says, path) in bad.items():
        manifest = write_manifest(tmp_path / "m.csv", [{**rows[0], "FLAIR": str(path)}, *rows[1:]])
        err = check_refused(capsys, ["--data", str(manifest), "--out", str(tmp_path / "o"), *TINY], name, [tmp_path])
        assert says in err, err
        err = check_refused(capsys, ["predict", "--checkpoint", str(finished / "best.pt"), "--input", str(path),
                                     "--output", str(tmp_path / "m.nii.gz")], name, [tmp_path])
        assert says in err, err


@pytest.mark.parametrize("spacing", ["0.001", "1e-300", "1e300"])
def test_an_absurd_spacing_is_refused_by_the_size_of_its_grid(spacing, dataset, tmp_path, capsys):
    err = check_refused(capsys, ["--data", str(dataset), "--out", str(tmp_path / "o"), *TINY, "--spacing", spacing],
                        "spacing", [tmp_path])
    assert "voxels" in err and "constant" not in err


def test_a_spacing_the_built_in_data_cannot_be_generated_at_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESUNET_CACHE", str(tmp_path / "cache"))
    for spacing in ("0.001", "50"):
        check_refused(capsys, ["--out", str(tmp_path / "o"), *TINY, "--spacing", spacing], "--spacing", [tmp_path])


def test_predict_manifests_that_cannot_serve(finished, scan, tmp_path, capsys):
    base = ["predict", "--checkpoint", str(finished / "best.pt"), "--output", str(tmp_path / "o"), "--input"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes(f"FLAIR,notes\n{scan},caf\xe9\n".encode("latin-1"))
    check_refused(capsys, [*base, str(latin)], "not UTF-8", [tmp_path])
    empty = tmp_path / "empty.csv"
    empty.write_text("FLAIR,notes\n")
    check_refused(capsys, [*base, str(empty)], "lists no scan", [tmp_path])
    folder = tmp_path / "a-folder.nii.gz"
    folder.mkdir()
    listed = tmp_path / "listed.csv"
    listed.write_text(f"FLAIR\n{folder}\n")
    check_refused(capsys, [*base, str(listed)], "is a folder, expected a file", [tmp_path])


def test_manifest_columns_that_are_not_images_are_not_channels(dataset, tmp_path, capsys):
    rows = phantom_rows(dataset)
    with_notes = write_manifest(tmp_path / "notes.csv", [{**r, "notes": "motion in slice 3"} for r in rows])
    assert data.find_scans(with_notes)[1][f"{rows[0]['subject']}_{int(rows[0]['timepoint']):02d}"].files.keys() == \
        {"FLAIR", "mask"}
    check_refused(capsys, ["--data", str(with_notes), "--out", str(tmp_path / "o"), *TINY, "--channel", "notes"],
                  "no channel 'notes'", [tmp_path])
    mixed = write_manifest(tmp_path / "mixed.csv", [{**r, "GADO": r["FLAIR"] if i else "n/a"}
                                                   for i, r in enumerate(rows)])
    check_refused(capsys, ["--data", str(mixed), "--out", str(tmp_path / "o"), *TINY], "'n/a'", [tmp_path])
    folder = tmp_path / "mask-folder"
    folder.mkdir()
    as_mask = write_manifest(tmp_path / "folder.csv", [{**rows[0], "mask": str(folder)}, *rows[1:]])
    check_refused(capsys, ["--data", str(as_mask), "--out", str(tmp_path / "o"), *TINY],
                  "is a folder, expected a file", [tmp_path])


def test_absurd_intensities_and_a_broken_gzip_are_refused(dataset, tmp_path, capsys):
    rows = phantom_rows(dataset)
    source = nib.load(rows[0]["FLAIR"])
    volume = np.asarray(source.dataobj, dtype=np.float32)
    huge = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(np.where(volume > 0, 1e36, 0).astype(np.float32), source.affine), huge)
    crc = tmp_path / "crc.nii.gz"
    nib.save(source, crc)
    damaged = bytearray(crc.read_bytes())
    damaged[-8] ^= 0xFF  # the gzip trailer's CRC-32: every voxel still decompresses
    crc.write_bytes(bytes(damaged))
    for path, says in ((huge, "MAX_INTENSITY"), (crc, "CRC")):
        manifest = write_manifest(tmp_path / "m.csv", [{**rows[0], "FLAIR": str(path)}, *rows[1:]])
        err = check_refused(capsys, ["--data", str(manifest), "--out", str(tmp_path / "o"), *TINY], path.name,
                            [tmp_path])
        assert says in err


def obeying_permissions(tmp_path):
    """The command prefix under which even root obeys file modes (CAP_DAC_OVERRIDE dropped), or a skip."""
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("root without setpriv ignores file modes")
    locked = tmp_path / "locked-probe"
    locked.mkdir(mode=0o555)
    probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(locked / 'x')!r}, 'w')"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("this user writes into read-only folders")
    return prefix


DRIVER = """import contextlib, io, json, sys
import repro
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results.append((repro.main(argv), err.getvalue()))
print(json.dumps(results))
"""


def repro_processes(prefix, argvs):
    """(exit status, stderr) of each command line, run by repro.main in one process started under ``prefix``."""
    result = subprocess.run([*prefix, sys.executable, "-c", DRIVER, json.dumps(argvs)], capture_output=True, text=True,
                            cwd=Path(repro.__file__).parent, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_permission_denied_is_said_and_checked_before_the_model_runs(finished, scan, tmp_path):
    prefix = obeying_permissions(tmp_path)
    locked_scan = tmp_path / "locked.nii.gz"
    shutil.copy(scan, locked_scan)
    locked_checkpoint = tmp_path / "locked.pt"
    shutil.copy(finished / "best.pt", locked_checkpoint)
    for path in (locked_scan, locked_checkpoint):
        path.chmod(0)
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    second = tmp_path / "second.nii.gz"
    shutil.copy(scan, second)
    cases = [(["--checkpoint", str(locked_checkpoint), "--input", str(scan), "--output", str(tmp_path / "m.nii.gz")],
              "locked.pt"),
             (["--checkpoint", str(finished / "best.pt"), "--input", str(locked_scan), "--output",
               str(tmp_path / "m.nii.gz")], "locked.nii.gz"),
             (["--checkpoint", str(finished / "best.pt"), "--input", str(scan), str(second), "--output",
               str(read_only)], "read-only")]
    results = repro_processes(prefix, [["predict", "--device", "cpu", *argv] for argv, _ in cases])
    for (_, names), (code, err) in zip(cases, results):
        err = err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert names in err and "permission denied" in err and "corrupt" not in err and "truncated" not in err, err
    assert not list(read_only.iterdir()) and not (tmp_path / "m.nii.gz").exists()


def test_predict_clears_only_the_leftovers_of_a_killed_predict(finished, scan, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "masks"
    out.mkdir()
    leftover, live = f".tmp-{dead.pid}-scan_mask.nii.gz", f".tmp-{os.getpid()}-scan_prob.nii.gz"
    kept = [live, ".tmp-notes.txt", f".tmp-0{dead.pid}-x", "notes.txt"]
    for name in [leftover, *kept]:
        (out / name).write_text("x")
    second = scan.with_name("other.nii.gz")
    second.write_bytes(scan.read_bytes())
    assert run(["predict", "--checkpoint", str(finished / "best.pt"), "--device", "cpu", "--input", str(scan),
                str(second), "--output", str(out)]) == 0
    written = [f"{stem}_{kind}" for stem in ("scan", "other") for kind in ("mask.nii.gz", "lesions.csv")]
    assert sorted(p.name for p in out.iterdir()) == sorted([*kept, *written, "summary.csv"])


def test_ctrl_c_during_predict_names_what_was_written(finished, dataset, tmp_path, monkeypatch):
    sources = sorted((dataset / "training").glob("*/preprocessed/*_flair_pp.nii"))[:4]
    model, config = infer.load_model(finished / "best.pt", "cpu")
    interrupt_call(monkeypatch, infer, "predict_logits", 3)
    out = tmp_path / "masks"
    with pytest.raises(infer.Interrupted) as caught:
        infer.predict(model, config, sources, out, save_probabilities=True)
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 6 and sorted(p.name for p in caught.value.written) == written  # mask, probabilities, table
    assert caught.value.done == 2 and caught.value.total == 4
    assert "after 2 of 4 scans" in str(caught.value) and all(name in str(caught.value) for name in written)


# --------------------------------------------------------------------------------------------
# Run folders and processes: flags that cannot apply, whose folder it is, one writer per folder, what a
# failed or stopped run leaves, resume from elsewhere, signals

SETTING_CASES = [
    (["--device", "cpu:0"], "--device"), (["--device", "cpu:1"], "--device"), (["--device", ""], "--device"),
    (["--device", " cpu"], "--device"), (["--device", "cuda:x"], "--device"), (["--device", "cuda:-1"], "--device"),
    (["--seed", str(2**64)], "--seed"), (["--seed", str(2**63)], "--seed"), (["--lr", "1e38"], "--lr"),
    (["--lr", "1.5"], "--lr"), (["--table2", "--seeds", f"0,{2**64}"], "--seeds"),
    (["--model", "unet", "--dropout", "0.5"], "--dropout"), (["--model", "unet", "--shared-context"], "--shared-context"),
    (["--unet-norm", "instance"], "--unet-norm"), (["--model", "residual", "--unet-norm", "group"], "--unet-norm"),
    (["--resume", "--overwrite"], "--overwrite"), (["--table2", "--resume"], "--resume"),
    (["--table2", "--model", "unet"], "--model"),
]


@pytest.mark.parametrize("flags,names", SETTING_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_flag_out_of_range_or_that_cannot_apply_is_refused_before_anything_is_created(flags, names, dataset,
                                                                                        tmp_path, capsys):
    out = tmp_path / "out"
    check_refused(capsys, ["--data", str(dataset), "--out", str(out), *TINY, *flags], names, [tmp_path])
    assert not out.exists()


def test_predict_refuses_a_device_that_is_not_exactly_cpu_or_cuda(finished, scan, tmp_path, capsys):
    for device in ("cpu:1", "", "cuda:x"):
        check_refused(capsys, ["predict", "--checkpoint", str(finished / "best.pt"), "--input", str(scan),
                               "--output", str(tmp_path / "o" / "m.nii.gz"), "--device", device], "--device",
                      [tmp_path])


def test_table2_checks_every_cells_data_before_the_first_cell_trains(dataset, tmp_path, capsys):
    out = tmp_path / "table"
    # at 5 mm the scans fit the 3D U-Net (the first cell) but not the residual net
    check_refused(capsys, ["--table2", "--channel", "FLAIR", "--data", str(dataset), "--spacing", "5", "--out",
                           str(out), *TINY], "smaller than the network's minimum", [tmp_path])
    rows = [{"subject": p.name.split("_")[0], "timepoint": int(p.name.split("_")[1]), "FLAIR": str(p),
             "mask": str(p.parent.parent / "masks" / p.name.replace("flair_pp", "mask1"))}
            for p in sorted((dataset / "training").glob("*/preprocessed/*_flair_pp.nii"))]
    manifest = tmp_path / "flair-only.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    check_refused(capsys, ["--table2", "--data", str(manifest), "--out", str(out), *TINY], "MPRAGE", [tmp_path])
    assert not out.exists()


def test_table2_checks_an_interrupted_cells_data_before_the_first_cell_trains(dataset, tmp_path, monkeypatch,
                                                                              capsys):
    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    interrupt_call(monkeypatch, train, "validate", 2)  # Ctrl-C in the first cell's second epoch
    out = tmp_path / "table"
    argv = ["--table2", "--channel", "FLAIR", "--data", str(copy), "--out", str(out), *TINY]
    assert run(argv) == 130
    assert "the same --table2 command continues" in capsys.readouterr().err
    monkeypatch.undo()
    assert (out / "seed0" / "unet-FLAIR" / "last.pt").is_file()
    for image in (copy / "training" / "training01" / "preprocessed").iterdir():  # the data change in place
        image.write_bytes(image.read_bytes() + b"\0")
    check_refused(capsys, argv, "data_fingerprint", [tmp_path])


def test_an_out_holding_files_repro_did_not_write_is_refused_even_with_overwrite(finished, dataset, tmp_path,
                                                                                 capsys):
    stranger = tmp_path / "stranger"  # issue 21's reproducer: a folder that only looks like a run
    (stranger / "predictions").mkdir(parents=True)
    (stranger / "predictions" / "seg.nii.gz").write_text("x")
    (stranger / "config.json").write_text("{}")
    argv = ["--data", str(dataset), *TINY]
    for extra in ([], ["--overwrite"], ["--resume"]):
        check_refused(capsys, [*argv, "--out", str(stranger), *extra], "config.json", [tmp_path])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    check_refused(capsys, [*argv, "--out", str(other), "--overwrite"], "notes.txt", [tmp_path])
    ours = tmp_path / "ours"
    shutil.copytree(finished, ours)
    for intruder in ("notes.txt", "predictions/someone_pred.nii.gz", "predictions/sub/"):
        path = ours / intruder
        path.mkdir() if intruder.endswith("/") else path.write_text("x")
        err = check_refused(capsys, [*argv, "--out", str(ours), "--overwrite"], intruder.rstrip("/"), [tmp_path])
        assert "--overwrite" not in err  # no flag makes it delete what it did not write
        path.rmdir() if intruder.endswith("/") else path.unlink()
    table = tmp_path / "table"
    table.mkdir()
    (table / "notes.txt").write_text("x")
    check_refused(capsys, ["--table2", "--channel", "FLAIR", *argv, "--out", str(table)], "notes.txt", [tmp_path])


def test_overwrite_replaces_only_its_own_files_and_clears_dead_processes_temporaries(finished, dataset, tmp_path):
    out = tmp_path / "ours"
    shutil.copytree(finished, out)
    gone = subprocess.Popen(["true"])
    gone.wait()
    test_id = json.loads((finished / "config.json").read_text())["split_ids"]["test"][0]
    dead = [out / f".tmp-{gone.pid}-best.pt", out / "predictions" / f".tmp-{gone.pid}-{test_id}_pred.nii.gz"]
    live = out / f".tmp-{os.getppid()}-last.pt"  # a live process's temporary is its own business
    for path in (*dead, live):
        path.write_text("partial")
    assert run(["--data", str(dataset), "--out", str(out), *TINY, "--epochs", "1", "--overwrite"]) == 0
    assert not any(path.exists() for path in dead) and live.exists()
    assert len(list(csv.DictReader(open(out / "history.csv")))) == 1 and not (out / train.LOCK).exists()


LOCK_HOLDER = """
import sys
from pathlib import Path
import train
with train.lock_folder(Path(sys.argv[1]), "--out"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_one_writer_per_folder_and_a_dead_writers_lock_does_not_block(finished, dataset, scan, tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline() == "held\n"
        argv = ["--data", str(dataset), *TINY, "--epochs", "1"]
        for command in ([*argv, "--out", str(out)], [*argv, "--out", str(out), "--overwrite"],
                        ["--table2", "--channel", "FLAIR", *argv, "--out", str(out)],
                        ["predict", "--checkpoint", str(finished / "best.pt"), "--input", str(scan),
                         "--output", str(out / "mask.nii.gz")]):
            err = check_refused(capsys, command, f"(pid {holder.pid})", [tmp_path])
            assert str(out) in err
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the kernel drops the lock
        holder.wait()
    assert (out / train.LOCK).is_file()
    assert run([*argv, "--out", str(out)]) == 0
    assert not (out / train.LOCK).exists()


def test_a_run_that_fails_keeps_the_folder_as_it_was_until_an_epoch_is_saved(dataset, tmp_path, monkeypatch,
                                                                             capsys):
    save_epoch, saved = train.save_epoch, []

    def full_disk_in(epoch):
        def save(run, *args, **kwargs):
            if len(saved) + 1 == epoch:
                raise UsageError(f"no space left on device while writing {run.out / 'last.pt'}")
            saved.append(1)
            save_epoch(run, *args, **kwargs)
        return save

    def diverge(*args, **kwargs):
        raise train.Diverged("the validation loss is nan")

    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--data", str(dataset), *TINY]
    monkeypatch.setattr(train, "validate", diverge)
    for out in (tmp_path / "new", empty):
        assert run([*argv, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert "no epoch of" in err and "removed" in err and "kept" not in err and "Traceback" not in err
        assert listing(out) == (None if out.name == "new" else [])
    monkeypatch.undo()
    monkeypatch.setattr(train, "save_epoch", full_disk_in(1))
    assert run([*argv, "--out", str(tmp_path / "new")]) == 2 and not (tmp_path / "new").exists()
    capsys.readouterr()
    monkeypatch.setattr(train, "save_epoch", full_disk_in(2))
    saved.clear()
    out = tmp_path / "half"
    assert run([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "was last saved after epoch 1" in err and f"python repro.py --out {out} --resume" in err
    monkeypatch.undo()
    assert run(["--out", str(out), "--resume"]) == 0  # what the message says works


def test_data_is_stored_resolved_so_a_resume_finds_it_from_anywhere(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(dataset.parent)
    out = tmp_path / "run"
    assert run(["--data", f"./{dataset.name}/", "--out", str(out), *TINY, "--epochs", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["protocol"]["data"] == str(dataset.resolve())
    monkeypatch.chdir(tmp_path)
    assert run(["--data", str(dataset), "--out", "run", *TINY, "--resume"]) == 0  # the same data, spelled otherwise
    assert len(list(csv.DictReader(open(out / "history.csv")))) == 2


def test_sigterm_stops_a_run_as_ctrl_c_does(dataset, tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "repro.py", "--data", str(dataset), "--out", str(out), *TINY,
                            "--epochs", "100", "--patience", "100"], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not (out / "history.csv").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    assert job.wait(120) == 143
    err = job.stderr.read().strip()
    assert len(err.splitlines()) == 1 and "was last saved after epoch" in err and "--resume" in err, err
    assert (out / "last.pt").is_file() and not [p for p in out.rglob(".*")]  # no temporary, no lock


@pytest.mark.parametrize("stop,status", [("raise KeyboardInterrupt", 130),
                                         ("import os, signal, time; os.kill(os.getpid(), signal.SIGTERM); "
                                          "time.sleep(60)", 143)])
def test_a_stop_during_the_imports_is_one_line(stop, status, tmp_path):
    (tmp_path / "nibabel.py").write_text(stop + "\n")  # repro.py's first heavy import, stopped in the middle
    done = subprocess.run([sys.executable, str(ROOT / "repro.py"), "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert done.returncode == status and done.stderr.strip().splitlines() == [repro.NOTHING_STARTED]


def test_ctrl_c_during_predict_says_where_the_finished_masks_are(finished, dataset, tmp_path, monkeypatch, capsys):
    import infer
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for source in sorted((dataset / "training").glob("*/preprocessed/*_flair_pp.nii"))[:2]:
        shutil.copy(source, inputs)
    interrupt_call(monkeypatch, infer, "write_prediction", 2)
    masks = tmp_path / "masks"
    assert run(["predict", "--checkpoint", str(finished / "best.pt"), "--input", str(inputs), "--output",
                str(masks), "--device", "cpu"]) == 130
    err = capsys.readouterr().err
    assert "nothing was written" not in err and str(masks) in err
    first = sorted(inputs.iterdir())[0].name.replace(".nii", "")
    assert listing(masks) == [f"{first}_lesions.csv", f"{first}_mask.nii.gz"]  # the lock is gone
