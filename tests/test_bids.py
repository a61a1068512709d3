import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import bids
import metrics
import repro
from infer import UsageError

FILES = [
    "sub-01/ses-01/anat/sub-01_ses-01_FLAIR.nii.gz", "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz",
    "sub-01/ses-02/anat/sub-01_ses-02_FLAIR.nii.gz",  # no T1w: skipped with two channels
    "sub-02/anat/sub-02_acq-3d_FLAIR.nii", "sub-02/anat/sub-02_acq-3d_T1w.nii.gz",
    "sub-02/anat/sub-02_acq-2d_FLAIR.nii.gz", "sub-02/anat/sub-02_acq-2d_T1w.nii.gz",
    "sub-02/anat/sub-02_acq-2d_T1w.nii",  # the acq-2d T1w twice: that case is ambiguous
    "sub-03/anat/sub-03_T1w.nii.gz",  # no FLAIR at all: the subject is skipped
    "sub-04/ses-01/anat/sub-04_ses-01_run-1_FLAIR.nii.gz", "sub-04/ses-01/anat/sub-04_ses-01_run-1_T1w.nii.gz",
    "sub-04/ses-01/anat/sub-04_ses-02_FLAIR.nii.gz",  # named for another session than its folder's
    "sub-04/ses-02/func/sub-04_ses-02_task-rest_bold.nii.gz",  # a session without anat
    "derivatives/other/sub-01/anat/sub-01_FLAIR.nii.gz",  # not a subject of this dataset
]


@pytest.fixture
def tiny(tmp_path):
    """A tiny BIDS dataset (8^3 images): sessions, subjects lacking a contrast, an ambiguous case."""
    root = tmp_path / "bids"
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), root / name)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "tiny", "BIDSVersion": "1.10.0", "DatasetDOI": "doi:10.0000/tiny"}))
    return root


def names(cases):
    return [(c.folder.as_posix(), c.source, [p.name for p in c.files]) for c in cases]


def test_finds_flair_cases_in_sessions_and_lists_the_skipped(tiny):
    cases, skipped = bids.find_cases(tiny, ["FLAIR"])
    assert names(cases) == [
        ("sub-01/ses-01/anat", "sub-01_ses-01", ["sub-01_ses-01_FLAIR.nii.gz"]),
        ("sub-01/ses-02/anat", "sub-01_ses-02", ["sub-01_ses-02_FLAIR.nii.gz"]),
        ("sub-02/anat", "sub-02_acq-2d", ["sub-02_acq-2d_FLAIR.nii.gz"]),
        ("sub-02/anat", "sub-02_acq-3d", ["sub-02_acq-3d_FLAIR.nii"]),
        ("sub-04/ses-01/anat", "sub-04_ses-01_run-1", ["sub-04_ses-01_run-1_FLAIR.nii.gz"])]
    assert [str(s) for s in skipped] == [
        "sub-03/anat: no *_FLAIR.nii[.gz]",
        "sub-04/ses-01/anat/sub-04_ses-02_FLAIR.nii.gz: its entities are not those of sub-04/ses-01/anat",
        "sub-04/ses-02/anat: no anat folder"]


def test_matches_contrasts_on_the_same_entities_and_skips_the_rest(tiny):
    cases, skipped = bids.find_cases(tiny, ["FLAIR", "MPRAGE"])
    assert names(cases) == [
        ("sub-01/ses-01/anat", "sub-01_ses-01", ["sub-01_ses-01_FLAIR.nii.gz", "sub-01_ses-01_T1w.nii.gz"]),
        ("sub-02/anat", "sub-02_acq-3d", ["sub-02_acq-3d_FLAIR.nii", "sub-02_acq-3d_T1w.nii.gz"]),
        ("sub-04/ses-01/anat", "sub-04_ses-01_run-1",
         ["sub-04_ses-01_run-1_FLAIR.nii.gz", "sub-04_ses-01_run-1_T1w.nii.gz"])]
    reasons = {s.where: s.reason for s in skipped}
    assert reasons["sub-01/ses-02/anat/sub-01_ses-02"] == "no sub-01_ses-02_T1w.nii[.gz]"
    assert reasons["sub-02/anat/sub-02_acq-2d"] == "both sub-02_acq-2d_T1w.nii and .nii.gz"
    assert {s.subject for s in skipped} == {"01", "02", "03", "04"}


def test_participant_labels_restrict_with_or_without_prefix(tiny):
    cases, skipped = bids.find_cases(tiny, ["FLAIR", "MPRAGE"], ["sub-04", "01"])
    assert [c.subject for c in cases] == ["01", "04"] and {s.subject for s in skipped} == {"01", "04"}


@pytest.mark.parametrize("labels, message", [
    (["03"], r"^--participant-label 03: no scan to segment \(sub-03/anat: no \*_FLAIR"),
    (["01", "sub-09", "7"], r"^--participant-label 09, 7: no such subject in .*bids \(it has 01, 02, 03, 04\)$"),
    (["sub-0_1"], r"^--participant-label sub-0_1: expected a BIDS label"),
])
def test_participant_label_errors_are_one_line(tiny, labels, message):
    with pytest.raises(UsageError, match=message) as error:
        bids.find_cases(tiny, ["FLAIR"], labels)
    assert "\n" not in str(error.value)


def test_refuses_channels_without_bids_suffix_and_non_bids_folders(tiny, tmp_path):
    with pytest.raises(UsageError, match=r"channel\(s\) T1 have no BIDS suffix"):
        bids.find_cases(tiny, ["FLAIR", "T1"])
    with pytest.raises(UsageError, match="not a BIDS dataset"):
        bids.find_cases(tiny / "sub-01", ["FLAIR"])
    with pytest.raises(UsageError, match=r"no scan with FLAIR and PDw of the same entities .*sub-01/ses-01/anat/sub-01_ses-01: no "
                                         r"sub-01_ses-01_PDw.*; and \d+ more\)$"):
        bids.find_cases(tiny, ["FLAIR", "PDW"])


ENTITY = r"[a-zA-Z]+-[a-zA-Z0-9]+"
NAME = re.compile(rf"(?P<sub>sub-[a-zA-Z0-9]+)(?:_(?P<ses>ses-[a-zA-Z0-9]+))?(?:_{ENTITY})*_(?P<suffix>[a-zA-Z0-9]+)"
                  r"\.(?:nii\.gz|tsv|json|png)")


def check_derivatives(out_root, source_root, sha256):
    """A structural check of a derivatives dataset: its description and summary at the root, and every other file
    named by BIDS entities in the folder its sub- and ses- entities name (anat/, or the subject's figures/)."""
    description = json.loads((out_root / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    generated = description["GeneratedBy"][0]
    assert generated["Name"] == bids.NAME and generated["Version"] == bids.__version__
    assert sha256 in generated["Description"]
    assert description["SourceDatasets"][0]["URL"] == source_root.resolve().as_uri()
    files = [p.relative_to(out_root) for p in out_root.rglob("*") if p.is_file()]
    for path in files:
        if path.name in ("dataset_description.json", bids.SUMMARY, Path(bids.SUMMARY).with_suffix(".json").name):
            assert path.parent == Path(".")
            continue
        match = NAME.fullmatch(path.name)
        assert match, path
        folders = [match["sub"], *([match["ses"]] if match["ses"] else [])]
        expected = [match["sub"], "figures"] if match["suffix"] == "qc" else [*folders, "anat"]
        assert list(path.parent.parts) == expected, path
    return files


def test_outputs_mirror_the_input_tree_as_a_bids_derivatives_dataset(tiny, tmp_path):
    cases, _ = bids.find_cases(tiny, ["FLAIR", "MPRAGE"])
    out = tmp_path / "derivatives" / bids.NAME
    sha = "ab" * 32
    assert bids.write_dataset_description(out, sha, tiny) == out / "dataset_description.json"
    rows = [{"lesion_id": 1, "voxels": 3, "volume_ml": 0.003, "centroid_x_mm": -1.5, "centroid_y_mm": 2.0,
             "centroid_z_mm": 30.25, "centroid_i": 1.0, "centroid_j": 2.0, "centroid_k": 3.0,
             "mean_probability": None, "max_probability": None}]
    for case in cases:
        paths = bids.output_paths(case, out)
        for target in (paths.mask, paths.probabilities, paths.labels, paths.qc):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"")
        bids.write_lesion_tsv(paths.lesions, rows)
        bids.write_dseg_lookup(paths.labels_lookup, rows)
        assert paths.lesions_sidecar.is_file()
    files = check_derivatives(out, tiny, sha)
    assert len(files) == 1 + 7 * len(cases)
    first = bids.output_paths(cases[0], out)
    assert first.mask == out / "sub-01/ses-01/anat/sub-01_ses-01_space-orig_label-lesion_mask.nii.gz"
    assert first.probabilities.name == "sub-01_ses-01_space-orig_label-lesion_probseg.nii.gz"
    assert first.labels.name == "sub-01_ses-01_space-orig_seg-lesion_dseg.nii.gz"
    assert first.qc == out / "sub-01/figures/sub-01_ses-01_space-orig_label-lesion_qc.png"
    for case in cases:  # the tree mirrors the input's
        assert bids.output_paths(case, out).mask.parent.relative_to(out) == case.files[0].parent.relative_to(tiny)


def test_lesion_tsv_and_sidecar_describe_every_column(tmp_path):
    mask = np.zeros((6, 6, 6), bool)
    mask[1:3, 1:3, 1] = mask[4, 4, 4] = True
    _, rows = metrics.lesion_table(mask, np.diag([1.0, 1.0, 2.0, 1.0]))
    bids.write_lesion_tsv(tmp_path / "x_lesions.tsv", rows)
    lines = (tmp_path / "x_lesions.tsv").read_text().splitlines()
    assert lines[0].split("\t") == list(metrics.LESION_COLUMNS)
    assert lines[1].split("\t")[:3] == ["1", "4", "0.008"] and lines[1].endswith("\tn/a\tn/a")
    assert len(lines) == 3
    sidecar = json.loads((tmp_path / "x_lesions.json").read_text())
    assert list(sidecar) == list(metrics.LESION_COLUMNS)
    assert all(entry["Description"] for entry in sidecar.values())
    assert sidecar["volume_ml"]["Units"] == "mL" and "Units" not in sidecar["voxels"]
    bids.write_dseg_lookup(tmp_path / "x_dseg.tsv", rows)
    assert (tmp_path / "x_dseg.tsv").read_text() == "index\tname\tmapping\n1\tlesion 1\t7\n2\tlesion 2\t7\n"


def test_dataset_description_is_kept_when_identical_and_never_written_over_the_source(tiny, tmp_path):
    out = tmp_path / "out"
    bids.write_dataset_description(out, "a" * 64, tiny)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["SourceDatasets"] == [{"URL": tiny.resolve().as_uri(), "DOI": "doi:10.0000/tiny"}]
    bids.write_dataset_description(out, "a" * 64, tiny)  # another participant, the same run: fine
    with pytest.raises(UsageError, match="exists and describes other outputs"):
        bids.write_dataset_description(out, "b" * 64, tiny)
    bids.write_dataset_description(out, "b" * 64, tiny, overwrite=True)
    assert "b" * 64 in (out / "dataset_description.json").read_text()
    before = (tiny / "dataset_description.json").read_text()
    with pytest.raises(UsageError, match="would write into the input BIDS dataset"):
        bids.write_dataset_description(tiny, "a" * 64, tiny, overwrite=True)
    assert (tiny / "dataset_description.json").read_text() == before


def test_file_sha256(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"abc")
    assert bids.file_sha256(tmp_path / "best.pt") == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def phantom_bids(dataset, root):
    """A BIDS dataset of phantom FLAIRs: sub-01 with two sessions, sub-02 without, sub-03 with a T1w only."""
    flairs = sorted((dataset / "training").glob("*/preprocessed/*_flair_pp.nii"))
    layout = {"sub-01/ses-01/anat/sub-01_ses-01_FLAIR.nii.gz": flairs[0],
              "sub-01/ses-02/anat/sub-01_ses-02_FLAIR.nii.gz": flairs[1],
              "sub-02/anat/sub-02_FLAIR.nii.gz": flairs[2], "sub-03/anat/sub-03_T1w.nii.gz": flairs[3]}
    for name, source in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.load(source), root / name)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "phantom", "BIDSVersion": "1.10.0"}))
    return root


def test_predict_a_bids_dataset_writes_a_derivatives_dataset(finished, dataset, tmp_path, capsys):
    source = phantom_bids(dataset, tmp_path / "bids")
    before = sorted(source.rglob("*"))
    out = tmp_path / "derivatives" / bids.NAME

    def predict(*options, output=out):
        return repro.main(["predict", "--checkpoint", str(finished / "best.pt"), "--input", str(source), "--output",
                           str(output), "--device", "cpu", *options])
    assert predict("--participant-label", "03") == 2  # no FLAIR: refused before any work
    assert predict(output=source / "derivatives-not") == 2
    assert "would write into the input BIDS dataset" in capsys.readouterr().err and not out.exists()
    assert predict("--save-probabilities", "--lesion-map", "--qc") == 0
    assert "skipped sub-03/anat: no *_FLAIR.nii[.gz]" in capsys.readouterr().err.splitlines()
    files = check_derivatives(out, source, bids.file_sha256(finished / "best.pt"))
    assert len(files) == 3 + 7 * 3
    mask = nib.load(out / "sub-01/ses-02/anat/sub-01_ses-02_space-orig_label-lesion_mask.nii.gz")
    np.testing.assert_allclose(mask.affine, nib.load(source / "sub-01/ses-02/anat/sub-01_ses-02_FLAIR.nii.gz").affine)
    summary = (out / bids.SUMMARY).read_text().splitlines()
    assert summary[0].split("\t") == list(metrics.SUMMARY_COLUMNS)
    assert [line.split("\t")[0] for line in summary[1:]] == ["sub-01_ses-01", "sub-01_ses-02", "sub-02"]
    for line in summary[1:]:
        tsv = next(out.rglob(f"{line.split()[0]}_space-orig_label-lesion_lesions.tsv"))
        assert len(tsv.read_text().splitlines()) - 1 == int(line.split("\t")[1])
    # one participant again, with a minimum lesion size: its rows replaced, the others' kept
    assert predict("--participant-label", "sub-02", "--min-lesion-size", "1000", "--overwrite") == 0
    rows = [line.split("\t") for line in (out / bids.SUMMARY).read_text().splitlines()[1:]]
    assert [(r[0], r[4]) for r in rows] == [("sub-01_ses-01", "0"), ("sub-01_ses-02", "0"), ("sub-02", "1000")]
    assert sorted(source.rglob("*")) == before  # nothing written into the input dataset
