"""The built-in synthetic MS dataset (phantom.py): layout, determinism, anatomy, lesions,
MR physics, raters, cache and CLI. Coarse grids (2-4 mm) keep the whole file fast."""
import filecmp
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

import phantom as P

# the file tags of ISBI 2015 (trainingNN_TT_<tag>_pp.nii): the layout tests expect exactly these
ISBI_FILE_TAGS = ("flair", "mprage", "pd", "t2")


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """2 subjects x (2, 1) time points at 4 mm, uncompressed."""
    out = tmp_path_factory.mktemp("phantom4mm")
    return P.generate(out, seed=3, spacing=4.0, subjects=2, timepoints=(2, 1), progress=False)


@pytest.fixture(scope="module")
def scans_2mm():
    """Two subjects' scans at 2 mm with tissue labels (first and last time point)."""
    scans = []
    for subject in (1, 2):
        subj = P.make_subject(seed=0, subject=subject, spacing=2.0, timepoints=3)
        scans += [P.make_scan(subj, t, with_labels=True) for t in (1, 3)]
    return scans


# -- grid, layout, files ------------------------------------------------------------------
def test_grid_is_the_mni_icbm_field_of_view():
    assert P.grid_shape(1.0) == (181, 217, 181)
    assert P.grid_shape(2.0) == (91, 109, 91)
    affine = P.grid_affine(2.0)
    assert np.allclose(affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    assert np.allclose(affine[:3, 3], [-90, -126, -72])
    # the last voxel centre is the far edge of the same field of view
    assert np.allclose(affine @ [90, 108, 90, 1], [90, 90, 108, 1])


def test_isbi_layout_names_shapes_affine_and_dtypes(small_set):
    expected = []
    for s, n_tp in ((1, 2), (2, 1)):
        for t in range(1, n_tp + 1):
            stem = f"training/training{s:02d}"
            expected += [f"{stem}/preprocessed/training{s:02d}_{t:02d}_{ch}_pp.nii" for ch in ISBI_FILE_TAGS]
            expected += [f"{stem}/masks/training{s:02d}_{t:02d}_mask{k}.nii" for k in (1, 2)]
    assert _files(small_set) == sorted(expected + ["phantom.json"])
    assert json.loads((small_set / "phantom.json").read_text())["timepoints"] == [2, 1]
    for rel in expected:
        img = nib.load(small_set / rel)
        assert img.shape == (46, 55, 46)
        assert np.allclose(img.affine, P.grid_affine(4.0))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        data = img.get_fdata()
        if "mask" in rel:
            assert img.get_data_dtype() == np.uint8
            assert set(np.unique(data)) == {0.0, 1.0}
        else:   # scanner-like units, not normalised; skull-stripped
            assert data.min() == 0.0 and data.max() > 100.0
            assert 0.05 < (data > 0).mean() < 0.5


def test_compressed_output_has_the_same_names_plus_gz(tmp_path):
    root = P.generate(tmp_path, seed=3, spacing=6.0, subjects=1, timepoints=1, compress=True, progress=False)
    assert _files(root) == sorted(
        [f"training/training01/preprocessed/training01_01_{ch}_pp.nii.gz" for ch in ISBI_FILE_TAGS]
        + [f"training/training01/masks/training01_01_mask{k}.nii.gz" for k in (1, 2)] + ["phantom.json"])


def test_project_reader_reads_it_unchanged(small_set):
    data = pytest.importorskip("data")
    scans = data.load_dataset(small_set, "FLAIR")
    assert [s.id for s in scans] == ["training01_01", "training01_02", "training02_01"]
    assert all(s.full_shape == (46, 55, 46) and s.mask.sum() > 0 for s in scans)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small_set):
    again = P.generate(tmp_path / "again", seed=3, spacing=4.0, subjects=2, timepoints=(2, 1), progress=False)
    names = _files(small_set)
    match, mismatch, errors = filecmp.cmpfiles(small_set, again, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names)
    other = P.generate(tmp_path / "other", seed=4, spacing=4.0, subjects=1, timepoints=1, progress=False)
    rel = "training/training01/preprocessed/training01_01_flair_pp.nii"
    assert (small_set / rel).read_bytes() != (other / rel).read_bytes()


# -- anatomy and lesions --------------------------------------------------------------------
def test_subjects_differ_in_anatomy_and_lesions_evolve():
    a, b = (P.make_subject(seed=0, subject=s, spacing=4.0, timepoints=4) for s in (1, 2))
    assert a.anatomy.brain.sum() != b.anatomy.brain.sum()
    vent = [(x.anatomy.vent_dist < 0).sum() for x in (a, b)]
    assert vent[0] != vent[1]
    sizes = np.array([les.size for s in (a, b) for les in s.lesions])
    assert ((sizes[:, 0] == 0) & (sizes[:, -1] > 0)).any(), "a lesion appears at a follow-up"
    grown = sizes[:, -1] > 1.05 * sizes[:, 0]
    shrunk = (sizes[:, 0] > 0) & (sizes[:, -1] < 0.95 * sizes[:, 0])
    assert grown.any() and shrunk.any()


def test_lesion_counts_sizes_and_orientation_follow_the_plan():
    lesions = [les for s in range(1, 6) for les in P.make_subject(0, s, 4.0, 4).lesions]
    counts = {k: sum(les.kind == k for les in lesions) for k in P.LESION_KINDS}
    assert counts["periventricular"] == max(counts.values())
    assert all(counts[k] > 0 for k in P.LESION_KINDS)
    per_scan = len(lesions) / 5
    assert 10 <= per_scan <= 70
    d = np.array([2 * np.prod(les.axes) ** (1 / 3) for les in lesions if les.kind != "confluent"])
    assert d.min() >= P.LESION_DIAMETER_MM[0] - 1e-6 and d.max() <= P.LESION_DIAMETER_MM[1] + 1e-6
    assert 3.5 < np.median(d) < 7.0
    # periventricular ovoids (Dawson's fingers): elongated, long axis along the ventricle wall's normal
    subj = P.make_subject(0, 1, 4.0, 1)
    box, grad = subj.anatomy.box, np.gradient(subj.anatomy.vent_dist, 4.0)
    cosines = []
    for les in (les for les in subj.lesions if les.kind == "periventricular"):
        assert les.axes[0] > 1.25 * les.axes[1:].max()
        i = tuple(int(np.clip(np.rint((c - o.ravel()[0]) / 4.0), 0, n - 1))
                  for c, o, n in zip(les.centre, (box.x, box.y, box.z), box.shape))
        normal = np.array([g[i] for g in grad])
        cosines.append(abs(normal @ les.rot[:, 0]) / np.linalg.norm(normal))
    assert np.median(cosines) > 0.9


def test_masks_binary_nonempty_inside_brain_mostly_white_matter(scans_2mm):
    for scan in scans_2mm:
        brain = scan.images["flair"] > 0
        for m in scan.masks:
            assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1} and m.sum() > 10
            assert not (m.astype(bool) & ~brain).any()
        labels = scan.labels[scan.masks[0].astype(bool)]
        in_wm = np.isin(labels, [P.TISSUE_CLASSES.index(k) for k in ("wm", "cap", "lesion")]).mean()
        assert in_wm > 0.85
        assert ((scan.lesion > 0) <= (scan.images["flair"] > 0)).all()


def _cnr(scan, channel):
    """(mean lesion core - mean white matter) / std white matter."""
    img = scan.images[channel]
    lesion = scan.lesion > 0.7
    wm = ndi.binary_erosion(scan.labels == P.TISSUE_CLASSES.index("wm")) & ~ndi.binary_dilation(scan.lesion > 0, iterations=2)
    return (img[lesion].mean() - img[wm].mean()) / img[wm].std()


def test_lesion_contrast_to_noise_has_the_physical_sign_and_order(scans_2mm):
    for scan in scans_2mm:
        cnr = {ch: _cnr(scan, ch) for ch in P.FILE_TAGS}
        assert cnr["flair"] > 2.0 and cnr["t2"] > 2.0, cnr
        assert 0.0 < cnr["pd"] < min(cnr["flair"], cnr["t2"]), cnr
        assert cnr["mprage"] < -0.5, cnr


def test_periventricular_caps_bright_on_flair_but_not_lesions(scans_2mm):
    for scan in scans_2mm:
        cap = scan.labels == P.TISSUE_CLASSES.index("cap")
        wm = scan.labels == P.TISSUE_CLASSES.index("wm")
        assert cap.sum() > 20
        assert scan.images["flair"][cap].mean() > scan.images["flair"][wm].mean()
        assert (cap & scan.masks[0].astype(bool)).sum() < 0.05 * cap.sum()


def test_two_raters_differ_but_overlap(scans_2mm):
    for scan in scans_2mm:
        m1, m2 = (m.astype(bool) for m in scan.masks)
        dice = 2 * (m1 & m2).sum() / (m1.sum() + m2.sum())
        assert 0.45 < dice < 0.9, dice


# -- MR physics -----------------------------------------------------------------------------
def test_signal_equations_give_the_expected_relative_intensities():
    """Intensities relative to WM under each protocol, pinned to two decimals: lesions bright on
    T2w, PDw and FLAIR and darker than WM on MPRAGE, CSF dark on MPRAGE and nulled on FLAIR."""
    rel = {ch: {k: P.signal(ch, *P.TISSUE_PARAMS[k]) / P.signal(ch, *P.TISSUE_PARAMS["wm"])
                for k in ("csf", "gm", "lesion")} for ch in P.FILE_TAGS}
    assert rel["t2"] == pytest.approx({"csf": 3.06, "gm": 1.52, "lesion": 2.10}, abs=0.01)
    assert rel["pd"] == pytest.approx({"csf": 1.12, "gm": 1.17, "lesion": 1.20}, abs=0.01)
    assert rel["mprage"] == pytest.approx({"csf": 0.19, "gm": 0.62, "lesion": 0.70}, abs=0.01)
    # FLAIR nulls CSF: TI 2500 ms is near T1 ln(2 / (1 + exp(-TR / T1))) = 2457 ms for CSF at TR 10 s
    assert rel["flair"]["csf"] < 0.1
    assert rel["flair"] == pytest.approx({"csf": rel["flair"]["csf"], "gm": 1.14, "lesion": 1.71}, abs=0.01)


def test_lesion_tissue_mixes_relaxation_rates():
    wm, les = P.TISSUE_PARAMS["wm"], P.TISSUE_PARAMS["lesion"]
    assert np.allclose(P.lesion_params(wm, les, 0.0), wm)
    assert np.allclose(P.lesion_params(wm, les, 1.0), les)
    t1, t2, pd = P.lesion_params(wm, les, 0.5)
    assert t1 == pytest.approx(2 / (1 / wm[0] + 1 / les[0]))
    assert wm[1] < t2 < les[1] and wm[2] < pd < les[2]


# -- cache and command line --------------------------------------------------------------------
def test_cache_is_generated_once_then_reused(tmp_path, monkeypatch, capsys):
    root = P.ensure_cached(tmp_path, seed=0, spacing=6.0, progress=False)
    assert "Generating the built-in synthetic MS dataset (21 scans, 6 mm)" in capsys.readouterr().err
    assert root.parent == tmp_path and f"v{P.GENERATOR_VERSION}" in root.name
    assert len(list(root.rglob("*_flair_pp.nii.gz"))) == 21
    assert len(list(root.rglob("*_mask2.nii.gz"))) == 21
    assert [p.name for p in tmp_path.iterdir()] == [root.name]

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(P, "generate", must_not_run)
    assert P.ensure_cached(tmp_path, seed=0, spacing=6.0, progress=False) == root
    assert capsys.readouterr().err == ""


def test_interrupted_generation_leaves_no_cache_behind(tmp_path, monkeypatch):
    def interrupted(out_dir, **kwargs):
        (out_dir / "training").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.ensure_cached(tmp_path, seed=0, spacing=6.0, progress=False)
    assert list(tmp_path.iterdir()) == []


_HANGING_GENERATOR = """
import sys, time
import phantom

def hang(out_dir, **kwargs):
    (out_dir / "training").mkdir()
    print("generating", flush=True)
    time.sleep(600)

phantom.generate = hang
phantom.ensure_cached(sys.argv[1], seed=0, spacing=6.0, progress=False)
"""


@pytest.mark.skipif(os.name != "posix", reason="pids are only checked on POSIX")
def test_killed_generation_is_cleaned_up_by_the_next_call_but_a_live_one_is_not(tmp_path, monkeypatch):
    def fast(out_dir, **kwargs):
        (out_dir / "training").mkdir()
        return out_dir

    monkeypatch.setattr(P, "generate", fast)
    child = subprocess.Popen([sys.executable, "-c", _HANGING_GENERATOR, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(Path(P.__file__).parent)})
    try:
        assert child.stdout.readline() == "generating\n"
        partial = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
        assert len(partial) == 1
        # a concurrent call while the other generator lives: it finishes its own copy and
        # leaves the other's folder alone
        root = P.ensure_cached(tmp_path, seed=0, spacing=6.0, progress=False)
        assert sorted(tmp_path.iterdir()) == sorted([root, partial[0]])
    finally:
        child.kill()   # SIGKILL: no finally clause runs in the child
        child.wait()
    assert partial[0].is_dir()
    # a folder of the same pid made on another machine that shares the cache is not ours to judge
    foreign = tmp_path / partial[0].name.replace(socket.gethostname(), "other-host", 1)
    foreign.mkdir()
    assert P.ensure_cached(tmp_path, seed=0, spacing=6.0, progress=False) == root
    assert sorted(tmp_path.iterdir()) == sorted([root, foreign])


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNET_CACHE", str(tmp_path))
    assert P.default_cache_root() == tmp_path


@pytest.mark.parametrize("argv, word", [
    (["--out", "x", "--spacing", "0.1"], "spacing"),
    (["--out", "x", "--spacing", "abc"], "spacing"),
    (["--out", "x", "--seed", "-1"], "seed"),
    (["--out", "x", "--subjects", "0"], "subjects"),
    ([], "--out"),
])
def test_cli_rejects_bad_arguments_by_name(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        P.main(argv)
    assert exc.value.code == 2
    assert word in capsys.readouterr().err


def test_bad_api_arguments_name_the_parameter(tmp_path):
    with pytest.raises(ValueError, match="timepoints"):
        P.generate(tmp_path, spacing=6.0, subjects=3, timepoints=(4, 4), progress=False)
    with pytest.raises(ValueError, match="timepoint"):
        P.make_scan(P.make_subject(0, 1, 6.0, 2), 3)


def test_cli_preview_writes_a_png(tmp_path):
    out = tmp_path / "preview.png"
    assert P.main(["--preview", str(out), "--spacing", "4"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
