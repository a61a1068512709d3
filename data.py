"""Read MS lesion datasets, prepare them as the paper did, serve training patches.

The paper (Fig. 1, §3.5) crops every scan to its head/brain, z-normalises it, and
trains on 10 random 144³ patches per scan and epoch, each holding lesion voxels.
This module does the same, top to bottom:

1. Readers. ``load_dataset(path, channel, label)`` finds the scans of one of three
   layouts and reads one channel plus its lesion mask per scan:
   - ISBI 2015 training data (the paper's data in all but name; see the protocol):
     ``training/trainingNN/preprocessed/trainingNN_TT_{flair,mprage,pd,t2}_pp.nii[.gz]``
     and ``.../masks/trainingNN_TT_mask{1,2}.nii[.gz]``, anywhere under ``path``.
   - MICCAI 2008, the dataset the paper names: ``<SITE>_train_CaseNN_{FLAIR,T1,T2,lesion}.nhdr``
     (+ ``.raw``), UNC cases also ``_lesion_byCHB`` (a second rater).
   - Anything else through a CSV manifest, ``subject,timepoint,<channels...>,mask[,split]``.
2. Checks. Every bad input raises ``DataError`` naming the file and what to do.
3. ``prepare``: crop to the non-zero foreground, z-normalise inside it; ``paste`` undoes the crop.
4. ``PatchSampler``: lesion-centred random patches from scans held on the training device.
5. ``split_scans``: the paper's scan-level 17:2:2 split, or a subject-level one.

Arrays are indexed (X, Y, Z) in voxels, as nibabel and pynrrd return them.
"""
from __future__ import annotations

import csv
import os
import re
import zlib
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """Bad input data. The message names the file and says what was expected."""


# --------------------------------------------------------------------------------------------
# Channels and labels

CHANNELS = {"FLAIR": "flair", "MPRAGE": "mprage", "PDW": "pd", "T2W": "t2"}
"""The paper's channel names -> ISBI 2015 file tags (``trainingNN_TT_<tag>_pp.nii``)."""

MICCAI2008_CHANNELS = {"FLAIR": "FLAIR", "T1": "T1", "T2W": "T2"}
"""MICCAI 2008 channels -> file tags. It has a T1 (spin echo), no MPRAGE and no PD; T1 is
accepted as a channel of its own and is not an alias of MPRAGE: the two are different
sequences and the paper's MPRAGE row cannot be reproduced on this dataset."""

_ALIASES = {n.lower(): n for n in (*CHANNELS, *MICCAI2008_CHANNELS)}
_ALIASES.update({t.lower(): n for table in (CHANNELS, MICCAI2008_CHANNELS) for n, t in table.items()})

LABELS = ("mask1", "mask2", "union", "intersection")
"""Which rater's mask becomes the label. Default ``mask1``: the paper trains on "one
ground-truth channel" without naming the rater, so we take the first rater, which keeps
the label as one person drew it; ``union``/``intersection`` are consensus masks the
paper never describes. The others are there to measure how much the choice matters
(the ISBI challenge scores against both raters). For MICCAI 2008, ``mask1`` is the
``lesion`` file and ``mask2`` the ``lesion_byCHB`` file (UNC cases only)."""


def channel_name(name: str) -> str | None:
    """The paper's name for a channel given in any case or as a file tag, else None.

    ``channel_name("pd") == "PDW"``, ``channel_name("t2w") == "T2W"``, ``channel_name("T1") == "T1"``.
    """
    return _ALIASES.get(name.strip().lower())


def _channel_key(name: str) -> str:
    # Manifest columns may carry channels we have no alias for (e.g. MSSEG's GADO).
    return channel_name(name) or name.strip().upper()


# --------------------------------------------------------------------------------------------
# Layouts: which files make a scan

@dataclass(frozen=True)
class _Layout:
    name: str
    raters: tuple[str, ...]  # the mask keys standing for mask1, mask2
    tags: dict[str, str]  # channel name -> its part of the file name
    expected: str  # how a missing file would be named; formatted with id= and tag=


_ISBI = _Layout("ISBI 2015", ("mask1", "mask2"), {n: f"{t}_pp" for n, t in CHANNELS.items()},
                "a file named {id}_{tag}.nii or .nii.gz")
_MICCAI = _Layout("MICCAI 2008", ("lesion", "lesion_byCHB"), MICCAI2008_CHANNELS, "a file named {id}_{tag}.nhdr")
_MANIFEST = _Layout("manifest", ("mask",), {}, "a path in column '{tag}' of {path} for scan {id}")

_ISBI_FILE = re.compile(
    r"^(?P<subject>training\d+)_(?P<tp>\d+)_(?P<key>(?:flair|mprage|pd|t2)_pp|mask[12])\.nii(?:\.gz)?$")
_MICCAI_FILE = re.compile(
    r"^(?P<subject>[A-Za-z0-9]+_train_Case\d+)_(?P<key>FLAIR|T1|T2|lesion|lesion_byCHB)\.(?:nhdr|nrrd)$")


@dataclass
class Found:
    """One scan's files as found on disk, before reading. ``files`` maps a channel name
    (FLAIR, MPRAGE, ...; a manifest's own column names) or a rater key to a path."""
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
        return _MANIFEST.name, _MANIFEST, _read_manifest(path)
    if not path.exists():
        raise DataError(f"{path}: no such folder. Point --data at the unpacked ISBI 2015 training "
                        "folder, a MICCAI 2008 folder, or a .csv manifest.")
    if not path.is_dir():
        raise DataError(f"{path}: not a folder and not a .csv manifest.")
    isbi: dict[str, Found] = {}
    miccai: dict[str, Found] = {}
    for root, _, names in sorted(os.walk(path, followlinks=True)):
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
        return _ISBI.name, _ISBI, isbi
    if miccai:
        return _MICCAI.name, _MICCAI, miccai
    raise DataError(
        f"{path}: empty dataset, no scans found. Expected ISBI 2015 files "
        "(training/trainingNN/preprocessed/trainingNN_TT_flair_pp.nii, .../masks/trainingNN_TT_mask1.nii), "
        "MICCAI 2008 files (CHB_train_CaseNN_FLAIR.nhdr, ..._lesion.nhdr), or a .csv manifest.")


def _key_of(layout: _Layout, tag: str) -> str:
    return next((name for name, t in layout.tags.items() if t == tag), tag)


def _add(found: dict[str, Found], sid: str, subject: str, tp: int, key: str, file: Path) -> None:
    entry = found.setdefault(sid, Found(subject, tp, {}))
    if key in entry.files:
        raise DataError(f"{file} and {entry.files[key]} are both the {key} of scan {sid}; "
                        "remove one of them.")
    entry.files[key] = file


_SPLITS = ("train", "val", "test")


def _read_manifest(csv_path: Path) -> dict[str, Found]:
    """Rows ``subject,timepoint,<channel columns>,mask[,split]``; relative paths are
    resolved against the CSV's folder; an empty cell means that file is missing."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{csv_path}: cannot read the manifest ({e}).") from e
    rows = [(line, [c.strip() for c in r]) for line, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{csv_path}: empty manifest; expected a header row "
                        "'subject,timepoint,<channels...>,mask[,split]' and one row per scan.")
    header = rows[0][1]
    lower = [h.lower() for h in header]
    missing = [c for c in ("subject", "timepoint", "mask") if c not in lower]
    if missing:
        raise DataError(f"{csv_path}: the header row lacks column(s) {', '.join(missing)}; expected "
                        f"'subject,timepoint,<channels...>,mask[,split]', found '{','.join(header)}'.")
    channels = [h for h, low in zip(header, lower) if low not in ("subject", "timepoint", "mask", "split")]
    keys = [_channel_key(c) for c in channels]
    if len(set(keys)) < len(keys):
        twice = [c for c, k in zip(channels, keys) if keys.count(k) > 1]
        raise DataError(f"{csv_path}: columns {', '.join(twice)} name the same channel; keep one of them.")
    if not rows[1:]:
        raise DataError(f"{csv_path}: empty dataset, the manifest lists no scans.")
    found: dict[str, Found] = {}
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise DataError(f"{csv_path}, line {line}: {len(row)} cells, the header has {len(header)}.")
        cells = dict(zip(lower, row))
        try:
            tp = int(cells["timepoint"])
        except ValueError:
            raise DataError(f"{csv_path}, line {line}: timepoint {cells['timepoint']!r} is not an integer.")
        if not cells["subject"]:
            raise DataError(f"{csv_path}, line {line}: empty subject.")
        split = cells.get("split")
        if split is not None and split.lower() not in _SPLITS:
            raise DataError(f"{csv_path}, line {line}: split {split!r}; expected one of {', '.join(_SPLITS)} "
                            "(every row, when the column exists).")
        sid = f"{cells['subject']}_{tp:02d}"
        if sid in found:
            raise DataError(f"{csv_path}, line {line}: subject {cells['subject']} time point {tp} is listed twice.")
        files = {("mask" if low == "mask" else name): csv_path.parent / Path(cell).expanduser()
                 for name, low, cell in zip(header, lower, row)
                 if cell and low not in ("subject", "timepoint", "split")}
        found[sid] = Found(cells["subject"], tp, files, split.lower() if split else None)
    return found


# --------------------------------------------------------------------------------------------
# Reading one file, with the checks every scan needs

def read_image(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header | None]:
    """Read one 3D volume: NIfTI (``.nii``, ``.nii.gz``) or NRRD (``.nrrd``, ``.nhdr``).

    Returns ``(float32 array (X, Y, Z), 4x4 voxel-to-RAS-mm affine, header)``; header is the
    nibabel header for NIfTI (so predictions can be written into the same space), None for
    NRRD. Trailing axes of length 1 are dropped; a true 4D image, NaN or inf voxels, or an
    unreadable file raise DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            img = nib.load(path)
            data, affine, header = img.get_fdata(dtype=np.float32), img.affine.copy(), img.header
        elif name.endswith((".nrrd", ".nhdr")):
            data, hdr = nrrd.read(str(path))
            data, affine, header = data.astype(np.float32), _nrrd_affine(hdr, path), None
        else:
            raise DataError(f"{path}: unsupported file type; expected .nii, .nii.gz, .nrrd or .nhdr.")
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError,
            nrrd.NRRDError) as e:
        raise DataError(f"{path}: unreadable or corrupt file ({type(e).__name__}: {e}). "
                        "Re-download or re-export it.") from e
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: shape {data.shape}, expected one 3D volume. "
                        "Split multi-volume (4D) files into one file per channel.")
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} NaN or inf voxels; "
                        "fix the file (e.g. set them to 0) before training.")
    return data, affine, header


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


def _read_mask(path: Path, image_path: Path, shape: tuple, affine: np.ndarray) -> np.ndarray:
    mask, mask_affine, _ = read_image(path)
    if mask.shape != shape:
        raise DataError(f"{path} has shape {mask.shape} but its image {image_path} has {shape}; "
                        "a mask must be drawn on the same grid as its image.")
    if not np.allclose(mask_affine, affine, atol=1e-3):
        raise DataError(f"{path} and its image {image_path} have different affines "
                        f"({mask_affine[:3].round(3).tolist()} vs {affine[:3].round(3).tolist()}); "
                        "resample the mask onto the image grid.")
    other = (mask != 0) & (mask != 1)
    if other.any():
        raise DataError(f"{path}: not a binary mask, values such as {np.unique(mask[other])[:5].tolist()} "
                        "besides 0 and 1; binarise it or point at the lesion mask.")
    return mask.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Crop to the foreground and z-normalise

BACKGROUND = 0.0
"""Intensity of every voxel outside the foreground after normalisation (and of patch
padding): the brain mean, as nnU-Net sets it for data normalised inside a non-zero mask."""


def prepare(image: np.ndarray, mask: np.ndarray | None = None, source: str = "image"
            ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[tuple[int, int], ...]]:
    """Crop a scan to its foreground and z-normalise it, for training and prediction alike.

    The foreground is every non-zero voxel: for skull-stripped data (ISBI 2015) that is
    the brain. The crop ``box`` is the bounding box of the foreground and of the lesion
    mask, ``((x0, x1), (y0, y1), (z0, z1))`` with exclusive stops in the full grid; hand it
    to ``paste`` to put a prediction back. Foreground voxels become ``(x - mean) / std``
    with the mean and the unbiased (N - 1) std of the foreground; the rest is set to
    ``BACKGROUND`` (0.0).

    TorchIO's ``ZNormalization`` (spec §2) differs: with its default ``masking_method=None``,
    which the paper most likely used, mean and std are taken over every voxel of the
    cropped box, background zeros included, so brain voxels end with mean > 0 and std < 1
    and the background with -mean/std, the image minimum. With a mask such as
    ``masking_method=lambda x: x > 0`` its statistics and brain voxels equal ours, but it
    still maps the whole image, leaving the background at -mean/std (negative, different
    per scan) where we hold it at 0. Both use the unbiased std; TorchIO raises
    RuntimeError where std is 0, we raise DataError.

    ``image``: 3D array (X, Y, Z), any units; ``mask``: binary array of the same shape or
    None; ``source`` names the scan in error messages. Returns a float32 image tensor, a
    uint8 mask tensor (or None), and the box.
    """
    image = np.asarray(image)
    if image.ndim != 3 or not np.isfinite(image).all():
        raise DataError(f"{source}: expected a finite 3D volume, got shape {image.shape}.")
    foreground = image != 0
    region = foreground if mask is None else foreground | (np.asarray(mask) != 0)
    if not foreground.any():
        raise DataError(f"{source}: every voxel is 0; expected a skull-stripped scan with a non-zero brain.")
    box = tuple((int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(region))
    crop = tuple(slice(a, b) for a, b in box)
    image, foreground = image[crop], foreground[crop]
    values = image[foreground].astype(np.float64)
    mean, std = values.mean(), (values.std(ddof=1) if values.size > 1 else 0.0)
    if not std > 0:
        raise DataError(f"{source}: the foreground has one constant intensity ({mean:g}); "
                        "cannot z-normalise. Check that this is an MR image.")
    normalised = np.where(foreground, (image - mean) / std, BACKGROUND).astype(np.float32)
    mask_t = None if mask is None else torch.from_numpy((np.asarray(mask)[crop] != 0).astype(np.uint8))
    return torch.from_numpy(normalised), mask_t, box


def paste(cropped: torch.Tensor | np.ndarray, box, full_shape, fill=0):
    """Put a cropped volume (e.g. a prediction) back into the full grid it was cut from.

    Returns the same kind (tensor on the same device, or array) and dtype as ``cropped``,
    shaped ``full_shape``, holding ``fill`` outside ``box``.
    """
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
# Loading a dataset

@dataclass
class Scan:
    """One prepared scan: one channel, its lesion mask, and where both came from.

    ``image``: float32 (X, Y, Z), cropped and z-normalised; ``mask``: uint8 {0, 1}, same
    shape; ``box``: the crop, per-axis (start, stop) in the full grid of shape
    ``full_shape``; ``affine``: 4x4 voxel -> RAS mm of the full grid; ``header``: nibabel
    header of the image (None for NRRD); ``paths``: ``{"image": ..., <rater key>: ...}``;
    ``split``: train/val/test from a manifest's split column, else None.
    """
    id: str
    subject: str
    timepoint: int
    image: torch.Tensor
    mask: torch.Tensor
    box: tuple[tuple[int, int], ...]
    full_shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header | None
    paths: dict[str, str]
    split: str | None = None


def load_dataset(path: str | os.PathLike, channel: str, label: str = "mask1") -> list[Scan]:
    """Read every scan of one channel at ``path`` and prepare it, sorted by scan id.

    ``path``: an ISBI 2015 folder (the one holding ``training/``, or ``training/`` itself),
    a MICCAI 2008 folder, or a ``.csv`` manifest. ``channel``: FLAIR, MPRAGE, PDW, T2W (or
    T1 for MICCAI 2008), case-insensitive, or a file tag (``pd``, ``t2``); a manifest also
    accepts its own column names. ``label``: one of ``LABELS`` (default ``mask1``, see
    there); a manifest has a single ``mask`` column, so only ``mask1``.
    """
    path = Path(path).expanduser()
    _, layout, found = _find(path)
    raters, combine = _label_raters(label, layout, path)
    key = _resolve_channel(channel, found, layout, path)
    scans = []
    for sid in sorted(found):
        entry = found[sid]
        image_path = _file(entry, sid, key, "image", layout, path)
        mask_paths = [_file(entry, sid, r, "mask", layout, path) for r in raters]
        image, affine, header = read_image(image_path)
        masks = [_read_mask(p, image_path, image.shape, affine) for p in mask_paths]
        img_t, mask_t, box = prepare(image, reduce(combine, masks), source=str(image_path))
        scans.append(Scan(sid, entry.subject, entry.timepoint, img_t, mask_t, box, image.shape, affine,
                          header, {"image": str(image_path), **{r: str(p) for r, p in zip(raters, mask_paths)}},
                          entry.split))
    return scans


def _label_raters(label: str, layout: _Layout, path: Path):
    if label not in LABELS:
        raise DataError(f"{path}: unknown label {label!r}; choose one of {', '.join(LABELS)}.")
    if label != "mask1" and len(layout.raters) == 1:
        raise DataError(f"{path}: a manifest has one mask column, so label must be 'mask1', not {label!r}.")
    raters = {"mask1": layout.raters[:1], "mask2": layout.raters[1:]}.get(label, layout.raters)
    return raters, (np.maximum if label == "union" else np.minimum)


def _resolve_channel(channel: str, found: dict[str, Found], layout: _Layout, path: Path) -> str:
    present = sorted({k for e in found.values() for k in e.files if k not in layout.raters})
    matches = [k for k in present if _channel_key(k) == _channel_key(channel)]
    if len(matches) != 1:
        raise DataError(f"{path}: no channel {channel!r} in this {layout.name} data; it has "
                        f"{', '.join(present) or 'none'} (case-insensitive; file tags such as pd, t2 also work).")
    return matches[0]


def _file(entry: Found, sid: str, key: str, what: str, layout: _Layout, path: Path) -> Path:
    if key not in entry.files:
        where = layout.expected.format(id=sid, tag=layout.tags.get(key, key), path=path)
        hint = " A scan with a single rater needs label='mask1'." if key in layout.raters[1:] else ""
        near = [p for k, p in entry.files.items() if (k in layout.raters) == (what == "mask")]
        raise DataError(f"scan {sid} is missing its {what} ({key}): expected {where} "
                        f"(near {(near or list(entry.files.values()))[0]}).{hint}")
    file = entry.files[key]
    if layout is _MANIFEST and not file.is_file():
        raise DataError(f"{file}: no such file, listed for scan {sid} in {path}; "
                        "relative paths are resolved against the manifest's folder.")
    return file


# --------------------------------------------------------------------------------------------
# Training patches, sampled on the training device

class PatchSampler:
    """One epoch of random lesion-centred training patches, drawn on the training device.

    ``scans``: prepared ``Scan`` objects; their image and mask tensors are copied to
    ``device`` once, here, and stay there. ``patch_size``: P or (PX, PY, PZ) voxels
    (default 144, the paper's). ``patches_per_scan``: patches per scan and epoch (default
    10, the paper's). Iterating yields ``len(self)`` pairs ``(image, label)``, both float32
    ``(1, 1, PX, PY, PZ)`` on ``device``, in random order.

    Centres are drawn as TorchIO's ``LabelSampler`` with label probabilities {0: 0, 1: 1}
    draws them: a lesion voxel, uniformly, so every patch holds lesion and large lesions
    are drawn more often; the patch is centred on it (at voxel P // 2). Where that patch
    would cross the scan's edge, TorchIO never picks the voxel; we shift the patch inward
    just enough, so lesions near the edge are trained on too. A scan with no lesion voxel
    gets centres drawn uniformly over its cropped volume instead, so it still contributes
    (lesion-free) patches. A scan smaller than the patch along an axis is padded once,
    centred, with ``BACKGROUND`` (label 0).

    Randomness: all draws of an epoch come from ``generator`` at the start of the epoch.
    The generator may live on the CPU or on ``device`` (None: that device's default
    generator). Lesion coordinates are computed once, here; per step there is no disk
    read, no host round trip and no sync, only index arithmetic and ``index_select`` on
    ``device``. Each epoch starts with one sync on CUDA (reading the patch order, or
    copying the draws of a CPU generator).
    """

    def __init__(self, scans: list[Scan], patch_size: int | tuple[int, int, int] = 144,
                 patches_per_scan: int = 10, device: str | torch.device = "cpu",
                 generator: torch.Generator | None = None):
        size = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
        if len(size) != 3 or min(size) < 1 or patches_per_scan < 1 or not scans:
            raise ValueError(f"need scans, patch_size of 3 positive ints and patches_per_scan >= 1; got "
                             f"{len(scans)} scans, {patch_size}, {patches_per_scan}")
        self.patch_size, self.patches_per_scan = size, patches_per_scan
        self.device, self.generator = torch.device(device), generator
        self.ids = [s.id for s in scans]
        self.images, self.masks, self.lesions, self.shapes = [], [], [], []
        for scan in scans:
            pad = [(max(p - n, 0) // 2, max(p - n, 0) - max(p - n, 0) // 2) for p, n in zip(size, scan.image.shape)]
            flat = [w for before_after in reversed(pad) for w in before_after]  # F.pad wants the last axis first
            image = F.pad(scan.image.to(self.device, torch.float32), flat, value=BACKGROUND)
            mask = F.pad(scan.mask.to(self.device, torch.uint8), flat, value=0)
            lesion = mask.nonzero()
            self.images.append(image)
            self.masks.append(mask)
            self.lesions.append(lesion if len(lesion) else None)
            self.shapes.append(torch.tensor(image.shape, device=self.device))
        self._size = torch.tensor(size, device=self.device)
        self._half = self._size // 2
        self._steps = [torch.arange(p, device=self.device) for p in size]

    def __len__(self) -> int:
        return len(self.images) * self.patches_per_scan

    def __iter__(self):
        gdevice = self.generator.device if self.generator is not None else self.device
        n, k = len(self), self.patches_per_scan
        order = torch.randperm(n, generator=self.generator, device=gdevice).tolist()
        u = torch.rand(n, 3, generator=self.generator, device=gdevice).to(self.device)
        starts = torch.cat([self._starts(s, u[s * k:(s + 1) * k]) for s in range(len(self.images))])
        for i in order:
            s = i // k
            image, mask = self.images[s], self.masks[s]
            for axis, (step, start) in enumerate(zip(self._steps, starts[i])):
                index = step + start
                image, mask = image.index_select(axis, index), mask.index_select(axis, index)
            yield image[None, None], mask[None, None].float()

    def _starts(self, s: int, u: torch.Tensor) -> torch.Tensor:
        """Patch corners for uniforms ``u`` (m, 3) in [0, 1): lesion voxel u[:, 0] of scan s,
        or the voxel at fraction u of its volume where it has no lesion."""
        shape, lesion = self.shapes[s], self.lesions[s]
        if lesion is None:
            centre = (u * shape).long()
        else:
            centre = lesion[(u[:, 0] * len(lesion)).long().clamp_(max=len(lesion) - 1)]
        return torch.minimum((centre - self._half).clamp_(min=0), shape - self._size)


# --------------------------------------------------------------------------------------------
# Train / validation / test splits

def split_scans(scans: list[Scan], mode: str = "scan", ratios=(0.8, 0.1, 0.1), seed: int = 0
                ) -> dict[str, list[str]]:
    """Split scan ids into ``{"train": [...], "val": [...], "test": [...]}`` (each sorted).

    ``mode="scan"`` (default, the paper's): scans are shuffled with ``seed`` and cut by
    ``ratios``; 21 ISBI scans give 17 : 2 : 2. Time points of one subject then land on both
    sides, so the test set shares patients' anatomy and lesions with training, and scores
    are optimistic. ``mode="subject"``: subjects are shuffled and cut instead, every time
    point following its subject; 5 ISBI subjects give 3 : 1 : 1 subjects.

    Rounding: val and test get ``floor(n * ratio + 0.5)`` units each (units are scans or
    subjects), at least 1 where their ratio is > 0; train gets the rest and must keep at
    least one. If every scan carries a ``split`` (a manifest's split column), those are
    returned as they are and ``mode``, ``ratios`` and ``seed`` are ignored.
    """
    if any(s.split for s in scans):
        if not all(s.split for s in scans):
            raise ValueError("some scans carry a split and others do not")
        return {name: sorted(s.id for s in scans if s.split == name) for name in _SPLITS}
    if mode not in ("scan", "subject"):
        raise ValueError(f"mode must be 'scan' or 'subject', not {mode!r}")
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"ratios must be three non-negative numbers summing to 1, not {ratios}")
    unit_of = {s.id: (s.id if mode == "scan" else s.subject) for s in scans}
    units = sorted(set(unit_of.values()))
    n = len(units)
    n_val, n_test = (max(int(np.floor(n * r + 0.5)), 1 if r > 0 else 0) for r in ratios[1:])
    if n - n_val - n_test < 1:
        raise DataError(f"{n} {mode}s are too few to split {ratios}; need at least "
                        f"{n_val + n_test + 1}.")
    shuffled = [units[i] for i in np.random.default_rng(seed).permutation(n)]
    side = {u: "train" for u in shuffled[:n - n_val - n_test]}
    side.update({u: "val" for u in shuffled[n - n_val - n_test:n - n_test]})
    side.update({u: "test" for u in shuffled[n - n_test:]})
    return {name: sorted(sid for sid, u in unit_of.items() if side[u] == name) for name in _SPLITS}
