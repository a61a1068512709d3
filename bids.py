"""BIDS in, BIDS derivatives out: the scans of a BIDS dataset that a checkpoint can segment, and the names and
tables of its predictions as a BIDS derivatives dataset (BIDS specification 1.10, "Derivatives").

In: `<root>/dataset_description.json` and `sub-<label>/[ses-<label>/]anat/<entities>_<suffix>.nii[.gz]`, one file
per contrast, its BIDS suffix naming the contrast (`SUFFIXES`). A case is one set of files with the same
entities and one suffix per channel of the checkpoint (`find_cases`).

Out (`output_paths`), in the same `sub-*/[ses-*/]anat/` tree, named by the case's source entities:
`_space-orig_label-lesion_mask.nii.gz` (binary mask), `_space-orig_label-lesion_probseg.nii.gz` (probabilities),
`_space-orig_label-lesion_lesions.tsv` and `.json` (one row per lesion, the columns described in the sidecar),
`_space-orig_seg-lesion_dseg.nii.gz` and `.tsv` (the lesions numbered as in the table, and BIDS's lookup table
for those numbers), and `sub-*/figures/..._qc.png` (the picture that checks the result, where the NiPreps
pipelines put their figures). `space-orig`: the input's own grid, untransformed, as BIDS names it. At the root:
`dataset_description.json` and `summary.tsv` with its `.json` sidecar (one row per scan, `write_summary`).

The project's name and version are declared here, once (`NAME`, `__version__`). Standard library only: the few
BIDS rules needed are spelled out in this module rather than taken from pybids.
"""
import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import infer
import metrics

NAME = "resunet3d-ms"
__version__ = "1.0.0"
BIDS_VERSION = "1.10.0"

SUFFIXES = {"FLAIR": "FLAIR", "MPRAGE": "T1w", "T2W": "T2w", "PDW": "PDw"}
"""Our channel names -> the BIDS suffixes of those contrasts. MICCAI 2008's spin-echo T1 has none: BIDS's T1w
does not say which T1-weighted sequence a file is, and the paper's MPRAGE is not a spin echo."""

BIDS_LESION = 7
"""The value of "Lesion" among BIDS's common image-derived labels, the `mapping` of every lesion number."""

_LABEL = re.compile(r"[a-zA-Z0-9]+")
_FILE = re.compile(r"(?P<entities>sub-[a-zA-Z0-9]+(?:_[a-zA-Z]+-[a-zA-Z0-9]+)*)_(?P<suffix>[a-zA-Z0-9]+)"
                   r"(?P<extension>\.nii|\.nii\.gz)")


@dataclass(frozen=True)
class Case:
    """One scan to segment: `source`, its entities ("sub-01_ses-01_run-1"), shared by every file of the case;
    `folder`, where they lie relative to the dataset ("sub-01/ses-01/anat"); `files`, one per channel of the
    checkpoint, in its order."""
    source: str
    folder: PurePosixPath
    files: tuple

    @property
    def subject(self) -> str:
        return self.folder.parts[0][len("sub-"):]


class Skipped(NamedTuple):
    """A session, a subject or a file of the dataset that gives no case, and why."""
    subject: str
    where: str
    reason: str

    def __str__(self):
        return f"{self.where}: {self.reason}"


def is_dataset(path) -> bool:
    """Whether `path` is a BIDS dataset: a folder with a dataset_description.json."""
    return Path(path).is_dir() and (Path(path) / "dataset_description.json").is_file()


def bids_suffixes(channels) -> list:
    """The BIDS suffix of each channel of a checkpoint; a channel without one is refused."""
    missing = [c for c in channels if c not in SUFFIXES]
    if missing:
        raise infer.UsageError(f"--input is a BIDS dataset, and the checkpoint's channel(s) {', '.join(missing)} "
                               f"have no BIDS suffix; BIDS input takes "
                               f"{', '.join(f'{c} ({s})' for c, s in SUFFIXES.items())}")
    return [SUFFIXES[c] for c in channels]


def find_cases(root, channels, participants=None):
    """The cases of the BIDS dataset `root` for a checkpoint with `channels`, and what was skipped.

    `participants`: subject labels, with or without "sub-", to restrict to (None or empty: every subject).
    Returns (cases, skipped), both in the dataset's order: a case for every set of `anat` files with the same
    entities and the suffix of each channel; a `Skipped` for every session (or subject without sessions) with
    no anat folder or no file of the first channel's suffix, for every such file that lacks another channel
    (or has it twice, .nii and .nii.gz), and for every file whose sub-/ses- entities are not its folder's. So
    two FLAIRs of one session (acq-2d, acq-3d) are two cases, each needing its own T1w with the same acq-.
    Reads names only, no image. Raises `infer.UsageError` for a channel without a BIDS suffix, a folder that is
    not a BIDS dataset, a participant label that is malformed, not in the dataset or names a subject with no
    case, and a dataset with no case at all.
    """
    root = Path(root)
    suffixes = bids_suffixes(channels)
    if not is_dataset(root):
        raise infer.UsageError(f"--input {root}: not a BIDS dataset (no dataset_description.json)")
    subjects = sorted(p.name[len("sub-"):] for p in root.glob("sub-*") if p.is_dir())
    if not subjects:
        raise infer.UsageError(f"--input {root}: a BIDS dataset without any sub-<label> folder")
    chosen = _participants(participants, subjects, root) if participants else subjects
    cases, skipped = [], []
    for subject in chosen:
        for folder, session in _anat_folders(root, subject):
            found, missed = _folder_cases(root, folder, subject, session, suffixes)
            cases += found
            skipped += missed
    without = [s for s in chosen if not any(c.subject == s for c in cases)]
    if participants and without:
        raise infer.UsageError(f"--participant-label {', '.join(without)}: no scan to segment ("
                               + _listed([s for s in skipped if s.subject in without]) + ")")
    if not cases:
        same = " of the same entities" if len(suffixes) > 1 else ""
        raise infer.UsageError(f"--input {root}: no scan with {' and '.join(suffixes)}{same} ("
                               + _listed(skipped) + ")")
    return cases, skipped


def _listed(skipped, most=3):
    """The first few reasons of `skipped` on one line."""
    more = f"; and {len(skipped) - most} more" if len(skipped) > most else ""
    return "; ".join(map(str, skipped[:most])) + more


def _participants(labels, subjects, root):
    """The subjects named by --participant-label, in the dataset's order; a malformed or absent one refused."""
    wanted = set()
    for label in labels:
        bare = label[len("sub-"):] if label.startswith("sub-") else label
        if not _LABEL.fullmatch(bare):
            raise infer.UsageError(f"--participant-label {label}: expected a BIDS label, letters and digits, "
                                   "with or without sub-")
        wanted.add(bare)
    absent = sorted(wanted - set(subjects))
    if absent:
        raise infer.UsageError(f"--participant-label {', '.join(absent)}: no such subject in {root} (it has "
                               f"{', '.join(subjects[:10])}{', ...' if len(subjects) > 10 else ''})")
    return [s for s in subjects if s in wanted]


def _anat_folders(root, subject):
    """(anat folder, session label or None) of a subject: sub-X/anat and every sub-X/ses-Y/anat, whether or not
    it exists (a missing one is reported as skipped)."""
    folder = root / f"sub-{subject}"
    sessions = sorted(p for p in folder.glob("ses-*") if p.is_dir())
    plain = [(folder / "anat", None)] if (folder / "anat").is_dir() or not sessions else []
    return plain + [(s / "anat", s.name[len("ses-"):]) for s in sessions]


def _folder_cases(root, folder, subject, session, suffixes):
    """The cases and the skipped of one anat folder (see `find_cases`)."""
    where = folder.relative_to(root).as_posix()
    if not folder.is_dir():
        return [], [Skipped(subject, where, "no anat folder")]
    files, skipped = {}, []
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    for path in sorted(folder.iterdir()):
        match = _FILE.fullmatch(path.name)
        if not match or match["suffix"] not in suffixes:
            continue
        entities = match["entities"]
        if entities == prefix or (entities.startswith(prefix + "_") and (session or "_ses-" not in entities)):
            files.setdefault((entities, match["suffix"]), []).append(path)
        elif match["suffix"] == suffixes[0]:
            skipped.append(Skipped(subject, f"{where}/{path.name}", f"its entities are not those of {where}"))
    sources = sorted({e for e, s in files if s == suffixes[0]})
    if not sources and not skipped:
        skipped.append(Skipped(subject, where, f"no *_{suffixes[0]}.nii[.gz]"))
    cases = []
    for source in sources:
        found = [files.get((source, s), []) for s in suffixes]
        if all(len(f) == 1 for f in found):
            cases.append(Case(source, PurePosixPath(where), tuple(f[0] for f in found)))
        else:
            skipped.append(Skipped(subject, f"{where}/{source}", "; ".join(
                f"no {source}_{s}.nii[.gz]" if not f else f"both {source}_{s}.nii and .nii.gz"
                for s, f in zip(suffixes, found) if len(f) != 1)))
    return cases, skipped


def output_paths(case, out_root):
    """Where the outputs of `case` go under the derivatives dataset `out_root` (`infer.Outputs`, all of them):
    its source entities, then space-orig (the input's own grid), label-lesion or seg-lesion, and the BIDS
    suffix."""
    folder = Path(out_root) / case.folder
    lesion, dseg = f"{case.source}_space-orig_label-lesion", f"{case.source}_space-orig_seg-lesion_dseg"
    return infer.Outputs(folder / f"{lesion}_mask.nii.gz", folder / f"{lesion}_probseg.nii.gz",
                         folder / f"{lesion}_lesions.tsv", folder / f"{lesion}_lesions.json",
                         folder / f"{dseg}.nii.gz", folder / f"{dseg}.tsv",
                         Path(out_root) / f"sub-{case.subject}" / "figures" / f"{lesion}_qc.png")


SUMMARY = "summary.tsv"
"""The summary table at the root of a derivatives dataset, one row per scan (`metrics.SUMMARY_COLUMNS`), with
its JSON sidecar."""


def plan_outputs(cases, source_root, out_root, checkpoint_sha256, overwrite, probabilities, labels, qc):
    """The outputs of `cases` of the BIDS dataset `source_root` in the derivatives dataset `out_root`, refusing,
    before anything is written, what would lose data (`infer.check_outputs`, `check_dataset_description`).

    Returns (one `infer.Outputs` per case, the unasked ones None; the summary table; the rows of that table an
    earlier run into the same dataset left, which `write_summary` keeps). The same dataset: one whose
    dataset_description.json is the one this run writes (same checkpoint, version, source), so that it can be
    filled participant by participant; the summary of another needs `overwrite` and is replaced.
    """
    out_root = Path(out_root)
    if out_root.name.endswith((".nii", ".nii.gz")) or (out_root.exists() and not out_root.is_dir()):
        raise infer.UsageError(f"--output {out_root}: a BIDS dataset as --input takes a folder as --output, where "
                               "its derivatives dataset goes")
    same = check_dataset_description(out_root, checkpoint_sha256, source_root, overwrite) is None
    plan = [output_paths(case, out_root).asked(probabilities, labels, qc) for case in cases]
    summary = out_root / SUMMARY
    earlier = read_summary(summary) if same else None
    targets = [t for outputs in plan for t in outputs if t is not None]
    if earlier is None:
        targets += [summary, summary.with_suffix(".json")]
    infer.check_outputs(out_root, targets, [case.files for case in cases], overwrite)
    return plan, summary, earlier or []


def read_summary(path):
    """The rows of the summary table at `path` as `write_summary` wrote them (strings), or None when there is
    none or it is not one (another header)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return rows if reader.fieldnames == list(metrics.SUMMARY_COLUMNS) else None


def write_summary(path, rows, earlier=()):
    """The summary table of a derivatives dataset at `path`, TSV with its JSON sidecar: `rows`, and the rows of
    `earlier` (an earlier run's) whose scan is not among them, ordered by scan."""
    written = {row["scan"] for row in rows}
    kept = [row for row in earlier if row["scan"] not in written]
    write_table(path, sorted([*kept, *rows], key=lambda row: row["scan"]), list(metrics.SUMMARY_COLUMNS))
    _json(Path(path).with_suffix(".json"), column_descriptions(metrics.SUMMARY_COLUMNS))


def _text(path, text):
    infer.atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _json(path, value):
    _text(path, json.dumps(value, indent=2) + "\n")


def _cell(value):
    """A table cell: n/a for a missing value (BIDS's spelling, which pandas also reads as missing), six
    significant digits for a float."""
    if value is None:
        return "n/a"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_table(path, rows, columns, delimiter="\t"):
    """A table of `rows` (dicts) with the header `columns` (names, in order), tab-separated as BIDS's TSV or
    with another `delimiter` (a CSV), written atomically."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(row[c]) for c in columns] for row in rows)
    _text(path, out.getvalue())


def column_descriptions(columns) -> dict:
    """BIDS's sidecar of a table, {column: {"Description": ..., "Units": ...}}, from {column: (description,
    units or None)} as `metrics.LESION_COLUMNS` holds them."""
    return {name: {"Description": text, **({"Units": units} if units else {})}
            for name, (text, units) in columns.items()}


def write_lesion_tsv(path, rows):
    """The lesion table of one scan (`metrics.lesion_table`'s rows) as TSV at `path`, with its JSON sidecar
    beside it (same name, .json) describing every column."""
    write_table(path, rows, list(metrics.LESION_COLUMNS))
    _json(Path(path).with_suffix(".json"), column_descriptions(metrics.LESION_COLUMNS))


def write_dseg_lookup(path, rows):
    """BIDS's lookup table of the labelled lesion mask (index, name, mapping), one row per lesion of the lesion
    table: without it BIDS would read the numbers as its common labels (1 grey matter, 2 white matter, ...)."""
    write_table(path, [{"index": r["lesion_id"], "name": f"lesion {r['lesion_id']}", "mapping": BIDS_LESION}
                       for r in rows], ["index", "name", "mapping"])


def file_sha256(path) -> str:
    """The SHA-256 of a file (a checkpoint), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_description(checkpoint_sha256, source_root=None) -> dict:
    """The dataset_description.json of a derivatives dataset written with the checkpoint of that SHA-256 from
    the BIDS dataset `source_root` (its DOI, when its own description gives one, and its location)."""
    description = {
        "Name": f"{NAME} MS lesion segmentations", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": NAME, "Version": __version__,
                         "Description": f"MS lesion segmentation (Choi et al. 2021, reproduced); checkpoint SHA-256 "
                                        f"{checkpoint_sha256}"}],
    }
    if source_root is not None:
        source = {"URL": Path(source_root).resolve().as_uri()}
        try:
            own = json.loads((Path(source_root) / "dataset_description.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            own = {}  # unreadable: the source's location alone identifies it
        if isinstance(own, dict) and own.get("DatasetDOI"):
            source["DOI"] = own["DatasetDOI"]
        description["SourceDatasets"] = [source]
    return description


def check_dataset_description(out_root, checkpoint_sha256, source_root=None, overwrite=False):
    """The dataset_description.json to write at `out_root`, or None when the identical one is there already;
    `infer.UsageError` for an `out_root` in the source dataset (outside its derivatives/ folder, BIDS's place
    for derivatives) and for a different description there without `overwrite`. Writes nothing."""
    out_root = Path(out_root)
    path = out_root / "dataset_description.json"
    if source_root is not None:
        source, target = Path(source_root).resolve(), out_root.resolve()
        if target == source or (target.is_relative_to(source) and not target.is_relative_to(source / "derivatives")):
            raise infer.UsageError(f"--output {out_root}: would write into the input BIDS dataset; write the "
                                   f"derivatives to a folder of their own, e.g. "
                                   f"{Path(source_root) / 'derivatives' / NAME}")
    description = dataset_description(checkpoint_sha256, source_root)
    if path.exists():
        try:
            if json.loads(path.read_text(encoding="utf-8")) == description:
                return None
        except (OSError, ValueError):
            pass  # unreadable: not ours to keep unless --overwrite says so
        if not overwrite:
            raise infer.UsageError(f"--output {path}: exists and describes other outputs (another checkpoint, "
                                   "version or source); pass --overwrite to replace it")
    return description


def write_dataset_description(out_root, checkpoint_sha256, source_root=None, overwrite=False) -> Path:
    """Create the derivatives dataset `out_root` with its dataset_description.json, or find it there already.

    An identical description (the same checkpoint, version and source) is left as it is, so that one dataset
    can be filled participant by participant. A different one is replaced only with `overwrite`, and never in
    the source dataset itself (`check_dataset_description`, which refuses before anything is written).
    """
    description = check_dataset_description(out_root, checkpoint_sha256, source_root, overwrite)
    path = Path(out_root) / "dataset_description.json"
    if description is not None:
        Path(out_root).mkdir(parents=True, exist_ok=True)
        _json(path, description)
    return path
