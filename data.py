"""Read MS lesion datasets, prepare them as the paper did, serve training patches.

The paper (Fig. 1, §3.5) crops every scan to its head/brain, z-normalises it, and
trains on 10 random 144³ patches per scan and epoch, each holding lesion voxels.
This module does the same, top to bottom:

1. Readers. ``find_scans(path)`` finds the scans of one of three layouts;
   ``load_dataset(path, channels, label)`` reads one or more channels plus the lesion
   masks of every scan:
   - ISBI 2015 training data (the paper's data in all but name; see the protocol):
     ``training/trainingNN/preprocessed/trainingNN_TT_{flair,mprage,pd,t2}_pp.nii[.gz]``
     and ``.../masks/trainingNN_TT_mask{1,2}.nii[.gz]``, anywhere under ``path``.
     Skull-stripped, 1 mm isotropic, zeros outside the brain.
   - MICCAI 2008, the dataset the paper names: ``<SITE>_train_CaseNN_{FLAIR,T1,T2,lesion}.nhdr``
     (+ ``.raw``), UNC cases also ``_lesion_byCHB`` (a second rater). These scans are
     NOT skull-stripped and come at 0.5 mm (512³). The reader takes them as they are:
     the foreground is then every non-zero voxel, i.e. the head and any non-zero noise
     in the air, so the crop keeps about the whole field of view and the statistics of
     the z-normalisation include skull, scalp and air. To train on the brain, list the
     scans in a manifest with a ``brainmask`` column: voxels outside the brain mask are
     set to 0 first, and the scan is then prepared as a skull-stripped one. With
     ``spacing=None`` the 0.5 mm grid is kept (all MICCAI scans agree); pass
     ``spacing=1.0`` to train at the ISBI 2015 resolution (8x fewer voxels).
   - Anything else through a CSV manifest,
     ``subject,timepoint,<channels...>,mask[,brainmask][,split]``; a column that is neither a
     known channel nor names image files (e.g. ``notes``) is ignored.
2. Checks. Every bad input raises ``DataError`` with one line naming the file and what to do,
   before anything is allocated for it: only regular files are opened, ids must be single
   file names, headers are checked against the file's size and ``MAX_VOXELS``.
3. ``read_scan``: the one function that turns input files into the network's input, for
   training and prediction alike: reorient to RAS+, resample (optional), crop to the
   image's foreground, z-normalise each channel. It returns a ``Geometry`` whose
   ``restore`` puts a network output back into the input file's own grid.
4. ``PatchSampler``: lesion-centred random patches from scans held on the training device.
5. ``split_scans``: the paper's scan-level 17:2:2 split, or a subject-level one.

Arrays are indexed (X, Y, Z) in voxels, as nibabel and pynrrd return them; images carry
a leading channel axis, (C, X, Y, Z).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
import os
import re
import stat
import sys
import unicodedata
import zlib
from dataclasses import dataclass, field, replace
from functools import reduce
from pathlib import Path
from typing import Sequence

import nibabel as nib
import nrrd
import numpy as np
import torch
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation


class DataError(Exception):
    """Bad input data. The message names the file and says what was expected."""


# --------------------------------------------------------------------------------------------
# Channels and labels

CHANNELS = ("FLAIR", "MPRAGE", "T2W", "PDW")
"""The paper's channel names, in the order of its Table 2."""

ISBI_TAGS = {"FLAIR": "flair", "MPRAGE": "mprage", "PDW": "pd", "T2W": "t2"}
"""The paper's channel names -> ISBI 2015 file tags (``trainingNN_TT_<tag>_pp.nii``)."""

MICCAI2008_TAGS = {"FLAIR": "FLAIR", "T1": "T1", "T2W": "T2"}
"""MICCAI 2008 channels -> file tags. It has a T1 (spin echo), no MPRAGE and no PD; T1 is
accepted as a channel of its own and is not an alias of MPRAGE: the two are different
sequences and the paper's MPRAGE row cannot be reproduced on this dataset."""

_ALIASES = {n.lower(): n for n in (*ISBI_TAGS, *MICCAI2008_TAGS)}
_ALIASES.update({t.lower(): n for table in (ISBI_TAGS, MICCAI2008_TAGS) for n, t in table.items()})

LABEL_CHOICES = ("mask1", "mask2", "union", "intersection")
"""Which rater's mask becomes the label. Default ``mask1``: the paper trains on "one
ground-truth channel" without naming the rater, so we take the first rater, which keeps
the label as one person drew it; ``union``/``intersection`` are consensus masks the
paper never describes. The others are there to measure how much the choice matters
(the ISBI challenge scores against both raters, which ``Scan.raters`` holds). For
MICCAI 2008, ``mask1`` is the ``lesion`` file and ``mask2`` the ``lesion_byCHB`` file
(UNC cases only)."""

BRAINMASK = "brainmask"
"""The manifest column of an optional brain mask (see the module docstring)."""


def channel_name(name: str) -> str | None:
    """The paper's name for a channel given in any case or as a file tag, else None.

    ``channel_name("pd") == "PDW"``, ``channel_name("t2w") == "T2W"``, ``channel_name("T1") == "T1"``.
    """
    return _ALIASES.get(name.strip().lower())


def _channel_key(name: str) -> str:
    # Manifest columns may carry channels we have no alias for (e.g. MSSEG's GADO).
    return channel_name(name) or name.strip().upper()


def parse_channels(text: str | Sequence[str], available: Sequence[str] | None = None,
                   where: str | None = None) -> tuple[str, ...]:
    """Turn ``"FLAIR,T2W"``, ``"all"`` or a sequence of names into a tuple of channel names.

    Names are case-insensitive and may be file tags (``pd``, ``t2``); the order is kept.
    Without ``available`` the names must be known channels (``CHANNELS`` and MICCAI 2008's
    ``T1``) and ``"all"`` means ``CHANNELS``; with it (e.g. a dataset's or a manifest's
    channels) names must be among them, keep their spelling there, and ``"all"`` means
    all of them, in that order. An unknown, empty or repeated name raises DataError naming
    it; ``where`` (e.g. the dataset's path) prefixes the message.
    """
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else [str(t).strip() for t in text]
    known = list(available) if available is not None else [*CHANNELS, "T1"]
    prefix = f"{where}: " if where else ""
    if not items or any(not t for t in items):
        raise DataError(f"{prefix}empty channel name in {text!r}; give names separated by commas, "
                        f"e.g. FLAIR,T2W, or 'all'.")
    if len(items) == 1 and items[0].lower() == "all":
        if available is None:
            return CHANNELS
        if not known:
            raise DataError(f"{prefix}no channels to choose from for 'all'.")
        return tuple(known)
    out: list[str] = []
    for item in items:
        match = [k for k in known if _channel_key(k) == _channel_key(item)]
        if not match:
            hint = "'all' cannot be combined with other names; " if item.lower() == "all" else ""
            if where:
                raise DataError(f"{where}: no channel {item!r} in this data; {hint}it has "
                                f"{', '.join(sorted(known)) or 'none'} (case-insensitive; file tags such as pd, "
                                "t2 also work).")
            raise DataError(f"unknown channel {item!r}; {hint}choose from {', '.join(known)} or 'all' "
                            "(case-insensitive; file tags such as pd, t2 also work).")
        if match[0] in out:
            raise DataError(f"{prefix}channel {item!r} is repeated in {text!r}; list each channel once.")
        out.append(match[0])
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Layouts: which files make a scan

@dataclass(frozen=True)
class _Layout:
    name: str
    raters: tuple[str, ...]  # the mask keys standing for mask1, mask2
    tags: dict[str, str]  # channel name -> its part of the file name
    channels: tuple[str, ...]  # the order of 'all' (a manifest: its columns)
    expected: str  # how a missing file would be named; formatted with id= and tag=


_ISBI = _Layout("ISBI 2015", ("mask1", "mask2"), {n: f"{t}_pp" for n, t in ISBI_TAGS.items()}, CHANNELS,
                "a file named {id}_{tag}.nii or .nii.gz")
_MICCAI = _Layout("MICCAI 2008", ("lesion", "lesion_byCHB"), MICCAI2008_TAGS, tuple(MICCAI2008_TAGS),
                  "a file named {id}_{tag}.nhdr")
_MANIFEST = _Layout("manifest", ("mask",), {}, (), "a path in column '{tag}' of {path} for scan {id}")

_ISBI_FILE = re.compile(
    r"^(?P<subject>training\d+)_(?P<tp>\d+)_(?P<key>(?:flair|mprage|pd|t2)_pp|mask[12])\.nii(?:\.gz)?$")
_MICCAI_FILE = re.compile(
    r"^(?P<subject>[A-Za-z0-9]+_train_Case\d+)_(?P<key>FLAIR|T1|T2|lesion|lesion_byCHB)\.(?:nhdr|nrrd)$")


@dataclass
class Found:
    """One scan's files as found on disk, before reading. ``files`` maps a channel name
    (FLAIR, MPRAGE, ...; a manifest's own column names), a rater key or ``brainmask`` to a path."""
    subject: str
    timepoint: int
    files: dict[str, Path]
    split: str | None = None


def find_scans(path: str | os.PathLike) -> tuple[str, dict[str, Found]]:
    """Detect the layout at ``path`` and list each scan's files without reading them.

    Returns ``(layout name, {scan id: Found})``. ISBI 2015 ids are ``trainingNN_TT``;
    MICCAI 2008 ids are the case name (one time point); manifest ids ``<subject>_<TT>``.
    """
    name, _, found = _find(Path(path).expanduser())
    return name, found


def _find(path: Path) -> tuple[str, _Layout, dict[str, Found]]:
    if path.suffix.lower() == ".csv":
        layout, found = _MANIFEST, _read_manifest(path)
    else:
        layout, found = _walk(path)
    _refuse_shared_images(found, layout)
    return layout.name, layout, found


def _walk(path: Path) -> tuple[_Layout, dict[str, Found]]:
    if _dangling(path):
        raise DataError(f"{path}: dangling symlink (it points to {os.readlink(path)}, which does not exist).")
    if not path.exists():
        raise DataError(f"{path}: no such folder. Point --data at the unpacked ISBI 2015 training "
                        "folder, a MICCAI 2008 folder, or a .csv manifest.")
    if not path.is_dir():
        raise DataError(f"{path}: not a folder and not a .csv manifest.")
    isbi: dict[str, Found] = {}
    miccai: dict[str, Found] = {}
    for root, _, names in sorted(os.walk(path, followlinks=True, onerror=_walk_error)):
        for name in sorted(names):
            if m := _ISBI_FILE.match(name):
                key = _key_of(_ISBI, m["key"])
                _add(isbi, f"{m['subject']}_{m['tp']}", m["subject"], int(m["tp"]), key, Path(root, name))
            elif m := _MICCAI_FILE.match(name):
                key = _key_of(_MICCAI, m["key"])
                _add(miccai, m["subject"], m["subject"], 1, key, Path(root, name))
    if isbi and miccai:
        raise DataError(f"{path}: holds both ISBI 2015 and MICCAI 2008 files; point --data at one of them.")
    if isbi:
        return _ISBI, isbi
    if miccai:
        return _MICCAI, miccai
    raise DataError(
        f"{path}: empty dataset, no scans found. Expected ISBI 2015 files "
        "(training/trainingNN/preprocessed/trainingNN_TT_flair_pp.nii, .../masks/trainingNN_TT_mask1.nii), "
        "MICCAI 2008 files (CHB_train_CaseNN_FLAIR.nhdr, ..._lesion.nhdr), or a .csv manifest.")


def _walk_error(error: OSError) -> None:
    """os.walk skips a folder it cannot list unless told otherwise; a skipped subject would
    silently shrink the dataset, so every listing error stops the read."""
    if isinstance(error, PermissionError):
        raise DataError(f"{error.filename}: permission denied, cannot list this folder; "
                        "make it readable (chmod u+rx) or move it out of the dataset.") from error
    raise DataError(f"{error.filename}: cannot list this folder ({error.strerror or error}).") from error


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _key_of(layout: _Layout, tag: str) -> str:
    return next((name for name, t in layout.tags.items() if t == tag), tag)


def _add(found: dict[str, Found], sid: str, subject: str, tp: int, key: str, file: Path) -> None:
    if _dangling(file):
        raise DataError(f"{file}: dangling symlink (it points to {os.readlink(file)}, which does not exist); "
                        "fix or remove the link.")
    entry = found.setdefault(sid, Found(subject, tp, {}))
    if key in entry.files:
        raise DataError(f"{file} and {entry.files[key]} are both the {key} of scan {sid}; "
                        "remove one of them.")
    entry.files[key] = file


def _refuse_shared_images(found: dict[str, Found], layout: _Layout) -> None:
    """One image file under two scan ids would put the same data on both sides of a split.
    Files are compared by their real path (symlinks and ``..`` resolved). Masks may be
    shared (e.g. one empty mask for lesion-free scans)."""
    seen: dict[str, tuple[str, Path]] = {}
    for sid, entry in found.items():
        for key, file in entry.files.items():
            if key in layout.raters or key == BRAINMASK:
                continue
            real = os.path.realpath(file)
            if real in seen and seen[real][0] != sid:
                other, other_file = seen[real]
                also = "" if str(other_file) == str(file) else f" (there as {other_file})"
                raise DataError(f"{file}: the same image file is listed for scans {other}{also} and {sid}; "
                                "it would leak across the split, keep one.")
            seen.setdefault(real, (sid, file))


SPLITS = ("train", "val", "test")
SPLIT_BY = ("scan", "subject")  # what ``split_scans`` shuffles and cuts: scans (the paper's) or subjects
_MANIFEST_HEADER = "'subject,timepoint,<channels...>,mask[,brainmask][,split]'"


def read_csv(path: str | os.PathLike) -> list[tuple[int, list[str]]]:
    """The rows of a CSV file that hold anything, as (line number, cells stripped of
    spaces), read as UTF-8 (a byte-order mark, as Excel writes one, is accepted). Any
    failure raises DataError naming the file: not a regular file, permission denied, not
    UTF-8 text, not CSV."""
    path = Path(path)
    check_file(path)
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if any(c.strip() for c in row):
                    rows.append((reader.line_num, [c.strip() for c in row]))
    except PermissionError as e:
        raise DataError(f"{path}: permission denied, cannot read this file; make it readable (chmod u+r).") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (a byte {e.object[e.start]:#04x} cannot be decoded); save it "
                        "as UTF-8 (CSV UTF-8 in a spreadsheet).") from e
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: cannot read this file as CSV ({e}).") from e
    return rows


def _read_manifest(csv_path: Path) -> dict[str, Found]:
    """Rows ``subject,timepoint,<channel columns>,mask[,brainmask][,split]``; relative paths
    are resolved against the CSV's folder; an empty cell means that file is missing. A
    UTF-8 byte-order mark (Excel writes one) is accepted.

    Channel columns: a column named after a known channel (``channel_name``), and any
    other column whose cells name NIfTI or NRRD files (e.g. MSSEG's GADO). Any other
    column (e.g. ``notes``, ``age``) is ignored, so that a spreadsheet's own columns can
    stay; one that names image files in some rows and not in others is refused. Subject
    ids become parts of file names, so each must be one safe file-name component
    (``unsafe_name``)."""
    rows = read_csv(csv_path)
    if not rows:
        raise DataError(f"{csv_path}: empty manifest; expected a header row "
                        f"{_MANIFEST_HEADER} and one row per scan.")
    header = rows[0][1]
    lower = [h.lower() for h in header]
    missing = [c for c in ("subject", "timepoint", "mask") if c not in lower]
    if missing:
        raise DataError(f"{csv_path}: the header row lacks column(s) {', '.join(missing)}; expected "
                        f"{_MANIFEST_HEADER}, found '{','.join(header)}'.")
    special = ("subject", "timepoint", "mask", "split", BRAINMASK)
    twice = sorted({h for h, low in zip(header, lower) if low in special and lower.count(low) > 1})
    if twice:
        raise DataError(f"{csv_path}: column(s) {', '.join(twice)} appear more than once; keep one of each.")
    if not rows[1:]:
        raise DataError(f"{csv_path}: empty dataset, the manifest lists no scans.")
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise DataError(f"{csv_path}, line {line}: {len(row)} cells, the header has {len(header)}.")
    channels = [h for i, (h, low) in enumerate(zip(header, lower))
                if low not in special and _holds_images(csv_path, h, [(line, row[i]) for line, row in rows[1:]])]
    keys = [_channel_key(c) for c in channels]
    if len(set(keys)) < len(keys):
        twice = [c for c, k in zip(channels, keys) if keys.count(k) > 1]
        raise DataError(f"{csv_path}: columns {', '.join(twice)} name the same channel; keep one of them.")
    found: dict[str, Found] = {}
    for line, row in rows[1:]:
        cells = dict(zip(lower, row))
        try:
            tp = int(cells["timepoint"])
        except ValueError:
            raise DataError(f"{csv_path}, line {line}: timepoint {cells['timepoint']!r} is not an integer.")
        if not cells["subject"]:
            raise DataError(f"{csv_path}, line {line}: empty subject.")
        for what, name in (("subject", cells["subject"]), ("scan id", f"{cells['subject']}_{tp:02d}")):
            if reason := unsafe_name(name):
                raise DataError(f"{csv_path}, line {line}: {what} {name!r} {reason}; ids become file names "
                                "(<subject>_<TT>_pred.nii.gz), so each must be one file-name component.")
        split = cells.get("split")
        if split is not None and split.lower() not in SPLITS:
            raise DataError(f"{csv_path}, line {line}: split {split!r}; expected one of {', '.join(SPLITS)} "
                            "(every row, when the column exists).")
        sid = f"{cells['subject']}_{tp:02d}"
        if sid in found:
            raise DataError(f"{csv_path}, line {line}: subject {cells['subject']} time point {tp} is listed twice.")
        files = {(low if low in ("mask", BRAINMASK) else _channel_key(name)): csv_path.parent / Path(cell).expanduser()
                 for name, low, cell in zip(header, lower, row)
                 if cell and (low in ("mask", BRAINMASK) or name in channels)}
        found[sid] = Found(cells["subject"], tp, files, split.lower() if split else None)
    return found


def _holds_images(csv_path: Path, column: str, cells: list[tuple[int, str]]) -> bool:
    """Whether a manifest column is a channel: a known channel name, or cells naming image files."""
    if channel_name(column):
        return True
    images = [(line, cell) for line, cell in cells if cell.lower().endswith(IMAGE_SUFFIXES)]
    other = [(line, cell) for line, cell in cells if cell and not cell.lower().endswith(IMAGE_SUFFIXES)]
    if images and other:
        raise DataError(f"{csv_path}, line {other[0][0]}: column {column!r} names image files in other rows "
                        f"(line {images[0][0]}), here {other[0][1]!r}; expected a .nii, .nii.gz, .nrrd or .nhdr "
                        "file, or an empty cell.")
    return bool(images)


_NAME_BYTES = 200  # a scan id's file names (<id>_pred.nii.gz) must stay within NAME_MAX, 255 bytes


def unsafe_name(name: str) -> str | None:
    """Why ``name`` cannot be one file-name component, or None when it can: not empty, not
    ``.`` or ``..``, no ``/`` or ``\\``, no control or invisible formatting character (they
    would hide in a message or a listing), at most 200 bytes in UTF-8."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is '.' or '..'"
    if "/" in name or "\\" in name:
        return "holds a path separator (/ or \\)"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in name):
        return "holds a control or invisible formatting character"
    if len(name.encode("utf-8", "surrogatepass")) > _NAME_BYTES:
        return f"is longer than {_NAME_BYTES} bytes"
    return None


def _check_splits(found: dict[str, Found], path: Path) -> None:
    """A manifest's split column must leave none of train, val and test empty (checked
    when the data are loaded, before any training)."""
    splits = [e.split for e in found.values()]
    if not any(splits):
        return
    empty = [name for name in SPLITS if name not in splits]
    if empty:
        raise DataError(f"{path}: the split column leaves {' and '.join(empty)} empty; every one of "
                        f"{', '.join(SPLITS)} needs at least one scan (or drop the column for a random split).")


def dataset_fingerprint(path: str | os.PathLike) -> str:
    """A short hex digest of the dataset at ``path``, for a resume check: each scan's id,
    file keys and file names, a manifest's split column, and the bytes of every file (an
    NRRD header's data file too), so that voxels edited in place are noticed. Files are
    hashed with SHA-256 (hardware-accelerated on current CPUs) in 1 MiB blocks. The digest does not depend on how ``path`` is
    spelled (``DIR``, ``DIR/``, a relative or an absolute path give the same digest). A
    missing file counts as missing; one that cannot be read raises DataError."""
    _, layout, found = _find(Path(path).expanduser())
    digest = hashlib.sha256(layout.name.encode())
    for sid in sorted(found):
        entry = found[sid]
        digest.update(f"\n{sid}|{entry.split}".encode())
        for key in sorted(entry.files):
            file = entry.files[key]
            digest.update(f"|{key}={file.name}:".encode())
            if not os.path.exists(file):
                digest.update(b"missing")
                continue
            for part in (file, _detached_file(file)):
                if part is not None:
                    _hash_file(part, digest)
    return digest.hexdigest()[:16]


def _hash_file(path: Path, digest) -> None:
    """Feed the bytes of the regular file ``path`` to ``digest``, 1 MiB at a time."""
    check_file(path)
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as e:
        raise _unreadable(path, e) from e


def _detached_file(path: Path, header: dict | None = None) -> Path | None:
    """The data file an NRRD header names (always for ``.nhdr``, rarely for ``.nrrd``), as
    pynrrd finds it (relative to the header's folder); None for other files, or a header
    that cannot be parsed."""
    if header is None:
        if not path.name.lower().endswith((".nhdr", ".nrrd")):
            return None
        try:
            header = nrrd.read_header(str(path))
        except (OSError, ValueError, KeyError, TypeError, nrrd.NRRDError):
            return None
    name = header.get("datafile", header.get("data file"))
    return None if name is None else path.parent / name


# --------------------------------------------------------------------------------------------
# Reading one file, with the checks every scan needs

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")
"""The file types ``read_image`` reads."""

MAX_VOXELS = 1024 ** 3
"""The most voxels one volume may hold, as stored and after resampling (4 GiB as float32):
twice the side of the largest public MS scans (MICCAI 2008, 512³). A header describing
more is corrupt or hostile, and a spacing that resamples a scan beyond it is a mistake;
both are refused before anything is allocated."""

MAX_INTENSITY = 1e15
"""The largest voxel magnitude accepted. Scanners store 16-bit integers, or floats of
that order; values beyond this are not MR intensities, and near float32's limit (3.4e38)
their squares overflow in a z-normalisation."""

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def check_file(path: str | os.PathLike, listed: str = "") -> None:
    """Refuse anything but a regular file at ``path`` (symlinks followed), judged by
    ``os.stat`` before the file is opened: reading a FIFO or a device blocks or never ends.
    DataError names the file and what it is instead; ``listed`` (e.g. "listed for scan X in
    m.csv") is added after the reason."""
    path = Path(path)
    where = f", {listed}" if listed else ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DataError(f"{path}: dangling symlink (it points to {os.readlink(path)}, which does not "
                            f"exist){where}; fix or remove the link.") from None
        raise DataError(f"{path}: no such file{where}.") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied, cannot reach this file{where}; make its folders "
                        "readable (chmod u+rx).") from None
    except (OSError, ValueError) as e:  # a path through a file, a loop of symlinks, a name too long
        raise DataError(f"{path}: cannot reach this file{where} ({getattr(e, 'strerror', None) or e}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: is a folder, expected a file{where}.")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise DataError(f"{path}: is {kind}, expected a regular file{where}.")


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header | None]:
    """Read one 3D volume as stored: NIfTI (``.nii``, ``.nii.gz``) or NRRD (``.nrrd``, ``.nhdr``).

    Returns ``(float32 array (X, Y, Z), 4x4 voxel-to-RAS-mm affine, header)``; header is the
    nibabel header for NIfTI (so predictions can be written into the same space), None for
    NRRD. Trailing axes of length 1 are dropped. Refused with DataError: everything
    ``_header`` refuses, a .nii.gz whose gzip stream is damaged (its CRC-32 or length is
    checked) or shorter than its header describes, NaN or inf voxels, magnitudes beyond
    ``MAX_INTENSITY``, an unreadable or corrupt file. No reorientation, no resampling:
    ``read_scan`` does those.
    """
    path = Path(path)
    shape, affine, image = _header(path)
    try:
        if isinstance(image, dict):  # pynrrd's header
            # pynrrd returns Fortran order; one C-order float32 copy here (cast and transpose at once)
            data, header = np.ascontiguousarray(nrrd.read(str(path))[0], dtype=np.float32), None
        else:
            if path.name.lower().endswith(".gz"):
                image = _gunzipped(path, image)
            data, header = image.get_fdata(dtype=np.float32), image.header
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    data = data.reshape(shape)
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} NaN or inf voxels; "
                        "fix the file (e.g. set them to 0) before training.")
    peak = max(-float(data.min()), float(data.max()))
    if peak > MAX_INTENSITY:
        raise DataError(f"{path}: voxel values reach {peak:.3g} in magnitude, beyond {MAX_INTENSITY:g} "
                        "(data.MAX_INTENSITY); these are not MR intensities. Rescale the image.")
    return data, affine, header


_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, zlib.error, nib.filebasedimages.ImageFileError,
                nrrd.NRRDError)


def _unreadable(path: Path, error: Exception) -> DataError:
    """The one line for a file that failed to read: a permission refused is told apart from damage."""
    if isinstance(error, PermissionError):
        return DataError(f"{error.filename or path}: permission denied, cannot read this file; "
                         "make it readable (chmod u+r).")
    return DataError(f"{path}: unreadable or corrupt file ({type(error).__name__}: {error}). "
                     "Re-download or re-export it.")


def _header(path: Path):
    """``(shape, affine, image)`` of one image file from its header alone, checked before any
    voxel is read: a regular file of a known type holding one 3D volume (trailing axes of
    length 1 dropped) of at least 2 voxels a side and at most ``MAX_VOXELS``, of real
    values, with a finite, invertible affine; an uncompressed NIfTI at least as long as its
    header describes. ``image``: nibabel's image (voxels not read yet) or pynrrd's header."""
    check_file(path)
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            image = nib.load(path)
            shape = _volume_shape(path, image.shape)
            if np.dtype(image.get_data_dtype()).kind == "c":
                raise DataError(f"{path}: complex-valued image ({image.get_data_dtype()}); expected a real "
                                "magnitude image. Export the magnitude.")
            size = _nifti_bytes(image)
            if not name.endswith(".gz") and (length := os.stat(path).st_size) < size:
                raise DataError(f"{path}: truncated, the file holds {length} bytes and its header describes "
                                f"{size} ({shape} voxels of {image.get_data_dtype()}). Re-download or re-export it.")
            affine = image.affine.copy()
        elif name.endswith((".nrrd", ".nhdr")):
            image = nrrd.read_header(str(path))
            shape = _volume_shape(path, image["sizes"])
            if (detached := _detached_file(path, image)) is not None:
                check_file(detached, listed=f"the data file of {path}")
            affine = _nrrd_affine(image, path)
        else:
            raise DataError(f"{path}: unsupported file type; expected .nii, .nii.gz, .nrrd or .nhdr.")
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    if not np.isfinite(affine).all():
        raise DataError(f"{path}: its voxel-to-world affine holds NaN or inf ({affine[:3].round(3).tolist()}); "
                        "fix the header's sform/qform (NRRD: space directions and origin).")
    singular = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if not singular[-1] > 1e-6 * singular[0]:
        raise DataError(f"{path}: its voxel-to-world affine is singular (voxel sizes "
                        f"{np.round(_spacing_of(affine), 6).tolist()} mm, or axes along one another); fix the "
                        "header's sform/qform (NRRD: space directions).")
    return shape, affine, image


def _volume_shape(path: Path, shape) -> tuple[int, int, int]:
    """The (X, Y, Z) of a header's shape, trailing axes of length 1 dropped, or DataError."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise DataError(f"{path}: shape {shape}, expected one 3D volume. "
                        "Split multi-volume (4D) files into one file per channel.")
    if len(shape) < 3 or min(shape) < 2:
        raise DataError(f"{path}: shape {shape}, a 2D image or a single slice; expected a 3D volume of at least "
                        "2 voxels along each axis.")
    if math.prod(shape) > MAX_VOXELS:
        raise DataError(f"{path}: its header describes {shape} voxels, more than a scan may hold "
                        f"({round(MAX_VOXELS ** (1 / 3))}³, data.MAX_VOXELS); the file is corrupt or not one MR volume.")
    return shape


def _nifti_bytes(image) -> int:
    """The bytes a NIfTI's header describes: the header and extensions, then the voxels."""
    return int(image.header.get_data_offset()) + math.prod(image.shape) * image.get_data_dtype().itemsize


def _gunzipped(path: Path, image):
    """The image of a .nii.gz, re-read from its whole gzip stream through Python's gzip
    module, which checks the CRC-32 and length at the end of every member (nibabel may
    stop at the last voxel and never read them). The stream must hold the bytes the header
    describes, and at most 1 MiB more: a small file must not expand into gigabytes."""
    size = _nifti_bytes(image)
    buffer = io.BytesIO()
    with gzip.open(path, "rb") as f:
        while block := f.read(1 << 20):
            buffer.write(block)
            if buffer.tell() > size + (1 << 20):
                raise DataError(f"{path}: decompresses to more than the {size} bytes its header describes; "
                                "the file is corrupt or not one NIfTI image.")
    if buffer.tell() < size:
        raise DataError(f"{path}: truncated, it decompresses to {buffer.tell()} bytes and its header describes "
                        f"{size}. Re-download or re-export it.")
    buffer.seek(0)
    return type(image).from_file_map(type(image).make_file_map({"image": buffer, "header": buffer}))


_SPACE_SIGNS = {"left": -1.0, "right": 1.0, "posterior": -1.0, "anterior": 1.0,
                "inferior": -1.0, "superior": 1.0}
_SPACE_WORDS = {"l": "left", "r": "right", "p": "posterior", "a": "anterior", "i": "inferior", "s": "superior"}


def _nrrd_affine(hdr: dict, path: Path) -> np.ndarray:
    """Voxel -> RAS mm from the NRRD space directions (one row per axis) and origin,
    flipping the axes of an LPS/LAS space so that nibabel writes predictions correctly.
    A header without ``space`` is taken as RAS with its ``spacings`` (1 mm when absent)."""
    if "space directions" in hdr:
        dirs = np.asarray(hdr["space directions"], dtype=float)
    else:
        dirs = np.diag(np.asarray(hdr.get("spacings", [1.0, 1.0, 1.0]), dtype=float))
    if dirs.shape != (3, 3) or not np.isfinite(dirs).all():
        raise DataError(f"{path}: NRRD space directions {dirs.tolist()}, expected three 3D vectors "
                        "(one 3D volume).")
    space = hdr.get("space", "right-anterior-superior").lower()
    words = space.split("-") if "-" in space else [_SPACE_WORDS.get(c, c) for c in space]
    if len(words) != 3 or not all(w in _SPACE_SIGNS for w in words):
        raise DataError(f"{path}: NRRD space {space!r} is not supported; "
                        "expected e.g. left-posterior-superior or right-anterior-superior.")
    affine = np.eye(4)
    affine[:3, :3] = dirs.T
    affine[:3, 3] = np.asarray(hdr.get("space origin", np.zeros(3)), dtype=float)
    return np.diag([*(_SPACE_SIGNS[w] for w in words), 1.0]) @ affine


def _same_grid(path: Path, shape, affine, ref_path: Path, ref_shape, ref_affine, what: str) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise DataError(f"{path} has shape {tuple(shape)} but {ref_path} has {tuple(ref_shape)}; "
                        f"{what} must be on the same voxel grid.")
    if not np.allclose(affine, ref_affine, atol=1e-3):
        raise DataError(f"{path} and {ref_path} have different affines "
                        f"({np.asarray(affine)[:3].round(3).tolist()} vs {np.asarray(ref_affine)[:3].round(3).tolist()}); "
                        f"{what} must be on the same voxel grid: resample one onto the other.")


def _read_binary(path: Path, image_path: Path, shape: tuple, affine: np.ndarray, what: str) -> np.ndarray:
    mask, mask_affine, _ = read_image(path)
    _same_grid(path, mask.shape, mask_affine, image_path, shape, affine, f"a {what} and its image")
    other = (mask != 0) & (mask != 1)
    if other.any():
        raise DataError(f"{path}: not a binary mask, values such as {np.unique(mask[other])[:5].tolist()} "
                        f"besides 0 and 1; binarise it or point at the {what}.")
    return mask.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Geometry: file grid -> canonical (RAS+) grid -> resampled grid -> crop, and back

def _spacing_of(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def _as_spacing(spacing) -> np.ndarray:
    values = np.broadcast_to(np.asarray(spacing, dtype=float), (3,)) if np.ndim(spacing) == 0 else \
        np.asarray(spacing, dtype=float)
    if values.shape != (3,) or not (np.isfinite(values).all() and (values > 0).all()):
        raise DataError(f"spacing {spacing!r}: expected a positive number of mm or three of them (sx, sy, sz).")
    return values.astype(float)


def _mm(spacing) -> str:
    """A spacing for a message: one number when the axes agree, else three."""
    values = [float(f"{v:.4g}") for v in spacing]
    return f"{values[0]:g}" if len(set(values)) == 1 else f"({', '.join(f'{v:g}' for v in values)})"


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a prepared image came from, and how to put a network output back there.

    The chain, applied by ``read_scan`` (``apply``) and undone by ``restore``:

    1. the file's grid: ``shape``, ``affine`` (voxel -> RAS mm) and ``header`` (the nibabel
       header for NIfTI, None for NRRD) -- write predictions with these;
    2. reorientation to the closest canonical orientation, RAS+ (axis 0 towards Right,
       1 Anterior, 2 Superior), as nibabel's ``as_closest_canonical`` and TorchIO's
       ``ToCanonical`` do it: a permutation and flips of the voxel axes, no interpolation.
       ``ornt`` is nibabel's orientation array (file axis i -> canonical axis
       ``ornt[i, 0]``, flipped where ``ornt[i, 1] == -1``); ``canonical_shape`` the result;
    3. resampling on the canonical axes to ``spacing`` mm (when it differs from the file's):
       ``resampled_shape[d] = round(canonical_shape[d] * file spacing / spacing)``, the
       new grid centred on the old one (same centre of the field of view), images
       trilinear and labels nearest-neighbour (``scipy.ndimage.affine_transform``,
       order 1 / 0, edge values extended). ``zoom[d]`` = canonical voxels per prepared voxel;
    4. the crop ``box``, ``((x0, x1), (y0, y1), (z0, z1))`` with exclusive stops, in the
       resampled grid.

    ``prepared_affine`` is the voxel -> RAS mm affine of the cropped, prepared image.
    """
    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header | None
    ornt: np.ndarray
    canonical_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    resampled_shape: tuple[int, int, int]
    zoom: tuple[float, float, float]
    box: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, shape, affine=None, header=None, spacing=None) -> "Geometry":
        """The geometry of a file grid ``shape``/``affine`` (identity when None), reoriented
        to RAS+ and resampled to ``spacing`` mm (None: the file's own spacing), with a
        crop box covering the whole resampled grid (``with_box`` narrows it). A resampled
        grid of fewer than 2 voxels along an axis, or of more than ``MAX_VOXELS``, raises
        DataError naming the spacing, before anything is allocated."""
        shape = tuple(int(n) for n in shape)
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
        ornt = io_orientation(affine)
        canonical_shape = tuple(int(n) for n in apply_orientation(np.empty(shape, np.uint8), ornt).shape)
        canonical_spacing = _spacing_of(affine @ inv_ornt_aff(ornt, shape))
        target = canonical_spacing if spacing is None else _as_spacing(spacing)
        if np.allclose(target, canonical_spacing, rtol=1e-5, atol=0):
            target, resampled = canonical_spacing, canonical_shape
        else:
            with np.errstate(over="ignore"):  # an absurd spacing: sides of inf voxels, refused just below
                sides = np.rint(np.asarray(canonical_shape) * canonical_spacing / target)
            if not (sides.min() >= 2 and math.prod(sides.tolist()) <= MAX_VOXELS):
                raise DataError(f"spacing {_mm(target)} mm resamples a scan of {canonical_shape} voxels of "
                                f"{_mm(canonical_spacing)} mm to ({', '.join(f'{n:.4g}' for n in sides)}) voxels; "
                                f"expected at least 2 per axis and at most {round(MAX_VOXELS ** (1 / 3))}³ in all "
                                "(data.MAX_VOXELS). Choose a spacing nearer the scan's own.")
            resampled = tuple(int(n) for n in sides)
        zoom = tuple(float(t / s) for t, s in zip(target, canonical_spacing))
        return cls(shape, affine, header, ornt, canonical_shape, tuple(float(t) for t in target), resampled, zoom,
                   tuple((0, n) for n in resampled))

    def with_box(self, box) -> "Geometry":
        return replace(self, box=tuple((int(a), int(b)) for a, b in box))

    @property
    def resampled(self) -> bool:
        return tuple(self.resampled_shape) != tuple(self.canonical_shape) or any(z != 1.0 for z in self.zoom)

    @property
    def canonical_affine(self) -> np.ndarray:
        return self.affine @ inv_ornt_aff(self.ornt, self.shape)

    def _offsets(self) -> np.ndarray:
        # canonical coordinate of resampled voxel j: c = zoom * j + offset (centres aligned)
        n, m, z = (np.asarray(v, dtype=float) for v in (self.canonical_shape, self.resampled_shape, self.zoom))
        return (n - 1) / 2 - z * (m - 1) / 2

    @property
    def prepared_affine(self) -> np.ndarray:
        scale = np.eye(4)
        scale[:3, :3] = np.diag(self.zoom)
        scale[:3, 3] = self._offsets() + np.asarray(self.zoom) * [a for a, _ in self.box]
        return self.canonical_affine @ scale

    def apply(self, volume, order: int = 0, crop: bool = True) -> np.ndarray:
        """A volume in the file's grid (X, Y, Z) -> the prepared grid: reoriented, resampled
        with spline ``order`` (0 nearest for labels, 1 linear for images) and, with
        ``crop``, cropped to ``box``."""
        volume = np.asarray(volume)
        if tuple(volume.shape) != tuple(self.shape):
            raise ValueError(f"volume shape {volume.shape} is not the file grid {self.shape}")
        out = apply_orientation(volume, self.ornt)
        if self.resampled:
            out = _resample(out, self.zoom, self._offsets(), self.resampled_shape, order)
        out = np.ascontiguousarray(out)
        return out[tuple(slice(a, b) for a, b in self.box)] if crop else out

    def restore(self, volume, order: int | None = None, fill: float = 0) -> np.ndarray:
        """A volume in the prepared grid (X, Y, Z), e.g. logits or a mask, as a numpy array
        in the file's own voxel grid (write it with ``affine`` and ``header``). Leading
        axes, e.g. (C, X, Y, Z), are kept and each volume restored on its own.

        Uncrop, holding ``fill`` outside the box (0 for masks; a very negative logit,
        e.g. -1e4, for logits), resample back with spline ``order`` (default: 0, nearest,
        for integer and bool volumes; 1, linear, for floats), reorient back. Integer and
        bool volumes come back as uint8 (bool) or their own dtype, floats as float32.
        Where no resampling was done the round trip is exact for any volume.
        Note: a NIfTI header keeps its own data type; to store a uint8 mask as uint8,
        write it with ``header.copy()`` after ``set_data_dtype(np.uint8)``.
        """
        if isinstance(volume, torch.Tensor):
            volume = volume.detach().cpu().numpy()
        volume = np.asarray(volume)
        if volume.ndim > 3:  # leading axes (e.g. channels): each (X, Y, Z) volume on its own
            return np.stack([self.restore(v, order, fill) for v in volume])
        if volume.dtype == bool:
            volume = volume.astype(np.uint8)
        integer = volume.dtype.kind in "iu"
        if not integer:
            volume = volume.astype(np.float32, copy=False)
        order = (0 if integer else 1) if order is None else order
        full = paste(volume, self.box, self.resampled_shape, fill=fill)
        if self.resampled:
            inverse = tuple(1.0 / z for z in self.zoom)
            full = _resample(full, inverse, -self._offsets() / np.asarray(self.zoom), self.canonical_shape, order,
                             fill=fill)
        inverse_ornt = np.empty_like(self.ornt)
        inverse_ornt[self.ornt[:, 0].astype(int)] = np.stack([np.arange(3), self.ornt[:, 1]], axis=1)
        return np.ascontiguousarray(apply_orientation(full, inverse_ornt))


def _resample(volume: np.ndarray, zoom, offset, shape, order: int, fill: float = 0.0) -> np.ndarray:
    """Output voxel j samples input coordinate ``zoom * j + offset`` (per axis)."""
    from scipy import ndimage
    return ndimage.affine_transform(volume, np.asarray(zoom, dtype=float), offset=np.asarray(offset, dtype=float),
                                    output_shape=tuple(shape), order=order, mode="nearest", cval=fill,
                                    prefilter=False)


def paste(cropped: torch.Tensor | np.ndarray, box, full_shape, fill=0):
    """Put a cropped volume back into the full grid it was cut from (``Geometry.restore``'s
    first step). Returns the same kind (tensor on the same device, or array) and dtype as
    ``cropped``, shaped ``full_shape``, holding ``fill`` outside ``box``."""
    crop = tuple(slice(a, b) for a, b in box)
    if tuple(cropped.shape) != tuple(b - a for a, b in box):
        raise ValueError(f"cropped shape {tuple(cropped.shape)} does not match box {box}")
    if isinstance(cropped, torch.Tensor):
        out = torch.full(tuple(full_shape), fill, dtype=cropped.dtype, device=cropped.device)
    else:
        out = np.full(tuple(full_shape), fill, dtype=cropped.dtype)
    out[crop] = cropped
    return out


# --------------------------------------------------------------------------------------------
# read_scan: files -> the network's input (reorient, resample, crop, z-normalise)

BACKGROUND = 0.0
"""Intensity of every voxel outside the foreground after ``norm="brain"``: the brain
mean, as nnU-Net (Isensee et al. 2021) sets it for data normalised inside a non-zero mask."""

NORMS = ("brain", "crop")


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and unbiased (N - 1) std, computed in float64 throughout (float32 squares
    overflow beyond 1.8e19), a block of 2^20 voxels at a time so that no float64 copy of a
    whole scan is made."""
    values = values.reshape(-1)
    n = values.size
    mean = float(values.mean(dtype=np.float64))
    if n < 2:
        return mean, 0.0
    squares = 0.0
    for start in range(0, n, 1 << 20):
        d = values[start:start + (1 << 20)].astype(np.float64) - mean
        squares += float(np.square(d, out=d).sum())
    return mean, math.sqrt(squares / (n - 1))


def _bounding_box(region: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Per axis (start, stop) of the non-zero voxels of ``region`` (not empty)."""
    box = []
    for axis in range(region.ndim):
        hit = np.flatnonzero(region.any(axis=tuple(a for a in range(region.ndim) if a != axis)))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def read_scan(paths: Sequence[str | os.PathLike], norm: str = "brain", spacing=None,
              brainmask: str | os.PathLike | None = None
              ) -> tuple[torch.Tensor, Geometry, tuple[float, ...]]:
    """Turn one scan's channel files into the network's input, for training and prediction alike.

    ``paths``: one file per channel, in the model's channel order; they must share one
    voxel grid (shape and affine), else DataError naming the file. Steps:

    1. Reorient to RAS+ (nibabel's ``as_closest_canonical``, TorchIO's ``ToCanonical``).
    2. Resample to ``spacing`` mm (a number or (sx, sy, sz)), trilinearly; None keeps the
       file's spacing. See ``Geometry``.
    3. Foreground: the voxels that are non-zero in any channel (the union, as nnU-Net's
       non-zero mask), or the non-zero voxels of ``brainmask`` (a binary file on the same
       grid) when given; voxels outside a brain mask are set to 0 first (skull-stripping).
       The crop box is the foreground's bounding box: it is built from the image alone,
       never from a lesion mask, so the network's input cannot depend on the label.
    4. z-normalise each channel on its own, with the mean and the unbiased (N - 1) std:

       - ``norm="brain"`` (default): statistics over the foreground voxels, which become
         ``(x - mean) / std``; every other voxel is set to ``BACKGROUND`` (0.0), as
         nnU-Net normalises inside its non-zero mask.
       - ``norm="crop"``: TorchIO's ``ZNormalization()`` as the paper most likely called it
         (default ``masking_method=None``): statistics over every voxel of the cropped box,
         background zeros included, and the whole box mapped, so brain voxels end with
         mean > 0 and std < 1 and the background at ``-mean / std`` (the image minimum,
         different per scan and channel). TorchIO pools the statistics over the channels
         of a multi-channel image; we take each channel on its own, as TorchIO does for
         one channel per image.

       A channel with a constant foreground raises DataError (TorchIO raises RuntimeError).

    Returns ``(image, geometry, background)``: a float32 tensor (C, X, Y, Z) in the
    prepared grid, its ``Geometry``, and per channel the value of the voxels outside the
    foreground (0.0 for ``norm="brain"``; for ``norm="crop"`` the value a raw 0 became,
    ``-mean / std``, also where, as in a MICCAI 2008 head without brain mask, no voxel
    is exactly 0), for padding.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise DataError("read_scan needs at least one channel file.")
    if norm not in NORMS:
        raise DataError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORMS)}.")
    channels, affine, header = [], None, None
    for path in paths:
        array, aff, hdr = read_image(path)
        if affine is None:
            affine, header = aff, hdr
        else:
            _same_grid(path, array.shape, aff, paths[0], channels[0].shape, affine, "the channels of a scan")
        channels.append(array)
    source = paths[0]
    try:
        geometry = Geometry.of(channels[0].shape, affine, header, spacing)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    # a coarse spacing can leave too few voxels to hold the brain: then the messages below say so
    resampled = f" after resampling to {_mm(geometry.spacing)} mm" if geometry.resampled else ""
    if brainmask is not None:
        brain = _read_binary(Path(brainmask), source, channels[0].shape, affine, "brain mask")
        foreground = geometry.apply(brain, order=0, crop=False) != 0
        if not foreground.any():
            raise DataError(f"{brainmask}: the brain mask is empty{resampled}; expected 1 over the brain.")
        images = [np.where(foreground, geometry.apply(c, order=1, crop=False), 0) for c in channels]
    else:
        images = [geometry.apply(c, order=1, crop=False) for c in channels]
        foreground = reduce(np.logical_or, (im != 0 for im in images))
        if not foreground.any():
            raise DataError(f"{source}: every voxel is 0{resampled}; expected a skull-stripped scan with a non-zero "
                            f"brain (or give a brain mask){', and a finer spacing' if resampled else ''}.")
    geometry = geometry.with_box(_bounding_box(foreground))
    box = geometry.box
    crop = tuple(slice(a, b) for a, b in box)
    foreground = foreground[crop]
    out = np.empty((len(images), *foreground.shape), np.float32)
    background = []
    for c, (path, image) in enumerate(zip(paths, images)):
        image = image[crop]
        mean, std = _mean_std(image[foreground] if norm == "brain" else image)
        if not std > 0:
            raise DataError(f"{path}: the {'foreground' if norm == 'brain' else 'crop'} has one constant intensity "
                            f"({mean:g}){resampled}; cannot z-normalise. Check that this is an MR image"
                            f"{', and choose a finer spacing' if resampled else ''}.")
        # float32 arithmetic in place (a 512^3 MICCAI 2008 scan is 0.5 GB per channel)
        mean32, std32 = np.float32(mean), np.float32(std)
        np.subtract(image, mean32, out=out[c])
        out[c] /= std32
        if norm == "brain":
            out[c][~foreground] = BACKGROUND
            background.append(BACKGROUND)
        else:  # exactly the value a voxel of 0 became
            background.append(float((np.float32(0) - mean32) / std32))
        images[c] = None
    return torch.from_numpy(out), geometry, tuple(background)


# --------------------------------------------------------------------------------------------
# Loading a dataset

@dataclass
class Scan:
    """One prepared scan: its channels, its lesion mask(s), and where they came from.

    ``image``: float32 (C, X, Y, Z), always with a channel axis, reoriented, resampled,
    cropped and z-normalised by ``read_scan``; ``mask``: the label, uint8 {0, 1}
    (X, Y, Z) on the same grid; ``raters``: each available rater's mask on that grid,
    keyed ``mask1``/``mask2`` (ISBI 2015: both; MICCAI 2008: ``lesion`` as mask1 and
    UNC's ``lesion_byCHB`` as mask2; a manifest: its ``mask`` as mask1); ``channels``:
    the channel names, in ``image`` order; ``background``: per channel, the value outside
    the foreground (0.0 for ``norm="brain"``); ``geometry``: see ``Geometry``;
    ``spacing``: (sx, sy, sz) mm of ``image``; ``paths``: ``{"image": first channel,
    <channel>: ..., <rater key of the label>: ..., "brainmask": ...}``; ``split``:
    train/val/test from a manifest's split column, else None.
    ``full_shape``, ``affine``, ``header`` and ``box`` are the geometry's (file grid;
    the box is in the canonical, resampled grid).
    """
    id: str
    subject: str
    timepoint: int
    image: torch.Tensor
    mask: torch.Tensor
    geometry: Geometry | None = None
    paths: dict[str, str] = field(default_factory=dict)
    channels: tuple[str, ...] = ()
    background: tuple[float, ...] | None = None
    raters: dict[str, torch.Tensor] = field(default_factory=dict)
    split: str | None = None
    spacing: tuple[float, float, float] | None = None

    def __post_init__(self):
        if self.image.ndim != 4:
            raise ValueError(f"Scan {self.id}: image must be (C, X, Y, Z), got shape {tuple(self.image.shape)}")
        if tuple(self.mask.shape) != tuple(self.image.shape[1:]):
            raise ValueError(f"Scan {self.id}: mask shape {tuple(self.mask.shape)} is not the image's "
                             f"{tuple(self.image.shape[1:])}")
        if self.geometry is None:
            self.geometry = Geometry.of(self.image.shape[1:])
        if self.background is None:
            self.background = (BACKGROUND,) * self.image.shape[0]
        if len(self.background) != self.image.shape[0]:
            raise ValueError(f"Scan {self.id}: {len(self.background)} background values for "
                             f"{self.image.shape[0]} channels")
        if self.spacing is None:
            self.spacing = tuple(self.geometry.spacing)

    @property
    def full_shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine

    @property
    def header(self):
        return self.geometry.header

    @property
    def box(self):
        return self.geometry.box


def load_dataset(path: str | os.PathLike, channels: str | Sequence[str], label: str = "mask1",
                 norm: str = "brain", spacing=None, progress: bool = False) -> list[Scan]:
    """Read every scan at ``path`` and prepare it with ``read_scan``, sorted by scan id.

    ``path``: an ISBI 2015 folder (the one holding ``training/``, or ``training/`` itself),
    a MICCAI 2008 folder, or a ``.csv`` manifest. ``channels``: one name or several
    (``"FLAIR"``, ``"FLAIR,T2W"``, ``["FLAIR", "T2W"]``, ``"all"``; see ``parse_channels``):
    FLAIR, MPRAGE, PDW, T2W (or T1 for MICCAI 2008), case-insensitive, or file tags
    (``pd``, ``t2``); a manifest also accepts its own column names. They are stacked in
    the given order and each is normalised on its own. ``label``: one of ``LABEL_CHOICES``
    (default ``mask1``, see there); a manifest has a single ``mask`` column, so only
    ``mask1``. ``norm``: ``"brain"`` or ``"crop"`` (see ``read_scan``). ``spacing``: None
    keeps each scan's spacing when all scans agree (to 0.1 %) and otherwise resamples
    every scan to the dataset's median spacing (per axis, in the RAS+ orientation); a
    number or (sx, sy, sz) in mm resamples every scan to it. ``progress``: a progress bar
    on stderr.

    Refused with DataError: a lesion voxel outside the crop box (the crop is built from
    the image alone, so it would be lost; the mask does not fit its image), a dataset
    whose label masks are all empty, a manifest split column leaving train, val or test
    empty.
    """
    path = Path(path).expanduser()
    _, layout, found = _find(path)
    if norm not in NORMS:
        raise DataError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORMS)}.")
    raters, combine = _label_raters(label, layout, path)
    keys = _resolve_channels(channels, found, layout, path)
    _check_splits(found, path)
    target = _dataset_spacing(found, keys[0], layout, path) if spacing is None else _as_spacing(spacing)
    scans = []
    ids = sorted(found)
    if progress:
        from tqdm import tqdm
        ids = tqdm(ids, desc="reading scans", unit="scan", file=sys.stderr)
    for sid in ids:
        scans.append(_load_scan(sid, found[sid], keys, raters, combine, layout, path, norm, target))
    if not any(s.mask.any() for s in scans):
        raise DataError(f"{path}: every lesion mask ({label}) is empty in all {len(scans)} scans; a lesion "
                        "model cannot be trained on it. Check the mask files or the label choice.")
    return scans


def _load_scan(sid, entry: Found, keys, raters, combine, layout: _Layout, path: Path, norm, target) -> Scan:
    image_paths = [_file(entry, sid, k, "image", layout, path) for k in keys]
    label_paths = [_file(entry, sid, r, "mask", layout, path) for r in raters]
    brain_path = _file(entry, sid, BRAINMASK, "brain mask", layout, path) if BRAINMASK in entry.files else None
    image, geometry, background = read_scan(image_paths, norm=norm, spacing=target, brainmask=brain_path)
    rater_masks = {}
    for i, key in enumerate(layout.raters):
        if key not in entry.files:
            continue
        file = _file(entry, sid, key, "mask", layout, path)
        mask = _read_binary(file, image_paths[0], geometry.shape, geometry.affine, "lesion mask")
        grid = geometry.apply(mask, order=0, crop=False)
        cropped = np.ascontiguousarray(grid[tuple(slice(a, b) for a, b in geometry.box)])
        lost = int(grid.sum()) - int(cropped.sum())
        if lost:
            raise DataError(f"{file}: {lost} lesion voxel(s) lie outside the crop box of its image "
                            f"{image_paths[0]} (the bounding box of the image's non-zero voxels"
                            f"{' or brain mask' if brain_path else ''}); the mask does not fit the image.")
        rater_masks[f"mask{i + 1}"] = torch.from_numpy(cropped)
    label_masks = [rater_masks[f"mask{layout.raters.index(r) + 1}"].numpy() for r in raters]
    mask = torch.from_numpy(np.ascontiguousarray(reduce(combine, label_masks)))
    paths = {"image": str(image_paths[0]), **{k: str(p) for k, p in zip(keys, image_paths)},
             **{r: str(p) for r, p in zip(raters, label_paths)}}
    if brain_path is not None:
        paths[BRAINMASK] = str(brain_path)
    return Scan(sid, entry.subject, entry.timepoint, image, mask, geometry, paths, tuple(keys), background,
                rater_masks, entry.split)


def _dataset_spacing(found: dict[str, Found], key: str, layout: _Layout, path: Path):
    """None where every scan has the same RAS+ spacing (to 0.1 %), else the median spacing
    per axis; read from the headers of channel ``key`` only."""
    spacings = []
    for sid in sorted(found):
        file = _file(found[sid], sid, key, "image", layout, path)
        shape, affine, _ = _header(file)
        spacings.append(Geometry.of(shape[:3], affine).spacing)
    spacings = np.asarray(spacings)
    if np.allclose(spacings, spacings[0], rtol=1e-3, atol=0):
        return None
    return tuple(float(s) for s in np.median(spacings, axis=0))


def mask_files(path: str | os.PathLike, label: str = "mask1") -> dict:
    """Per scan id of the dataset at ``path``, its original mask files as ``load_dataset`` reads them for
    ``label``: (the label's files, the rule combining them, ``np.maximum`` for union and ``np.minimum``
    for intersection, and both raters' files, or None where the layout has one), so that a prediction
    written in a scan's own grid can be scored against the files themselves."""
    path = Path(path).expanduser()
    _, layout, found = _find(path)
    keys, combine = _label_raters(label, layout, path)
    files = {}
    for sid, entry in found.items():
        raters = [entry.files[key] for key in layout.raters if key in entry.files]
        files[sid] = ([entry.files[key] for key in keys], combine, raters if len(raters) == 2 else None)
    return files


def _label_raters(label: str, layout: _Layout, path: Path):
    if label not in LABEL_CHOICES:
        raise DataError(f"{path}: unknown label {label!r}; choose one of {', '.join(LABEL_CHOICES)}.")
    if label != "mask1" and len(layout.raters) == 1:
        raise DataError(f"{path}: a manifest has one mask column, so label must be 'mask1', not {label!r}.")
    raters = {"mask1": layout.raters[:1], "mask2": layout.raters[1:]}.get(label, layout.raters)
    return raters, (np.maximum if label == "union" else np.minimum)


def _resolve_channels(channels, found: dict[str, Found], layout: _Layout, path: Path) -> tuple[str, ...]:
    present = list(dict.fromkeys(k for e in found.values() for k in e.files
                                 if k not in layout.raters and k != BRAINMASK))
    if layout.channels:
        present = [c for c in layout.channels if c in present] + [c for c in present if c not in layout.channels]
    return parse_channels(channels, present, where=f"{path} ({layout.name})")


def _file(entry: Found, sid: str, key: str, what: str, layout: _Layout, path: Path) -> Path:
    if key not in entry.files:
        where = layout.expected.format(id=sid, tag=layout.tags.get(key, key), path=path)
        hint = " A scan with a single rater needs label='mask1'." if key in layout.raters[1:] else ""
        near = [p for k, p in entry.files.items() if (k in layout.raters) == (what == "mask")]
        raise DataError(f"scan {sid} is missing its {what} ({key}): expected {where} "
                        f"(near {(near or list(entry.files.values()))[0]}).{hint}")
    file = entry.files[key]
    if layout is _MANIFEST:
        if not os.path.lexists(file):
            raise DataError(f"{file}: no such file, listed for scan {sid} in {path}; "
                            "relative paths are resolved against the manifest's folder.")
        check_file(file, listed=f"listed for scan {sid} in {path}")
    return file


def check_scan_sizes(scans: Sequence, min_side: int) -> None:
    """Refuse scans too small for the network: every prepared image must be at least
    ``min_side`` voxels along each axis (e.g. the network's size multiple, below which
    its deepest level would be under one voxel, or instance norm over a single voxel fails).
    ``scans``: ``Scan`` objects or ``(name, image)`` pairs with images (C, X, Y, Z) as
    ``read_scan`` returns them. Raises DataError naming the smallest scan."""
    sizes = []
    for scan in scans:
        if isinstance(scan, Scan):
            image = scan.image
            label = f"scan {scan.id}" + (f" ({scan.paths['image']})" if "image" in scan.paths else "")
        else:
            label, image = scan
        sizes.append((min(image.shape[-3:]), str(label), tuple(int(n) for n in image.shape[-3:])))
    if not sizes:
        return
    side, label, shape = min(sizes, key=lambda s: s[0])
    if side < min_side:
        small = sum(s < min_side for s, _, _ in sizes)
        raise DataError(f"{label}: {shape} voxels after cropping, smaller than the network's minimum of "
                        f"{min_side} per side ({small} scan(s) too small); use larger scans or a finer spacing.")


# --------------------------------------------------------------------------------------------
# Training patches, sampled on the training device

class PatchSampler:
    """One epoch of random lesion-centred training patches, drawn on the training device.

    ``scans``: prepared ``Scan`` objects; their image and mask tensors are copied to
    ``device`` once, here, and stay there. ``patch_size``: P or (PX, PY, PZ) voxels
    (default 144, the paper's). ``patches_per_scan``: patches per scan and epoch (default
    10, the paper's). Iterating yields ``len(self)`` triples ``(image, label, s)``: float32
    ``(1, C, PX, PY, PZ)`` and ``(1, 1, PX, PY, PZ)`` on ``device``, in random order, and the
    index ``s`` of the patch's scan in ``scans`` (its spacing and background, for augmentation).

    Centres are drawn as TorchIO's ``LabelSampler`` with label probabilities {0: 0, 1: 1}
    draws them: a lesion voxel, uniformly, so every patch holds lesion and large lesions
    are drawn more often; the patch is centred on it (at voxel P // 2). Where that patch
    would cross the scan's edge, TorchIO never picks the voxel; we shift the patch inward
    just enough, so lesions near the edge are trained on too. A scan with no lesion voxel
    gets centres drawn uniformly over its cropped volume instead, so it still contributes
    (lesion-free) patches. A scan smaller than the patch along an axis is padded once,
    centred, each channel with its own ``Scan.background`` (label 0).

    Several processes (torchrun): ``rank`` of ``world`` draws the same epoch as every other
    process, from a generator seeded alike, and keeps the patches ``rank, rank + world, ...``
    of its order, so that the shares never overlap and together make one epoch.

    Randomness: all draws of an epoch come from ``generator`` at the start of the epoch.
    The generator may live on the CPU or on ``device`` (None: that device's default
    generator). Lesion coordinates are computed once, here; per step there is no disk
    read, no host round trip and no sync, only index arithmetic and ``index_select`` on
    ``device``. Each epoch starts with one sync on CUDA (reading the patch order, or
    copying the draws of a CPU generator).
    """

    def __init__(self, scans: list[Scan], patch_size: int | tuple[int, int, int] = 144,
                 patches_per_scan: int = 10, device: str | torch.device = "cpu",
                 generator: torch.Generator | None = None, rank: int = 0, world: int = 1):
        size = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
        if len(size) != 3 or min(size) < 1 or patches_per_scan < 1 or not scans:
            raise ValueError(f"need scans, patch_size of 3 positive ints and patches_per_scan >= 1; got "
                             f"{len(scans)} scans, {patch_size}, {patches_per_scan}")
        if len({s.image.shape[0] for s in scans}) > 1:
            raise ValueError(f"scans with different channel counts: {sorted({s.image.shape[0] for s in scans})}")
        self.patch_size, self.patches_per_scan = size, patches_per_scan
        self.device, self.generator = torch.device(device), generator
        self.rank, self.world = rank, world
        self.images, self.masks, self.lesions, self.shapes = [], [], [], []
        for scan in scans:
            image, mask = _pad_to(scan, size, self.device)
            lesion = mask.nonzero()
            self.images.append(image)
            self.masks.append(mask)
            self.lesions.append(lesion if len(lesion) else None)
            self.shapes.append(torch.tensor(mask.shape, device=self.device))
        self._size = torch.tensor(size, device=self.device)
        self._half = self._size // 2
        self._steps = [torch.arange(p, device=self.device) for p in size]

    def __len__(self) -> int:
        """Patches this process trains on per epoch: its share of the epoch under torchrun."""
        return len(range(self.rank, self.epoch_size, self.world))

    @property
    def epoch_size(self) -> int:
        """Patches of an epoch, over all processes: ``patches_per_scan`` per scan."""
        return len(self.images) * self.patches_per_scan

    def __iter__(self):
        gdevice = self.generator.device if self.generator is not None else self.device
        n, k = self.epoch_size, self.patches_per_scan
        order = torch.randperm(n, generator=self.generator, device=gdevice).tolist()
        u = torch.rand(n, 3, generator=self.generator, device=gdevice).to(self.device)
        starts = torch.cat([self._starts(s, u[s * k:(s + 1) * k]) for s in range(len(self.images))])
        for i in order[self.rank::self.world]:  # every process draws the same epoch and keeps its share
            s = i // k
            image, mask = self.images[s], self.masks[s]
            for axis, (step, start) in enumerate(zip(self._steps, starts[i])):
                index = step + start
                image, mask = image.index_select(axis + 1, index), mask.index_select(axis, index)
            yield image[None], mask[None, None].float(), s

    def _starts(self, s: int, u: torch.Tensor) -> torch.Tensor:
        """Patch corners for uniforms ``u`` (m, 3) in [0, 1): lesion voxel u[:, 0] of scan s,
        or the voxel at fraction u of its volume where it has no lesion."""
        shape, lesion = self.shapes[s], self.lesions[s]
        if lesion is None:
            centre = (u * shape).long()
        else:
            centre = lesion[(u[:, 0] * len(lesion)).long().clamp_(max=len(lesion) - 1)]
        return torch.minimum((centre - self._half).clamp_(min=0), shape - self._size)


def _pad_to(scan: Scan, size, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan's image and mask on ``device``, padded (centred) to at least ``size``, each
    image channel with its own background value, the mask with 0."""
    shape = tuple(scan.mask.shape)
    padded = tuple(max(p, n) for p, n in zip(size, shape))
    image = scan.image.to(device, torch.float32)
    mask = scan.mask.to(device, torch.uint8)
    if padded == shape:
        return image, mask
    at = tuple(slice((p - n) // 2, (p - n) // 2 + n) for p, n in zip(padded, shape))
    background = torch.tensor(scan.background, dtype=torch.float32, device=device)
    out = background.view(-1, 1, 1, 1).expand(image.shape[0], *padded).clone()
    out[(slice(None), *at)] = image
    out_mask = torch.zeros(padded, dtype=torch.uint8, device=device)
    out_mask[at] = mask
    return out, out_mask


# --------------------------------------------------------------------------------------------
# Train / validation / test splits

def split_scans(scans: list[Scan], by: str = "scan", ratios=(0.8, 0.1, 0.1), seed: int = 0
                ) -> dict[str, list[str]]:
    """Split scan ids into ``{"train": [...], "val": [...], "test": [...]}`` (each sorted),
    the run's ``split_ids``.

    ``by="scan"`` (default, the paper's): scans are shuffled with ``seed`` and cut by
    ``ratios``; 21 ISBI scans give 17 : 2 : 2. Time points of one subject then land on both
    sides, so the test set shares patients' anatomy and lesions with training, and scores
    are optimistic. ``by="subject"``: subjects are shuffled and cut instead, every time
    point following its subject; 5 ISBI subjects give 3 : 1 : 1 subjects.

    Rounding: val and test get ``floor(n * ratio + 0.5)`` units each (units are scans or
    subjects), at least 1 where their ratio is > 0; train gets the rest and must keep at
    least one. If every scan carries a ``split`` (a manifest's split column), those are
    returned as they are and ``by``, ``ratios`` and ``seed`` are ignored; they must leave
    none of train, val and test empty (DataError).
    """
    if any(s.split for s in scans):
        if not all(s.split for s in scans):
            raise ValueError("some scans carry a split and others do not")
        split = {name: sorted(s.id for s in scans if s.split == name) for name in SPLITS}
        empty = [name for name in SPLITS if not split[name]]
        if empty:
            raise DataError(f"the manifest's split column leaves {' and '.join(empty)} empty; every one of "
                            f"{', '.join(SPLITS)} needs at least one scan.")
        return split
    if by not in SPLIT_BY:
        raise ValueError(f"by must be one of {', '.join(SPLIT_BY)}, not {by!r}")
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"ratios must be three non-negative numbers summing to 1, not {ratios}")
    unit_of = {s.id: (s.id if by == "scan" else s.subject) for s in scans}
    units = sorted(set(unit_of.values()))
    n = len(units)
    n_val, n_test = (max(int(np.floor(n * r + 0.5)), 1 if r > 0 else 0) for r in ratios[1:])
    if n - n_val - n_test < 1:
        raise DataError(f"{n} {by}s are too few to split {ratios}; need at least "
                        f"{n_val + n_test + 1}.")
    shuffled = [units[i] for i in np.random.default_rng(seed).permutation(n)]
    side = {u: "train" for u in shuffled[:n - n_val - n_test]}
    side.update({u: "val" for u in shuffled[n - n_val - n_test:n - n_test]})
    side.update({u: "test" for u in shuffled[n - n_test:]})
    return {name: sorted(sid for sid, u in unit_of.items() if side[u] == name) for name in SPLITS}
