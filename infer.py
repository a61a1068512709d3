"""Every prediction: a prepared scan in, logits out, the one threshold, the mask back in the scan's own grid.

Validation, the test of a training run and the ``predict`` command all go through here, so the three can
never disagree (nnU-Net keeps the same seam between its trainer and its predictor):

    logits = predict_logits(model, image, window=..., tta=...)   # whole scan, or Gaussian-blended tiles
    mask = segment(logits)                                        # sigmoid > 0.5, the only threshold
    write_prediction(path, logits, geometry)                      # the input file's own grid and header

``image`` is what ``data.read_scan`` or ``data.load_dataset`` prepared: float32 (C, X, Y, Z), cropped to
the brain, z-normalised, canonically oriented. ``geometry`` (a ``data.Geometry``) undoes all of that.
"""
from __future__ import annotations

import itertools
import math
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

import bids
import data
import figures
import metrics
from model import build_model, fast_form


class UsageError(Exception):
    """A bad setting, input or output: reported as one line naming the flag or file, exit status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or another stop, ``cause``) during ``predict``'s writing: ``written`` lists the files completely
    written before it (each file is written whole or not at all, see ``atomic``), ``done`` the scans finished
    of ``total``. Its text is the one line to show."""

    def __init__(self, written, done, total, cause=None):
        super().__init__(written, done, total)
        self.written, self.done, self.total, self.cause = list(written), done, total, cause

    def __str__(self):
        if not self.written:
            return f"interrupted after {self.done} of {self.total} scans; nothing was written"
        return (f"interrupted after {self.done} of {self.total} scans; written: {', '.join(map(str, self.written))};"
                " the other scans have no mask")


def amp_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is a real speed-up on ``device``: a CUDA GPU with bf16 support, or a CPU
    with native bf16 instructions (AVX-512 BF16 or AMX), as oneDNN reports them. Asked of torch, not
    guessed from the processor's name; elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, amp: bool):
    """bf16 autocast where ``amp`` is asked for and the device supports it (see ``amp_supported``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and amp_supported(device))


def gaussian_weights(size, device) -> torch.Tensor:
    """nnU-Net's tile weighting: a Gaussian of sigma = side / 8 per axis, so that tile centres dominate."""
    axes = []
    for n in size:
        x = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (n / 8)) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (w / w.max()).clamp_min(1e-3)


def tile_starts(shape, window, overlap=0.5):
    """Tile corners along each axis: tiles of ``window`` voxels (at most the side) overlapping by at least
    ``overlap``, the first at 0 and the last at the far edge."""
    starts = []
    for n in shape:
        w = min(window, n)
        count = math.ceil((n - w) / (w * (1 - overlap))) + 1
        starts.append(sorted({round(i * (n - w) / max(count - 1, 1)) for i in range(count)}))
    return starts


FLIPS = [axes for k in range(4) for axes in itertools.combinations((2, 3, 4), k)]
"""The 8 mirrorings of a (B, C, X, Y, Z) tensor over its three spatial axes, identity first."""


def _forward(model, x, amp, tta, background):
    """Logits of one (1, C, ...) input, float32; with ``tta`` the mean of the logits over the 8 mirrorings
    (nnU-Net v2 also averages logits, before the sigmoid)."""
    device = x.device
    if not tta:
        with autocast(device, amp):
            return model(x, pad_value=background).float()
    total = torch.zeros(x.shape[:1] + (1,) + x.shape[2:], device=device)
    for axes in FLIPS:
        with autocast(device, amp):
            y = model(x.flip(axes) if axes else x, pad_value=background).float()
        total += y.flip(axes) if axes else y
    return total / len(FLIPS)


@torch.inference_mode()
def predict_logits(model, image, window=None, overlap=0.5, amp=True, tta=False, background=0.0) -> torch.Tensor:
    """Logits (X, Y, Z), float32, of one prepared scan ``image`` (C, X, Y, Z) on the model's device.

    ``window`` None, or a scan that fits in it: the scan goes through in one pass (the network pads it to
    its multiple), as the paper predicts whole crops. Otherwise tiles of ``window`` voxels overlapping by
    ``overlap`` (default 0.5) cover it and their logits are blended with Gaussian weights (sigma = window /
    8), as nnU-Net does, so that tile borders leave no seams. ``tta``: mirroring at test time (8 flips).
    ``background``: the scan's value outside the brain, one number or one per channel, with which the
    network pads the scan up to its size multiple.
    Runs under ``torch.inference_mode``: no autograd graph, no saved activations.
    """
    model.eval()
    if window is None or all(n <= window for n in image.shape[1:]):
        return _forward(model, image[None], amp, tta, background)[0, 0]
    shape = image.shape[1:]
    size = [min(window, n) for n in shape]
    weights = gaussian_weights(size, image.device)
    total = torch.zeros(shape, device=image.device)
    norm = torch.zeros(shape, device=image.device)
    for x, y, z in itertools.product(*tile_starts(shape, window, overlap)):
        tile = (slice(x, x + size[0]), slice(y, y + size[1]), slice(z, z + size[2]))
        total[tile] += _forward(model, image[(slice(None),) + tile][None], amp, tta, background)[0, 0] * weights
        norm[tile] += weights
    return total / norm


def segment(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The lesion mask: sigmoid(logits) > ``threshold`` (the paper's 0.5), as a bool tensor.

    Compared on the logits, logit(threshold) = log(t / (1 - t)), which is 0 for 0.5: exact, and no
    sigmoid over the volume. This is the project's only threshold.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return logits > math.log(threshold / (1 - threshold))


# A logit so negative that its sigmoid is 0 in float32: outside the crop box there is no brain.
OUTSIDE_LOGIT = -100.0


def atomic(path, write):
    """Write through a temporary sibling and rename, so that a crash never leaves half a file behind."""
    path = Path(path)
    tmp = temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temporary(path) -> Path:
    """The temporary sibling ``atomic`` writes ``path`` through: ``.tmp-<pid>-<name>``, with the same suffix
    (writers pick the format by it) and this process's id, so that leftovers of a killed process are told
    apart from a live writer's (``remove_leftovers``)."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


TEMPORARY = re.compile(r"\.tmp-([1-9][0-9]*)-(.+)", re.DOTALL)  # ``temporary``'s name: process id, file name


def remove_leftovers(folder) -> list[Path]:
    """Delete the temporaries that a killed process left in ``folder``: regular files (not links) named as
    ``temporary`` names them, ``.tmp-<pid>-<name>``, whose process no longer runs. Nothing else, nor the
    temporaries of a live process (this one's included). Returns the paths removed."""
    removed = []
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else ():
        match = TEMPORARY.fullmatch(path.name)
        if match and path.is_file() and not path.is_symlink() and not _alive(int(match[1])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 asks without sending; another user's process exists too). A
    number no process can have counts as alive: such a file was not written by ``atomic``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a number beyond any process id
        pass
    return True


def inside(path, root) -> Path:
    """``path`` resolved (symlinks and ``..``, as far as it exists), or UsageError when that is not inside the
    folder ``root`` (also resolved): every file the project writes into an output folder is checked with this
    first, so that no name (a scan id, an input's name) nor a link placed there can send a write elsewhere."""
    resolved, top = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if resolved == top or not resolved.is_relative_to(top):
        raise UsageError(f"{path}: resolves to {resolved}, outside the output folder {top}; refusing to write there")
    return resolved


def check_writable(folder) -> None:
    """Create and remove a file in ``folder`` (or in its nearest existing parent, which will hold it), or
    UsageError naming the folder and why. A real write, not ``os.access``: root passes that test on a folder
    it may not write into (a read-only mount, dropped capabilities). The probe is named as ``temporary``
    names files, so that a kill in between leaves nothing ``remove_leftovers`` does not clear."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        existing = existing.parent
    probe = temporary(existing / "write-check")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        where = "" if existing == folder else f" (its nearest existing folder {existing})"
        raise UsageError(f"{folder}: cannot write into it{where}: {(e.strerror or str(e)).lower()}") from None


def to_input_grid(logits: torch.Tensor, geometry) -> torch.Tensor:
    """Logits of the prepared grid (cropped, canonical, resampled) brought back to the input file's own
    voxel grid: uncropped with ``OUTSIDE_LOGIT``, resampled linearly, reoriented back (``data.Geometry``).
    Thresholding after this step, as nnU-Net does, keeps lesion borders smooth across a resampling."""
    return torch.from_numpy(geometry.restore(logits.float().cpu().numpy(), order=1, fill=OUTSIDE_LOGIT))


def write_nifti(path, array: np.ndarray, geometry):
    """Save an array of the input file's grid with that file's affine and header, atomically."""
    image = nib.Nifti1Image(array, geometry.affine, geometry.header)
    image.set_data_dtype(array.dtype)
    atomic(path, lambda tmp: nib.save(image, tmp))


def write_prediction(path, logits, geometry, threshold=0.5, probabilities=None, min_lesion_size=0.0,
                     written=None):
    """Write the mask of ``logits`` (prepared grid) to ``path`` in the input's grid, its lesions smaller than
    ``min_lesion_size`` mm³ dropped, and the sigmoid as float32 to ``probabilities`` if given. Each file
    written is appended to the list ``written``, if given, as soon as it is complete.

    Returns the lesions of the mask as written, ``metrics.lesion_table``'s (labels, rows): measured in the
    input's own grid with its affine, their probabilities from the same sigmoid.
    """
    full = to_input_grid(logits, geometry)
    sigmoid = torch.sigmoid(full).numpy().astype(np.float32)
    labels, rows = metrics.lesion_table(segment(full, threshold).numpy(), geometry.affine, sigmoid,
                                        min_size_mm3=min_lesion_size)
    written = [] if written is None else written
    if probabilities is not None:
        write_nifti(probabilities, sigmoid, geometry)
        written.append(probabilities)
    write_nifti(path, (labels > 0).astype(np.uint8), geometry)
    written.append(path)
    return labels, rows


def write_lesions(outputs, labels, rows, geometry):
    """The lesion table of one scan (CSV, or in a BIDS dataset TSV with its JSON sidecar) and, where asked,
    the labelled lesion mask in the input's grid (in a BIDS dataset with its lookup table)."""
    if outputs.lesions_sidecar is not None:
        bids.write_lesion_tsv(outputs.lesions, rows)
    else:
        bids.write_table(outputs.lesions, rows, list(metrics.LESION_COLUMNS), delimiter=",")
    if outputs.labels is not None:
        write_nifti(outputs.labels, labels, geometry)
    if outputs.labels_lookup is not None:
        bids.write_dseg_lookup(outputs.labels_lookup, rows)


# --------------------------------------------------------------------------------------------
# A trained model, and the predict command

def read_checkpoint(path, device="cpu") -> dict:
    """A checkpoint written by a training run, or UsageError saying in one line what is wrong with the file.

    Loaded with ``torch.load(weights_only=True)``: only tensors, plain containers, numbers and strings are
    rebuilt, so that reading a file never runs code from it (a pickle may name any function to call, and
    ``weights_only`` refuses every one not on torch's allow-list). A regular file only, checked before it is opened (a FIFO would block the read forever)."""
    try:
        data.check_file(path)
    except data.DataError as e:
        raise UsageError(str(e).rstrip(".")) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of a pickle protocol it may not parse: one line only
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except PermissionError:
        raise UsageError(f"{path}: permission denied, cannot read this checkpoint; make it readable "
                         "(chmod u+r)") from None
    except Exception as e:  # anything the file makes torch.load raise
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = (f"it names {named[1]}, which a checkpoint never holds" if named else
               "it holds more than tensors and plain values, or is no torch file"
               if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: truncated, or no torch file")
        raise UsageError(f"{path}: not a checkpoint written by repro.py ({why}); it was not unpickled, only "
                         "read as weights") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict)
            and isinstance(checkpoint.get("model"), dict)):
        raise UsageError(f"{path}: not a checkpoint written by repro.py (no model weights and run configuration in it)")
    return checkpoint


def load_model(path, device):
    """The network of a checkpoint, in eval mode on ``device``, and its run's recorded configuration;
    UsageError (one line) when the file is no checkpoint, its configuration lacks what ``predict`` needs, or
    its weights do not fit the network it describes. The network is first built on the meta device (no
    memory) and its weights' names and shapes compared with the file's, so that a configuration describing
    a huge network allocates nothing."""
    try:
        checkpoint = read_checkpoint(path, device)
    except UsageError as e:
        raise UsageError(f"--checkpoint {e}") from None
    config, weights = checkpoint["config"], checkpoint["model"]
    network, spacing, channels = config.get("network"), config.get("spacing_mm"), config.get("channels")
    bad = [name for name, ok in (
        ("network", isinstance(network, dict)),
        ("channels", isinstance(channels, list) and channels and all(isinstance(c, str) for c in channels)
         and isinstance(network, dict) and network.get("in_channels", 1) == len(channels)),
        ("norm", config.get("norm") in data.NORMS),
        ("spacing_mm", isinstance(spacing, list) and len(spacing) == 3
         and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in spacing)),
        ("weights", all(isinstance(v, torch.Tensor) for v in weights.values()))) if not ok]
    if bad:
        raise UsageError(f"--checkpoint {path}: not a checkpoint written by repro.py (no valid {', '.join(bad)} in it)")
    try:
        with torch.device("meta"):
            skeleton = build_model(**network)
    except Exception as e:  # whatever a file's configuration holds: an unknown model, an option or size it cannot take
        raise UsageError(f"--checkpoint {path}: its configuration describes no network this project builds "
                         f"({network}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    misfit = _misfit({k: tuple(v.shape) for k, v in skeleton.state_dict().items()},
                     {k: tuple(v.shape) for k, v in weights.items()})
    if misfit:
        raise UsageError(f"--checkpoint {path}: its weights do not fit the network its configuration describes "
                         f"({network}): {misfit}")
    model = build_model(**network).to(device)
    model.load_state_dict(weights)
    return fast_form(model).eval(), config


def _misfit(expected: dict, found: dict) -> str | None:
    """How weights of names and shapes ``found`` differ from a network's ``expected`` ones, or None."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    other = [f"{k} {found[k]} for {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    parts = [f"{len(keys)} {what} (first {keys[0]})" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", other)) if keys]
    return "; ".join(parts) or None


def is_scan(path: Path) -> bool:
    return path.name.lower().endswith(data.IMAGE_SUFFIXES) and not path.name.startswith(".")


def scan_stem(path: Path) -> str:
    name = path.name
    return next(name[: -len(s)] for s in sorted(data.IMAGE_SUFFIXES, key=len, reverse=True) if name.lower().endswith(s))


def list_cases(inputs, channels) -> list[list[Path]]:
    """The scans to predict, each a list of one file per channel of the model.

    One channel: files, or one folder of NIfTI/NRRD files. Several channels: the channels of one scan as
    that many files in the model's order. Any model: a CSV manifest with one column per channel name.
    """
    paths = [Path(p) for p in inputs]
    for path in paths:
        if path.is_symlink() and not path.exists():
            raise UsageError(f"--input {path}: a dangling symlink")
        if not path.exists():
            raise UsageError(f"--input {path}: no such file or folder")
        if not os.access(path, os.R_OK):
            raise UsageError(f"--input {path}: permission denied")
    if len(paths) == 1 and paths[0].suffix.lower() == ".csv":
        cases = read_case_manifest(paths[0], channels)
    elif len(channels) > 1:
        if len(paths) == len(channels) and all(p.is_file() for p in paths):
            cases = [paths]
        else:
            raise UsageError(f"--input: the model takes {len(channels)} channels ({', '.join(channels)}): give one "
                             f"file per channel in that order, or a CSV manifest with those columns; got "
                             f"{len(paths)} input(s)")
    elif len(paths) == 1 and paths[0].is_dir():
        cases = [[p] for p in sorted(paths[0].iterdir()) if is_scan(p)]
        if not cases:
            raise UsageError(f"--input {paths[0]}: the folder holds no NIfTI or NRRD scan")
    else:
        for path in paths:
            if path.is_dir():
                raise UsageError(f"--input {path}: a folder must be the only --input")
            if not is_scan(path):
                raise UsageError(f"--input {path}: expected a NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr) file")
        cases = [[p] for p in paths]
    seen = {}
    for case in cases:
        for path in case:
            key = os.path.realpath(path)
            if key in seen:
                raise UsageError(f"--input {path}: listed twice (also as {seen[key]})")
            seen[key] = path
    return cases


def read_case_manifest(path: Path, channels) -> list[list[Path]]:
    """The scans of a CSV with one column per channel of the model (other columns ignored), relative paths
    resolved against the CSV's folder."""
    try:
        rows = data.read_csv(path)
    except data.DataError as e:
        raise UsageError(f"--input {e}".rstrip(".")) from None
    header = rows[0][1] if rows else []
    missing = [c for c in channels if c not in header]
    if missing:
        raise UsageError(f"--input {path}: needs one column per channel of the model ({', '.join(channels)}); "
                         f"missing {', '.join(missing)}")
    if not rows[1:]:
        raise UsageError(f"--input {path}: the manifest lists no scan (a header and no rows)")
    cases = []
    for line, row in rows[1:]:
        case = []
        for c in channels:
            cell = row[header.index(c)] if header.index(c) < len(row) else ""
            if not cell:
                raise UsageError(f"--input {path}, line {line}: no file in column {c}")
            file = path.parent / Path(cell).expanduser()
            try:
                data.check_file(file)
            except data.DataError as e:
                raise UsageError(f"--input {path}, line {line}: {e}".rstrip(".")) from None
            case.append(file)
        cases.append(case)
    return cases


class Outputs(NamedTuple):
    """Where one scan's results go; None: not asked for. ``lesions_sidecar`` and ``labels_lookup`` exist in a
    BIDS derivatives dataset only (``bids.output_paths``), where the table is TSV."""
    mask: Path
    probabilities: Path | None
    lesions: Path
    lesions_sidecar: Path | None
    labels: Path | None
    labels_lookup: Path | None
    qc: Path | None

    def asked(self, probabilities, labels, qc) -> "Outputs":
        """These outputs with those not asked for (probabilities, labelled mask, QC picture) set to None."""
        return self._replace(probabilities=self.probabilities if probabilities else None,
                             labels=self.labels if labels else None,
                             labels_lookup=self.labels_lookup if labels else None, qc=self.qc if qc else None)


def named_outputs(folder, base, mask=None) -> Outputs:
    """The outputs of a scan outside BIDS, in ``folder``: ``<base>_prob.nii.gz``, ``<base>_lesions.csv``,
    ``<base>_lesions.nii.gz`` (the labelled mask), ``<base>_qc.png``, and the mask ``<base>_mask.nii.gz`` unless
    ``mask`` names it."""
    folder = Path(folder)
    return Outputs(mask or folder / f"{base}_mask.nii.gz", folder / f"{base}_prob.nii.gz",
                   folder / f"{base}_lesions.csv", None, folder / f"{base}_lesions.nii.gz", None, folder / f"{base}_qc.png")


def plan_outputs(cases, output, overwrite, save_probabilities, lesion_map=False, qc=False):
    """Where each case's outputs go (``Outputs``) and the summary table (None for one scan); refuses anything
    that would lose data.

    One scan: ``output`` is its mask, the other files named after it (``named_outputs`` with the mask's name
    as base: mask.nii.gz, mask_lesions.csv, ...). Several: ``output`` is a folder, each scan's files named
    after its input (scan_mask.nii.gz, scan_lesions.csv, ...) and ``summary.csv`` beside them.
    """
    output = Path(output)
    if len(cases) == 1 and output.is_dir():
        raise UsageError(f"--output {output}: is a folder; one scan takes a file name ending in .nii.gz")
    if len(cases) == 1:
        if not output.name.endswith((".nii", ".nii.gz")):
            raise UsageError(f"--output {output}: expected a NIfTI file name ending in .nii or .nii.gz (or an "
                             "existing folder)")
        stem = output.name[: -len(".nii.gz")] if output.name.endswith(".nii.gz") else output.name[: -len(".nii")]
        plan, summary = [named_outputs(output.parent, stem, mask=output)], None
    else:
        if output.exists() and not output.is_dir():
            raise UsageError(f"--output {output}: {len(cases)} scans need a folder, and this is a file")
        if output.name.endswith((".nii", ".nii.gz")):
            raise UsageError(f"--output {output}: {len(cases)} scans need a folder, not a NIfTI file name")
        plan, summary = [named_outputs(output, scan_stem(c[0])) for c in cases], output / "summary.csv"
    plan = [outputs.asked(save_probabilities, lesion_map, qc) for outputs in plan]
    targets = [t for outputs in plan for t in outputs if t is not None]
    check_outputs(output, targets + [summary] if summary else targets, cases, overwrite)
    return plan, summary


def check_outputs(output, targets, cases, overwrite):
    """Refuse, before anything is written, ``targets`` (the files ``--output`` names) that would lose data:
    one of the input files of ``cases``, an existing file without ``overwrite``, a folder, or one file twice;
    and an ``output`` below a file."""
    parent = Path(output).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--output {output}: {parent} is a file, not a folder")
    inputs = {os.path.realpath(p) for case in cases for p in case}
    if len({os.path.realpath(t) for t in targets}) < len(targets):
        raise UsageError(f"--output {output}: two inputs would write the same mask (their names agree)")
    for target in targets:
        if os.path.realpath(target) in inputs or any(target.exists() and os.path.samefile(target, p)
                                                     for case in cases for p in case):
            raise UsageError(f"--output {target}: is one of the inputs; it would be overwritten")
        if target.exists() and not overwrite:
            raise UsageError(f"--output {target}: exists; pass --overwrite to replace it")
        if target.is_dir():
            raise UsageError(f"--output {target}: is a folder")
    root = Path(output)
    root = root.parent if root.name.endswith((".nii", ".nii.gz")) else root  # one scan's mask, else a folder
    try:
        for target in targets:
            inside(target, root)
        check_writable(root)
    except UsageError as e:
        raise UsageError(f"--output {e}") from None


def predict(model, config, inputs, output, threshold=0.5, window=None, tta=False, save_probabilities=False,
            resample=True, overwrite=False, amp=True, device="cpu", min_lesion_size=0.0, lesion_map=False, qc=False,
            participants=None, checkpoint=None) -> int:
    """The ``predict`` command: segment scans with a model of ``load_model``, loaded once; returns the exit
    status (1 if a scan failed during prediction; the others are written).

    Per scan: the mask, its lesion table, and as asked the probabilities, the labelled lesion mask
    (``lesion_map``) and the QC picture (``qc``); lesions under ``min_lesion_size`` mm³ dropped from all of
    them. ``inputs`` one BIDS dataset: its cases (``bids.find_cases``, of the subjects ``participants`` if
    given) written as a derivatives dataset at ``output`` (``bids.plan_outputs``; ``checkpoint``, the file,
    names it). Every input and output is checked before the model runs.
    """
    if not 0 < threshold < 1:
        raise UsageError(f"--threshold must be in (0, 1), got {threshold}")
    if not (math.isfinite(min_lesion_size) and min_lesion_size >= 0):
        raise UsageError(f"--min-lesion-size must be a volume in mm³, 0 or more, got {min_lesion_size:g}")
    channels = config["channels"]
    dataset = Path(inputs[0]) if len(inputs) == 1 and bids.is_dataset(inputs[0]) else None
    if dataset is None:
        if participants:
            raise UsageError("--participant-label applies to a BIDS dataset as --input (a folder with "
                             "dataset_description.json)")
        cases = list_cases(inputs, channels)
        names = [case[0].name for case in cases]
        plan, summary = plan_outputs(cases, output, overwrite, save_probabilities, lesion_map, qc)
    else:
        found, skipped = bids.find_cases(dataset, channels, participants)
        for reason in skipped:
            print(f"skipped {reason}", file=sys.stderr)
        cases, names = [list(case.files) for case in found], [case.source for case in found]
        sha256 = bids.file_sha256(checkpoint)
        plan, summary, earlier = bids.plan_outputs(found, dataset, output, sha256, overwrite, save_probabilities,
                                                   lesion_map, qc)
    spacing = config["spacing_mm"] if resample else None
    for case in cases:  # every input read and checked before the model runs
        try:
            data.read_scan(case, norm=config["norm"], spacing=spacing)
        except data.DataError as e:
            raise UsageError(f"--input {e}") from None
    if dataset is not None:
        bids.write_dataset_description(output, sha256, dataset, overwrite)
    failed, rows, written, done = [], [], [], 0
    settings = {"threshold": threshold, "min_lesion_size_mm3": min_lesion_size,
                "connectivity": metrics.LESION_CONNECTIVITY}
    for folder in {path.parent for outputs in plan for path in outputs if path is not None}:
        remove_leftovers(folder)  # of a predict killed while writing there
    bar = tqdm(list(zip(cases, names, plan)), desc="scans", disable=len(cases) == 1 or not os.isatty(2))
    try:
        for case, name, outputs in bar:
            try:
                image, geometry, background = data.read_scan(case, norm=config["norm"], spacing=spacing)
                logits = predict_logits(model, image.to(device), window, amp=amp, tta=tta, background=background)
                for path in outputs:
                    if path is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                labels, lesions = write_prediction(outputs.mask, logits, geometry, threshold,
                                                   outputs.probabilities, min_lesion_size, written)
                write_lesions(outputs, labels, lesions, geometry)
                if outputs.qc is not None:  # the first channel, as stored
                    figures.qc(outputs.qc, data.read_image(case[0])[0], labels > 0, geometry.affine, name)
                written.extend(path for path in outputs[2:] if path is not None)
                rows.append({"scan": name, **metrics.lesion_summary(labels, geometry.affine), **settings})
                print(f"{outputs.mask}: {rows[-1]['lesion_count']} lesions, {rows[-1]['lesion_volume_ml']:.3g} mL")
            except Exception as e:  # one bad scan must not cost the others
                failed.append(case[0])
                print(f"error: {case[0]}: prediction failed ({type(e).__name__}: {str(e).splitlines()[0]})",
                      file=sys.stderr)
            done += 1
    except KeyboardInterrupt as stop:
        raise Interrupted(written, done, len(cases), stop) from None
    if summary is not None and rows:
        if dataset is None:
            bids.write_table(summary, rows, list(metrics.SUMMARY_COLUMNS), delimiter=",")
        else:
            bids.write_summary(summary, rows, earlier)
        print(f"{summary}: {len(rows)} scan{'s' * (len(rows) != 1)}")
    if failed:
        print(f"error: {len(failed)} of {len(cases)} scans failed: {', '.join(map(str, failed))}",
              file=sys.stderr)
        return 1
    return 0
