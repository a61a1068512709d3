"""The paper's training protocol, declared once, and one training run of it, told top to bottom.

    protocol = replace(PAPER, model="unet", channels=("T2W",))
    results = train(protocol, "runs/unet-T2W-seed0")

``Protocol`` holds every setting with its paper value and source (Choi et al. 2021, §4.2 and Table 1), or
says that the paper leaves it open and what we chose. ``QUICK`` is the CPU preset built from it. ``train``
reads the scans, splits them, then per epoch trains on lesion-centred patches (``train_one_epoch``) and
scores the validation scans (``validate``), checkpoints, and stops early; the best checkpoint is then tested
(``test``) and the run reported (``report.md``). Inference of every kind lives in ``infer.py``.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import json
import math
import os
import platform
import re
import stat
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import reduce
from pathlib import Path
from typing import NamedTuple

import nibabel
import numpy as np
import scipy
import torch
import torch.distributed as dist
from nibabel.affines import voxel_sizes
from tqdm import tqdm

import augment
import data
import figures
import infer
import metrics
import phantom
from infer import UsageError
from model import MODELS, build_model, fast_form, training_step


class Diverged(Exception):
    """A non-finite loss: the run stops; its saved epochs stay (without one, what it wrote is removed)."""


def _same(default):
    """A setting that a resumed run must share with the interrupted one (it shapes what was learned)."""
    return field(default=default, metadata={"same_on_resume": True})


@dataclass(frozen=True)
class Protocol:
    """One cell of Table 2 and how it is trained; the defaults are the paper's protocol."""
    model: str = _same("residual")         # §3: "residual" (Fig. 2) or "unet" (Çiçek et al. 2016, the baseline)
    channels: tuple = _same(("FLAIR",))    # §4.1: one MRI channel per cell; several at once is §5's future work
    data: str | None = _same(None)         # ISBI 2015 / MICCAI 2008 folder or CSV manifest; None: built-in data
    label: str = _same("mask1")            # open ("one ground truth"): we train on rater 1's masks
    split: str = _same("scan")             # §4.1: 17:2:2 by scan; "subject" keeps each patient on one side (ours)
    seed: int = _same(0)                   # open: one seed draws the split, the weights, patches and augmentation
    spacing: float | None = _same(None)    # mm; open. None: the data's own (built-in: generated at 1 mm, ISBI's)
    norm: str = _same("brain")             # open: z-score over brain voxels ("brain") or the whole crop ("crop")
    patch_size: int = _same(144)           # §4.2: 144³ training patches
    patches_per_scan: int = _same(10)      # §4.2: 10 lesion-centred patches per training scan and epoch
    augment: bool = _same(True)            # §3.5: TorchIO's six transforms, each with p = 0.5 (p is open)
    mixup: float | None = _same(None)      # §5's future work: mix-up's Beta(α, α); None is off, the paper's
    base_filters: int | None = _same(None)  # Fig. 2: 16 for the residual net; 32 for Çiçek's; None: the model's
    dropout: float = _same(0.3)            # open: Isensee et al. 2017's 0.3 (pykao's port ships 0.6)
    shared_context: bool = _same(False)    # pykao's port applies one context convolution twice; off: Isensee's
    unet_norm: str = _same("batch")        # Çiçek et al. 2016: batch norm; "instance"/"group" for the ablation
    lr: float = _same(1e-4)                # Table 1: Adam with learning rate 1e-4
    weight_decay: float = _same(1e-10)     # Table 1: weight decay 1e-10
    amp: bool = _same(True)                # not the paper's (fp32): bf16 autocast where the device has bf16
    compile: bool = _same(False)           # torch.compile the training step: off, it barely pays on CPUs (docs)
    epochs: int = 100                      # Table 1: at most 100 epochs
    patience: int = 5                      # Table 1: stop after 5 epochs without a lower validation loss
    window: int | None = None              # inference tile side in voxels; None: whole scans, as the paper
    tta: bool = False                      # test-time mirroring (nnU-Net's 8 flips); off: the paper's
    device: str | None = None              # None: cuda when present, else cpu; a resumed run may move


PAPER = Protocol()
# The CPU preset: 2 mm data and small patches, so that the whole of Table 2 trains in an hour on two cores.
# lr 1e-3: with 12 epochs of 2 patches per scan, 1e-4 does not converge; both networks get the same settings.
QUICK = replace(PAPER, spacing=2.0, patch_size=48, patches_per_scan=2, epochs=12, patience=4, lr=1e-3)

# What this process is writing, for the entry point's messages when it stops: "out", the run folder (from its
# config.json until the run ends), and repro.py's "table" (a --table2 root) and "predict" (an output folder).
ACTIVE = {}
SAME_ON_RESUME = tuple(f.name for f in fields(Protocol) if f.metadata.get("same_on_resume"))
MODEL_NAMES = {"residual": "Residual 3D U-Net", "unet": "3D U-Net"}

# Everything a run writes into its folder: cleanup, --overwrite and the tests use this one list.
OUTPUTS = ("config.json", "history.csv", "train.log", "metrics.json", "report.md", "best.pt", "last.pt",
           "fig6.png", "fig7.png", "predictions")
# config.json opens with these keys: they mark a folder as a run folder of repro.py (config.json is the first
# file a run writes), and only such a folder is ever cleared. The version changes with the folder's layout.
RUN_SCHEMA = {"schema": "resunet3d-ms run", "version": 1}
LOCK = ".repro.lock"  # the lock file of a folder being written (lock_folder), one of the project's own files
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; torchrun adds an offset per process
LR_MAX = 1.0  # Adam moves each weight by about the learning rate a step: past 1, more than the weights


# --------------------------------------------------------------------------------------------
# One run, top to bottom

def train(protocol: Protocol, out, resume: bool = False, overwrite: bool = False, loaded=None) -> dict | None:
    """Train and test one cell of Table 2 into the folder ``out``; returns its metrics (None on ranks > 0).
    ``loaded``: ``load_scans``'s result for this protocol, when the caller has read the scans already."""
    group = Group.current()
    device = check_protocol(protocol, group)
    if protocol.data:
        protocol = replace(protocol, data=data_path(protocol.data))
    out = Path(out)
    check_out(out, resume, overwrite, group)
    scans, dataset, fingerprint = loaded or load_scans(protocol)
    split_ids, (train_scans, val_scans, test_scans) = split_and_check(protocol, scans, group)
    config = run_config(protocol, scans, dataset, fingerprint, split_ids, device, group)
    with open_run(out, protocol, config, resume, overwrite, group) as log:
        run = Run(out, protocol, config, device, group, log)

        torch.manual_seed(protocol.seed)  # the initial weights and dropout
        model = build_model(**config["network"]).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=protocol.lr, weight_decay=protocol.weight_decay)  # Table 1
        generators = group.generators(protocol.seed)  # drawn on the host
        sampler = data.PatchSampler(train_scans, protocol.patch_size, protocol.patches_per_scan, device,
                                    generators.patches, group.rank, group.world)
        augmentations = make_augmentations(protocol, train_scans)
        stopper, history = EarlyStopping(protocol.patience), []
        if resume:
            stopper, history = load_checkpoint(out / "last.pt", model, device, optimizer, generators, group)
            log(f"Resuming {out} after epoch {stopper.epoch}.")
        log(describe_run(protocol, dataset, split_ids, device, sampler, group))
        # channels-last 3-D (compiled if asked), then DistributedDataParallel under torchrun; the same
        # parameters as ``model``, which validation, the test and the checkpoints use
        net = group.wrap(fast_form(model, compile=protocol.compile), device)

        for epoch in range(stopper.epoch, protocol.epochs):
            if stopper.stop:
                break
            start = time.perf_counter()
            train_loss = train_one_epoch(run, net, optimizer, sampler, augmentations, generators.augmentation)
            val_loss, val_dsc = group.from_lead(validate, model, val_scans, protocol, device)  # all follow rank 0
            improved = stopper.record(val_loss)
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_dsc": val_dsc,
                            "seconds": round(time.perf_counter() - start, 2)})
            save_epoch(run, model, improved, optimizer, generators, stopper, history)
            log.epoch(history[-1], stopper, protocol.epochs)
        if not group.lead:
            return None
        load_checkpoint(out / "best.pt", model, device)
        return test_and_report(run, model, test_scans, stopper, history)


@dataclass(frozen=True)
class Run:
    """What every step of one run shares once ``train`` has set it up: the run's folder, its protocol, its
    recorded configuration (config.json), this process's device and place in the group, and the log."""
    out: Path
    protocol: Protocol
    config: dict
    device: torch.device
    group: Group
    log: Log


# --------------------------------------------------------------------------------------------
# The epoch: training and validation

def train_one_epoch(run, net, optimizer, sampler, augmentations, generator) -> float:
    """One pass over the epoch's patches, one Adam step per patch (the paper's batch size of 1; under
    torchrun one patch per process and step, gradients averaged). Returns the mean loss of the epoch."""
    net.train()
    loss_fn = metrics.BCEDiceLoss()
    total = torch.zeros((), device=run.device)
    patches = augmented(sampler, augmentations, generator)
    if run.protocol.mixup is not None:
        patches = mix_up(patches, augmented(sampler, augmentations, generator), run.protocol.mixup, generator)
    with run.group.join(net):  # shares of an epoch may differ by one patch between processes
        for i, (image, label) in enumerate(progress(patches, "patches", len(sampler)), 1):
            total += training_step(net, optimizer, loss_fn, image, label, infer.autocast(run.device, run.protocol.amp))
            run.log.pace(i, len(sampler), run.device, run.protocol)
            if i % 10 == 0 or i == len(sampler):  # a host sync only every 10 steps
                if not math.isfinite(mean := total.item() / i):
                    raise Diverged(f"the training loss became {mean} within the last 10 steps")
    return run.group.mean(total, len(sampler))


def augmented(sampler, augmentations, generator):
    """The epoch's patches, each through its scan's augmentation pipeline (when augmenting)."""
    for image, label, s in sampler:
        if augmentations is not None:
            image, label = augmentations[s](image, label, generator=generator)
        yield image, label


def mix_up(first, second, alpha, generator):
    """Mix-up (Zhang et al. 2018), the paper's future work (§5): each patch of ``first`` is mixed with the
    patch of ``second``, another pass over the same sampler (so a second lesion-centred, augmented patch of
    a random training scan: one more patch per step). Image and mask get the same λ ~ Beta(α, α), taken as
    max(λ, 1 - λ) so that the first patch dominates and α -> 0 gives it back unmixed; the mask becomes soft,
    which BCE-Dice takes. λ comes from a numpy generator seeded from the run's generator: same seed, same run."""
    rng = np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))
    for (x1, y1), (x2, y2) in zip(first, second):
        lam = float(rng.beta(alpha, alpha))
        lam = max(lam, 1 - lam)
        yield lam * x1 + (1 - lam) * x2, lam * y1 + (1 - lam) * y2


def make_augmentations(protocol, scans):
    """Per training scan, the paper's six transforms (augment.paper_augmentation) at that scan's voxel size
    in mm, padding with its own background; scans that agree share one pipeline."""
    if not protocol.augment:
        return None
    pipelines = {}
    for s in scans:
        key = (tuple(s.spacing), tuple(s.background))
        pipelines.setdefault(key, augment.paper_augmentation(spacing=key[0], background=list(key[1])))
    return [pipelines[(tuple(s.spacing), tuple(s.background))] for s in scans]


def validate(model, scans, protocol, device) -> tuple[float, float]:
    """Mean BCE-Dice loss and mean DSC over the validation scans, predicted as the test predicts them."""
    loss_fn = metrics.BCEDiceLoss()
    losses, dscs = [], []
    for scan in scans:
        truth = scan.mask.to(device)
        logits = infer.predict_logits(model, scan.image.to(device), protocol.window, amp=protocol.amp,
                                      background=scan.background)
        losses.append(loss_fn(logits, truth))
        dscs.append(metrics.dice(infer.segment(logits), truth))
    loss = torch.stack(losses).mean().item()
    if not math.isfinite(loss):
        raise Diverged(f"the validation loss is {loss}")
    return loss, torch.stack(dscs).mean().item()


@dataclass
class EarlyStopping:
    """Table 1's early stopping: stop once the validation loss has not improved for ``patience`` epochs."""
    patience: int
    epoch: int = 0                 # epochs recorded so far
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def record(self, val_loss: float) -> bool:
        """Record one epoch's validation loss; True when it is the best so far."""
        self.epoch += 1
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, self.epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad_epochs >= self.patience


# --------------------------------------------------------------------------------------------
# Checkpoints: the model alone (best.pt) or everything a resume needs (last.pt)

def save_epoch(run, model, improved, optimizer, generators, stopper, history):
    """After each epoch: best.pt when the validation loss improved, last.pt and history.csv always.
    Every process takes part (last.pt holds each one's random state); only rank 0 writes."""
    states = run.group.gather(random_state(generators))
    if not run.group.lead:
        return
    if improved:
        save_checkpoint(run.out / "best.pt", model, run.config)
    save_checkpoint(run.out / "last.pt", model, run.config, optimizer, states, stopper, history)
    write_csv(run.out / "history.csv", history)


def save_checkpoint(path, model, config, optimizer=None, states=None, stopper=None, history=None):
    """best.pt holds the weights and the run's configuration (what ``predict`` needs); last.pt adds the
    optimizer, the early-stopping state, the history and the random states (rank 0's as ``rng``, every
    process's under torchrun as ``ranks``), so that a resumed run is exact."""
    checkpoint = {"model": model.state_dict(), "config": config}
    if optimizer is not None:
        checkpoint.update(optimizer=optimizer.state_dict(), stopper=asdict(stopper), history=history,
                          rng=states[0], **({"ranks": states} if len(states) > 1 else {}))
    atomic_save(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path, model, device, optimizer=None, generators=None, group=None):
    """Load ``save_checkpoint``'s file into ``model`` (and the rest, for last.pt); returns
    (EarlyStopping, history) for last.pt."""
    checkpoint = infer.read_checkpoint(path, device)
    model.load_state_dict(checkpoint["model"])
    if optimizer is None:
        return None
    optimizer.load_state_dict(checkpoint["optimizer"])
    state = checkpoint["ranks"][group.rank] if group.world > 1 else checkpoint["rng"]
    torch.set_rng_state(state["torch"])
    generators.augmentation.set_state(state["generator"])
    generators.patches.set_state(state.get("patch_generator", state["generator"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return EarlyStopping(**checkpoint["stopper"]), checkpoint["history"]


def random_state(generators) -> dict:
    patches, augmentation = generators
    return {"torch": torch.get_rng_state(), "generator": augmentation.get_state(),
            **({"patch_generator": patches.get_state()} if patches is not augmentation else {}),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


class Generators(NamedTuple):
    """The run's random generators, on the host: ``patches`` draws the training patches, ``augmentation``
    the augmentation and mix-up. One generator serves both in a plain run."""
    patches: torch.Generator
    augmentation: torch.Generator


# --------------------------------------------------------------------------------------------
# More than one process: torch.distributed, started by torchrun

@dataclass(frozen=True)
class Group:
    """This process among torchrun's (rank 0 of 1 in a plain run). Rank 0 validates, decides early
    stopping and writes every file; the others train their share of each epoch and follow it."""
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Group":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def generators(self, seed) -> Generators:
        """One generator in a plain run. Under torchrun the patch draws come from a generator every process
        holds alike, so that their shares of an epoch never overlap, and augmentation from one of each
        process's own."""
        patches = torch.Generator().manual_seed(seed)
        if self.world == 1:
            return Generators(patches, patches)
        return Generators(patches, torch.Generator().manual_seed(seed + 1_000_003 * (self.rank + 1)))

    def wrap(self, model, device):
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def join(self, net):
        return net.join() if self.world > 1 else contextlib.nullcontext()

    def from_lead(self, fn, *args):
        """``fn(*args)`` computed on rank 0 and handed to every process."""
        box = [fn(*args) if self.lead else None]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        objects = [None] * self.world
        dist.all_gather_object(objects, obj)
        return objects

    def mean(self, total: torch.Tensor, count: int) -> float:
        """The mean over every process of a sum of ``count`` values."""
        if self.world == 1:
            return total.item() / count
        device = total.device if dist.get_backend() == "nccl" else "cpu"
        both = torch.tensor([total.item(), float(count)], device=device)
        dist.all_reduce(both)
        return (both[0] / both[1]).item()


def start_group(device_name):
    """Under torchrun (WORLD_SIZE > 1): join the process group, gloo on the CPU, NCCL with one GPU per
    process. A plain run has no process group. Returns the Group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Group()
    cuda = resolve_device(device_name).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return Group.current()


def network(protocol, in_channels) -> dict:
    """The keyword arguments of ``build_model`` for the protocol's network: its own options only. Stored in
    every checkpoint, so that ``infer.load_model`` rebuilds the same network."""
    options = ({"dropout": protocol.dropout, "shared_context": protocol.shared_context}
               if protocol.model == "residual" else {"norm": protocol.unet_norm})
    return {"name": protocol.model, "in_channels": in_channels, "base_filters": protocol.base_filters,
            **options}


# --------------------------------------------------------------------------------------------
# Test and report

def test_and_report(run, model, test_scans, stopper, history) -> dict:
    """The best checkpoint on the test scans: metrics.json, the figures and report.md; returns the metrics."""
    results, masks = test(run, model, test_scans)
    config = run.config
    results.update(dataset=config["dataset"], model=run.protocol.model, channels=config["channels"],
                   split_ids=config["split_ids"], best_epoch=stopper.best_epoch, epochs_run=stopper.epoch,
                   early_stopped=stopper.stop)
    write_json(run.out / "metrics.json", results)
    report(run, history, results, test_scans, masks)
    run.log.test(results, stopper, run.out)
    return results


def test(run, model, scans) -> tuple[dict, dict]:
    """The best checkpoint on the test scans, scored in each scan's own grid (``GRID``): each mask is written
    back to the scan's grid (predictions/<id>_pred.nii.gz, ``infer.write_prediction``) and that file is
    scored against the scan's original mask files, with the grid's voxel sizes and voxel volume, so that the
    numbers are those a user gets from the files whatever grid the network ran on. Returns the metrics and
    the masks in the prepared grid, for Fig. 7."""
    protocol, device, out = run.protocol, run.device, run.out
    originals = original_mask_files(protocol, [scan.id for scan in scans])
    per_scan, masks = {}, {}
    (out / "predictions").mkdir(exist_ok=True)
    for scan in progress(scans, "test"):
        logits = infer.predict_logits(model, scan.image.to(device), protocol.window, amp=protocol.amp,
                                      tta=protocol.tta, background=scan.background)
        written = out / "predictions" / f"{scan.id}_pred.nii.gz"
        infer.write_prediction(written, logits, scan.geometry)
        per_scan[scan.id] = score_written(written, *originals[scan.id], device)
        masks[scan.id] = infer.segment(logits).cpu()
    return {"grid": GRID, "scans": per_scan, "mean": metrics.summarise(per_scan)}, masks


GRID = "native"
"""Where the test metrics are measured (metrics.json's ``grid``): each scan's own voxel grid, the one its files
are in, as the ISBI 2015 challenge scores and the paper measured its 1 mm scans. Validation, which only
picks the best epoch, stays in the prepared grid."""


def original_mask_files(protocol, ids) -> dict:
    """Per scan id, what its test scores are measured against (``data.mask_files``: the label's original
    files, the rule combining them, both raters' files); load_dataset has already checked that each is a
    binary mask on its image's grid."""
    files = data.mask_files(find_data(protocol)[0], protocol.label)
    return {sid: files[sid] for sid in ids}


def score_written(prediction, label_files, combine, rater_files, device) -> dict:
    """``metrics.scan_scores`` of a written mask file against the original mask files of its scan, read with
    ``data.read_image`` in their own grid (the label's combined by ``combine``), with that grid's affine;
    adds ``spacing_mm``, the grid's voxel sizes."""
    def read(file):
        array, affine, _ = data.read_image(file)
        return array != 0, affine

    def on_device(mask):
        return torch.from_numpy(mask).to(device)
    label = [read(file) for file in label_files]
    truth, affine = reduce(combine, [mask for mask, _ in label]), label[0][1]
    raters = None if rater_files is None else [on_device(read(file)[0]) for file in rater_files]
    scores = metrics.scan_scores(on_device(read(prediction)[0]), on_device(truth), affine, raters)
    return {**scores, "spacing_mm": voxel_sizes(affine).tolist()}


def report(run, history, results, test_scans, masks):
    """Fig. 6, Fig. 7 and report.md: the one file a user opens to see what happened."""
    out, protocol, config = run.out, run.protocol, run.config
    title = f"{MODEL_NAMES[protocol.model]}, {'+'.join(protocol.channels)}"
    figures.history(out / "fig6.png", history, title)
    figures.slices(out / "fig7.png", test_scans, {MODEL_NAMES[protocol.model]: masks}, "+".join(protocol.channels))
    settings = {k: v for k, v in asdict(protocol).items() if k not in ("device",)}
    keys = metrics.REPORTED
    lines = [f"# {title}", "", f"Dataset: {config['dataset']}.", f"Device: {config['device_name']}; "
             f"precision {config['precision']}.", "", "## Settings", "",
             "| setting | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in settings.items()], "",
             f"## Test ({len(results['scans'])} scans; best epoch {results['best_epoch']} of "
             f"{results['epochs_run']})", "", "| scan | " + " | ".join(keys) + " |",
             "|" + " --- |" * (len(keys) + 1)]
    cell = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines += [f"| {sid} | " + " | ".join(cell(s[k]) for k in keys) + " |" for sid, s in results["scans"].items()]
    lines += ["| **mean** | " + " | ".join(cell(results["mean"][k]) for k in keys) + " |", "",
              f"Scored in each scan's own grid ({results['grid']}): the written mask "
              f"(predictions/<scan>_pred.nii.gz) against the scan's original mask files (--label {protocol.label}). "
              "The validation DSC of Fig. 6 is measured in the prepared grid.", "", *lesion_lines(results), "",
              "## Figures", "", "Fig. 6, loss and validation DSC per epoch: ![fig6](fig6.png)", "",
              "Fig. 7, the test scans' most lesioned slice: ![fig7](fig7.png)", ""]
    atomic_save(out / "report.md", lambda tmp: tmp.write_text("\n".join(lines)))


def lesion_lines(results) -> list[str]:
    """report.md's lesion table: per test scan, the true and the predicted lesion count and volume side by
    side, so that a reader sees volume agreement (the ISBI 2015 score's correlation term)."""
    lines = ["## Lesions per test scan", "",
             f"A lesion is a connected component of the mask ({metrics.LESION_CONNECTIVITY}-connectivity: voxels "
             f"sharing {metrics.NEIGHBOURS[metrics.LESION_CONNECTIVITY]}); its volume is its voxels times the "
             "volume of one voxel of the scan's own grid (|det| of the affine), as in predict's lesion tables.", "",
             "| scan | true lesions | predicted lesions | true volume (mL) | predicted volume (mL) | voxel size (mm) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for sid, s in results["scans"].items():
        lines.append(f"| {sid} | {s['truth_lesions']} | {s['pred_lesions']} | {s['truth_volume_mm3'] / 1000:.3f} | "
                     f"{s['pred_volume_mm3'] / 1000:.3f} | {' x '.join(f'{v:g}' for v in s['spacing_mm'])} |")
    return lines


# --------------------------------------------------------------------------------------------
# Checks before anything is created

def check_protocol(protocol, group) -> torch.device:
    """Every setting, before any file is read or written; returns this process's device."""
    if protocol.model not in MODELS:
        raise UsageError(f"--model {protocol.model!r}: expected one of {', '.join(sorted(MODELS))}")
    for name in ("epochs", "patience", "patch_size", "patches_per_scan"):
        if getattr(protocol, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(protocol, name)}")
    if protocol.base_filters is not None and protocol.base_filters < 1:
        raise UsageError(f"--base-filters must be at least 1, got {protocol.base_filters}")
    if not (math.isfinite(protocol.lr) and 0 < protocol.lr <= LR_MAX):
        raise UsageError(f"--lr must be a number in (0, {LR_MAX:g}], got {protocol.lr:g}")
    if not (math.isfinite(protocol.weight_decay) and protocol.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be a finite number >= 0, got {protocol.weight_decay}")
    if not 0 <= protocol.seed <= SEED_MAX:
        raise UsageError(f"--seed must be in [0, 2**63 - 1], got {protocol.seed}")
    if protocol.mixup is not None and not (math.isfinite(protocol.mixup) and protocol.mixup > 0):
        raise UsageError(f"--mixup must be a finite number > 0 (leave it out for no mix-up), got {protocol.mixup}")
    if not 0 <= protocol.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {protocol.dropout}")
    if protocol.spacing is not None and not (math.isfinite(protocol.spacing) and protocol.spacing > 0):
        raise UsageError(f"--spacing must be a number of mm > 0, got {protocol.spacing}")
    lo, hi = phantom.SPACING_RANGE_MM
    if protocol.data is None and protocol.spacing is not None and not lo <= protocol.spacing <= hi:
        raise UsageError(f"--spacing {protocol.spacing:g}: the built-in data are generated at {lo:g} to {hi:g} mm; "
                         "give --data to resample data of your own")
    net = MODELS[protocol.model]
    multiple, smallest = net.size_multiple, net.min_side
    if protocol.patch_size % multiple or protocol.patch_size < smallest:
        raise UsageError(f"--patch-size {protocol.patch_size}: the {MODEL_NAMES[protocol.model]} needs a multiple "
                         f"of {multiple} of at least {smallest}")
    if protocol.window is not None and protocol.window < smallest:
        raise UsageError(f"--window must be at least {smallest} voxels for the {MODEL_NAMES[protocol.model]}, "
                         f"got {protocol.window}")
    device = resolve_device(protocol.device)
    if group.world > 1 and device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_device(name) -> torch.device:
    """Exactly cpu, cuda or cuda:N (None: cuda when present, else cpu); anything else, the empty name and
    cpu:N included, is refused by name before anything is created."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:(0|[1-9][0-9]{0,3}))?", name):
        raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def split_and_check(protocol, scans, group):
    """The protocol's split of ``scans``: the split's ids and the (train, val, test) scans; refuses what
    ``check_sizes`` refuses."""
    split_ids = data.split_scans(scans, by=protocol.split, seed=protocol.seed)
    parts = tuple([s for s in scans if s.id in split_ids[k]] for k in data.SPLITS)
    check_sizes(protocol, scans, len(parts[0]), group)
    return split_ids, parts


def check_sizes(protocol, scans, n_train, group):
    """A scan the network cannot take, or a patch no scan can hold, is refused before training."""
    data.check_scan_sizes(scans, MODELS[protocol.model].min_side)
    if all(protocol.patch_size > n for scan in scans for n in scan.image.shape[1:]):
        largest = max(max(scan.image.shape[1:]) for scan in scans)
        raise UsageError(f"--patch-size {protocol.patch_size} is larger than every cropped scan (the largest side "
                         f"is {largest} voxels); choose a smaller patch")
    if group.world > n_train * protocol.patches_per_scan:
        raise UsageError(f"torchrun: {group.world} processes but an epoch has only {n_train * protocol.patches_per_scan} "
                         "patches; use fewer processes (--nproc-per-node) or more --patches-per-scan")


def data_path(text) -> str:
    """--data as it is stored and compared: absolute, links resolved, so that a resume from another working
    directory, or the same data given another way, finds the same data."""
    return str(Path(text).expanduser().resolve())


def load_scans(protocol):
    """The scans of the protocol's channels, from --data or the built-in dataset; a line naming the data; and
    the data files' fingerprint, which a resume must find unchanged."""
    root, dataset, spacing = find_data(protocol)
    scans = data.load_dataset(root, protocol.channels, protocol.label, norm=protocol.norm, spacing=spacing)
    return scans, dataset, data.dataset_fingerprint(root)


def find_data(protocol):
    """Where the protocol's data are: the folder or manifest to read, a line naming the data, and the voxel
    size in mm to resample them to (None: their own; the built-in data are generated at the protocol's)."""
    spacing = protocol.spacing
    if protocol.data:
        root = Path(protocol.data)
        if not root.exists():
            raise UsageError(f"--data {protocol.data}: no such file or folder; point it at the ISBI 2015 training "
                             "folder, a MICCAI 2008 folder or a CSV manifest")
        layout, _ = data.find_scans(root)
        dataset = f"{layout} ({root})"
        if (root / "phantom.json").exists():  # a copy written by phantom.py: never call it ISBI 2015
            info = json.loads((root / "phantom.json").read_text())
            dataset = f"synthetic MS data (phantom.py, seed {info['seed']}, {info['spacing_mm']:g} mm) at {root}"
    else:
        built_in = spacing or 1.0
        root = phantom.ensure_cached(seed=0, spacing=built_in, progress=sys.stderr.isatty())
        dataset = f"built-in synthetic MS data (phantom.py, seed 0, {built_in:g} mm)"
        spacing = None  # generated at that spacing
    return root, dataset, spacing


# --------------------------------------------------------------------------------------------
# The run folder

def check_out(out: Path, resume: bool, overwrite: bool, group):
    """Refuse an unusable output folder before anything is read or written: see ``check_folder`` (rank 0
    alone asks about the lock, which it takes itself later), then ``check_run_state``, and a resume's
    last.pt must be a checkpoint."""
    check_folder(out, "--out", run_files, probe=group.lead)
    check_run_state(out, resume, overwrite)
    if resume:
        try:
            infer.read_checkpoint(out / "last.pt")
        except UsageError as e:
            raise UsageError(f"--resume: {e}; start again with --overwrite (without --resume)") from None


def check_run_state(out: Path, resume: bool, overwrite: bool):
    """A resume needs a saved epoch; a run that has one is replaced only with --overwrite."""
    if resume:
        if not (out / "last.pt").exists():
            raise UsageError(f"--resume: {out / 'last.pt'} does not exist (no epoch finished); start the run "
                             "without --resume")
    elif started(out) and not overwrite:
        raise UsageError(f"--out {out} already holds a run; pass --resume to continue it or --overwrite to "
                         "replace it, or choose another --out")


def started(out: Path) -> bool:
    """A run counts once its first epoch is saved; one that stopped before (config.json, no last.pt) is replaced."""
    return (out / "last.pt").exists() or (out / "metrics.json").exists()


def check_folder(folder: Path, flag: str, foreign, probe: bool = True):
    """Refuse, naming ``flag``, a folder that repro.py must not write into: a file, a place it cannot
    write, a folder holding anything repro.py did not write there (``foreign(folder)`` says what, or None),
    and (``probe``) one that another process is writing. An absent or empty folder is fine."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise UsageError(f"{flag} {folder}: exists and is not a folder")
    parent = folder
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {folder}: cannot write into {parent}")
    if parent != folder:
        return
    try:
        unknown = foreign(folder)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot be read ({e.strerror})") from None
    if unknown is not None:
        raise UsageError(f"{flag} {folder}: {unknown}, and repro.py deletes only its own files: move that away "
                         f"or choose a new or empty {flag}")
    if probe:
        check_unlocked(folder, flag)


def run_files(out: Path) -> str | None:
    """What in the run folder ``out`` repro.py did not write there (None: nothing). A run folder is marked
    by its config.json (``RUN_SCHEMA``), the first file a run writes; its own files are then OUTPUTS, the
    masks predictions/<scan>_pred.nii.gz of the test scans that config.json names, the lock, and the
    temporaries .tmp-<pid>-<name> of those. Without config.json only the lock and its temporary are ours."""
    config = read_marker(out / "config.json", RUN_SCHEMA)
    if config is None and os.path.lexists(out / "config.json"):
        return "its config.json was not written by repro.py"
    names = {LOCK, *OUTPUTS} - {"predictions"} if config is not None else {LOCK, "config.json"}
    masks = own_masks(config)
    for entry in sorted(out.iterdir()):
        if entry.name == "predictions" and config is not None and entry.is_dir() and not entry.is_symlink():
            inner = next((p for p in sorted(entry.iterdir()) if not own_file(p, masks.__contains__)), None)
            if inner is not None:
                return f"predictions/{inner.name} was not written by repro.py"
        elif not own_file(entry, names.__contains__):
            return (f"{entry.name} was not written by repro.py" if config is not None else
                    f"it holds {entry.name} and no config.json of a run of repro.py")
    return None


def saved_protocol(out: Path) -> dict:
    """The protocol that the run folder ``out`` records in its config.json, or UsageError naming the file."""
    config = read_marker(out / "config.json", RUN_SCHEMA) or {}
    protocol = config.get("protocol")
    if not isinstance(protocol, dict) or not isinstance(protocol.get("channels"), list):
        raise UsageError(f"{out / 'config.json'}: not the configuration of a run of repro.py")
    return protocol


def own_masks(config) -> set:
    """The names of the masks a run of ``config`` writes into predictions/ (the test scans')."""
    try:
        return {f"{sid}_pred.nii.gz" for sid in config["split_ids"]["test"]}
    except (KeyError, TypeError):
        return set()


def own_file(path: Path, known) -> bool:
    """A regular file (not a link) whose name, or whose temporary's (.tmp-<pid>-<name>), ``known`` accepts."""
    match = infer.TEMPORARY.fullmatch(path.name)
    return known(match[2] if match else path.name) and path.is_file() and not path.is_symlink()


def read_marker(path: Path, schema: dict) -> dict | None:
    """The JSON object at ``path`` if it carries ``schema`` (written by repro.py), else None."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 1 << 24:
            return None
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and all(obj.get(k) == v for k, v in schema.items()) else None


def check_unlocked(folder: Path, flag: str):
    """Refuse a folder whose lock another live process holds, naming that process."""
    holder = lock_holder(folder)
    if holder is not None and holder != os.getpid():
        raise UsageError(busy(folder, flag, holder))


def busy(folder, flag, pid) -> str:
    who = f"another process (pid {pid})" if pid else "another process"
    return f"{flag} {folder}: {who} is writing into it; wait for it to end, or choose another {flag}"


def lock_holder(folder: Path) -> int | None:
    """The process id that holds ``folder``'s lock (0 before it has written it), or None when no process
    does: the kernel drops a dead process's lock, so a lock file left behind does not count."""
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"{folder / LOCK}: cannot be read ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken for a moment only; closing drops it
        return None
    except BlockingIOError:
        return lock_pid(fd)
    finally:
        os.close(fd)


def lock_pid(fd) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return 0


@contextlib.contextmanager
def lock_folder(folder: Path, flag: str):
    """Hold ``folder``'s exclusive lock while the block runs: one writer per folder. The folder is made if
    absent. The lock is ``fcntl.flock`` on the file LOCK in it, which holds this process's id for the
    message a second writer gets (UsageError naming the folder and that id); the kernel releases it when
    its process dies, so a lock file left by a killed process never blocks. On leaving, the lock file goes,
    and so do the folders this call made, if they are empty."""
    made = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot be made ({e.strerror})") from None
    try:
        fd = take_lock(folder, flag)
    except BaseException:
        remove_empty(made)
        raise
    try:
        yield
    finally:
        path = folder / LOCK
        with contextlib.suppress(OSError):  # removed while still held; a process waiting on it takes a new file
            if os.path.samestat(os.fstat(fd), os.lstat(path)):
                path.unlink()
        os.close(fd)
        remove_empty(made)


def take_lock(folder: Path, flag: str) -> int:
    """``lock_folder``'s lock: the open lock file, locked, with this process's id written in it."""
    path, holder = folder / LOCK, 0
    for _ in range(20):  # a probe (lock_holder) or a holder on its way out may have it for a moment
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise UsageError(f"{flag} {folder}: cannot write its lock file {LOCK}: {e.strerror.lower()}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UsageError(f"{flag} {folder}: {LOCK} is not a lock file of repro.py; choose another {flag}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_pid(fd)
            os.close(fd)
            time.sleep(0.05)
            continue
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.lstat(path)):  # else its holder removed it as we opened it
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        os.close(fd)
    raise UsageError(busy(folder, flag, holder))


def remove_empty(folders):
    """Remove each of ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def open_run(out, protocol, config, resume, overwrite, group):
    """Hold the run folder for the run and yield its log (silent on ranks > 0; rank 0 alone touches the
    folder). Refuses a resume whose settings, data or process count differ; takes the folder's lock and
    checks the folder again under it; clears what a replaced run or a dead process left; writes config.json
    first. A run that fails or stops before its first saved epoch removes what it wrote (a folder it made
    goes too), so the folder is as before; with a saved epoch everything stays, for --resume."""
    if resume:
        check_resume(out, config)
    if not group.lead:
        yield Log(None)
        return
    with lock_folder(out, "--out"):
        check_folder(out, "--out", run_files)  # again: another process may have written before the lock
        check_run_state(out, resume, overwrite)
        try:
            ACTIVE["out"] = out
            for folder in (out, out / "predictions"):
                if folder.is_dir():
                    infer.remove_leftovers(folder)
            if not resume:
                replaced = [name for name in OUTPUTS if (out / name).exists()]
                if replaced and not overwrite:
                    print(f"{out}: replacing a run that stopped before its first epoch ({', '.join(replaced)})")
                remove_outputs(out)
            write_json(out / "config.json", config)
            yield Log(out / "train.log")
        except BaseException:
            if not (out / "last.pt").exists():
                remove_outputs(out)
            raise
        ACTIVE.pop("out")


def check_resume(out: Path, config: dict):
    """Refuse to resume the run in ``out`` with ``config`` (run_config's) if its settings, split, data
    files or process count differ from those it was run with."""
    saved, old = saved_protocol(out), read_marker(out / "config.json", RUN_SCHEMA)
    changed = [k for k in SAME_ON_RESUME if saved.get(k) != config["protocol"][k]]
    changed += [k for k in ("split_ids", "data_fingerprint") if old.get(k) != config[k]]
    changed += ["world_size"] * (old.get("world_size", 1) != config["world_size"])
    if changed:
        raise UsageError(f"--resume: {out} was run with other settings or data: " + ", ".join(
            f"{k}={saved.get(k, old.get(k))!r} (now {config['protocol'].get(k, config.get(k))!r})"
            for k in changed))


def remove_outputs(out: Path):
    """Delete what a run wrote in ``out``: the files of OUTPUTS and the masks that its config.json names in
    predictions/ (the folder too, once empty); nothing else."""
    predictions = out / "predictions"
    if predictions.is_dir() and not predictions.is_symlink():
        for name in own_masks(read_marker(out / "config.json", RUN_SCHEMA)):
            (predictions / name).unlink(missing_ok=True)
        remove_empty([predictions])
    for name in OUTPUTS:
        if (out / name).is_file():
            (out / name).unlink()


def run_config(protocol, scans, dataset, fingerprint, split_ids, device, group) -> dict:
    """The run's recorded configuration, config.json: the protocol that ran, the data, the network and
    the machine."""
    return {**RUN_SCHEMA, "protocol": json.loads(json.dumps(asdict(protocol))), "dataset": dataset, "split_ids": split_ids,
            "data_fingerprint": fingerprint, "network": network(protocol, len(scans[0].channels)),
            "channels": list(scans[0].channels), "spacing_mm": list(scans[0].spacing), "norm": protocol.norm,
            "device_name": describe_device(device), "world_size": group.world,
            "precision": "bf16 autocast" if protocol.amp and infer.amp_supported(device) else "fp32",
            "versions": {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
                         "scipy": scipy.__version__, "nibabel": nibabel.__version__}}


def describe_device(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' * (threads > 1)})"


def describe_run(protocol, dataset, split_ids, device, sampler, group) -> str:
    n = [len(split_ids[k]) for k in data.SPLITS]
    processes = f", {group.world} processes (torchrun) of {len(sampler)} each" if group.world > 1 else ""
    return (f"{MODEL_NAMES[protocol.model]} on {'+'.join(protocol.channels)}, {dataset}; {n[0]}:{n[1]}:{n[2]} scans "
            f"({protocol.split} split); {describe_device(device)}; {sampler.epoch_size} patches per epoch"
            f"{processes}, at most {protocol.epochs} epochs.")


# --------------------------------------------------------------------------------------------
# Output: the log, progress bars, atomic files

class Log:
    """Lines to the terminal and to train.log. On a terminal the epochs show as progress bars; otherwise
    (nohup, a cluster job) one plain line per epoch, so that the log holds no carriage returns."""

    def __init__(self, path):  # None: a silent log, for ranks > 0 under torchrun
        self.path, self.start, self.epochs = path and Path(path), time.perf_counter(), 0
        self.first_step, self.paced = None, False

    def __call__(self, line):
        if self.path is None:
            return
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def epoch(self, row, stopper, epochs):
        self.epochs += 1  # in this process: a resumed run's earlier epochs took no time here
        per_epoch = (time.perf_counter() - self.start) / self.epochs
        most = epochs - stopper.epoch  # if the validation loss keeps improving
        least = min(most, stopper.patience - stopper.bad_epochs)  # if it never improves again
        self(f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
             f"val DSC {row['val_dsc']:.4f}, {row['seconds']:.0f} s; best epoch {stopper.best_epoch}; "
             f"ETA {duration(least * per_epoch)} to {duration(most * per_epoch)}")

    def pace(self, step, steps, device, protocol):
        """Called after training step ``step`` (from 1) of an epoch of ``steps``: once per process, the line of
        ``pace_line`` when step PACE_STEPS ends, or earlier once PACE_SECONDS have passed, so that a slow device
        shows long before the first epoch ends. Timed from the end of step 1, which pays one-time costs; on CUDA
        after the queued steps finish."""
        if self.path is None or self.paced or steps < PACE_STEPS or step > PACE_STEPS:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if step == 1:
            self.first_step = now
        elif step == PACE_STEPS or now - self.first_step >= PACE_SECONDS:
            self.paced = True
            self(pace_line((now - self.first_step) / (step - 1), steps, protocol.epochs,
                           suggest_quick=device.type == "cpu" and protocol.patch_size > QUICK.patch_size))

    def test(self, results, stopper, out):
        mean = results["mean"]
        self(f"Test ({len(results['scans'])} scans, best epoch {stopper.best_epoch} of {stopper.epoch}): DSC "
             f"{mean['dsc']:.4f}, IoU {mean['iou']:.4f}, lesion TPR {mean['ltpr']:.3f}, lesion FPR {mean['lfpr']:.3f}. "
             f"Results in {out}/")


PACE_STEPS, PACE_SECONDS = 3, 30.0
"""After this many training steps, or this many seconds of steps after the first, the log projects the run's
duration (``Log.pace``)."""


def pace_line(per_step, steps, epochs, suggest_quick) -> str:
    """The measured time per training step, and what it projects for an epoch of ``steps`` steps and for a run
    of ``epochs`` (validation not counted); ``suggest_quick``: point to the CPU preset."""
    line = (f"pace: {per_step:.3g} s per training step: about {duration(per_step * steps)} per epoch of {steps} "
            f"steps, {duration(per_step * steps * epochs)} for {epochs} epochs (validation not counted)")
    if suggest_quick:
        line += (f"; on a CPU, try --quick, the preset made for it ({QUICK.spacing:g} mm, {QUICK.patch_size}³ "
                 f"patches, {QUICK.epochs} epochs)")
    return line


def progress(items, desc, total=None):
    """A progress bar on a terminal, the plain iterable otherwise (no carriage returns in a log)."""
    return tqdm(items, desc=desc, total=total, leave=False) if sys.stderr.isatty() else items


def duration(seconds) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def atomic_save(path, write):
    """infer.atomic, with a full disk told apart from a bug."""
    try:
        infer.atomic(path, write)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UsageError(f"no space left on device while writing {path}") from None
        raise
    except RuntimeError as e:  # torch.save reports a failed write as a RuntimeError of its C++ writer
        if disk_full(path):
            raise UsageError(f"no space left on device while writing {path}") from None
        raise UsageError(f"could not write {path}: {str(e).splitlines()[0]}") from None


def disk_full(path) -> bool:
    stats = os.statvfs(Path(path).parent)
    return stats.f_bavail * stats.f_frsize < 64 << 20


def write_json(path, obj):
    """Strict JSON (no NaN or Infinity: undefined values are null), atomically."""
    atomic_save(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n"))


def write_csv(path, rows):
    """Rows of dicts (one header, from the first row) to a CSV file, atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    atomic_save(path, write)
