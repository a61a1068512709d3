"""Reproduce the paper: train and evaluate one cell of Table 2, all eight cells, or predict a new scan.

    python repro.py --model residual --channel FLAIR          # one cell, paper protocol (§4.2, Table 1)
    python repro.py --quick                                   # a CPU preset: 2 mm data, small patches
    python repro.py --table2                                  # 2 models x 4 channels, beside the paper's
    python repro.py predict --checkpoint runs/.../best.pt --input flair.nii.gz --output mask.nii.gz

Without --data the built-in synthetic MS dataset (phantom.py) is generated once into a cache and used.

One training run, top to bottom: read and prepare the scans (crop to the brain, z-normalise), split them
(17:2:2 scans as the paper, or by subject), then per epoch 10 random lesion-centred 144^3 patches per
training scan, each augmented on the device (Flip, Motion, Bias field, Noise, Affine, Elastic), one Adam
step per patch (batch size 1) on the BCE-Dice loss; after each epoch the validation scans are predicted
whole and the best-validation-loss checkpoint is kept; training stops early when the validation loss has
not improved for 5 epochs. The best checkpoint then predicts the test scans (sigmoid > 0.5), which are
scored (DSC, IoU, lesion-wise metrics) and written back as NIfTI in their original grid.
"""
import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import augment
import data
import metrics
import phantom
from model import build_model

PAPER = dict(epochs=100, patience=5, lr=1e-4, weight_decay=1e-10, patch_size=144, patches_per_scan=10, spacing=1.0)
# --quick: 2 mm data and 64^3 patches, so that the residual net trains in minutes on two CPU cores.
QUICK = dict(epochs=12, patience=4, lr=1e-3, weight_decay=1e-10, patch_size=64, patches_per_scan=2, spacing=2.0)

# Table 2 of the paper (test set): DSC and mean IoU.
PAPER_TABLE2 = {
    ("unet", "FLAIR"): (0.6470, 0.4583), ("unet", "MPRAGE"): (0.4201, 0.2576),
    ("unet", "T2W"): (0.5637, 0.3827), ("unet", "PDW"): (0.4833, 0.3134),
    ("residual", "FLAIR"): (0.7068, 0.5279), ("residual", "MPRAGE"): (0.5234, 0.3390),
    ("residual", "T2W"): (0.5177, 0.3360), ("residual", "PDW"): (0.4476, 0.2767),
}
MODEL_NAMES = {"residual": "Residual 3D U-Net", "unet": "3D U-Net"}
CHANNELS = ("FLAIR", "MPRAGE", "T2W", "PDW")
# A resumed run must match these settings of the interrupted one; epochs and patience may change.
SAME_ON_RESUME = ("model", "channel", "data", "label", "split", "seed", "lr", "weight_decay", "patch_size",
                  "patches_per_scan", "base_filters", "spacing", "amp", "augment")
OUTPUTS = ("config.json", "history.csv", "metrics.json", "best.pt", "last.pt", "fig6.png", "fig7.png")


class UsageError(Exception):
    """A bad command line or output folder; reported as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# Command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="residual", choices=sorted(MODEL_NAMES), help="network (default residual)")
    p.add_argument("--channel", default="FLAIR", help="FLAIR, MPRAGE, T2W or PDW (default FLAIR)")
    p.add_argument("--data", help="ISBI 2015 folder, MICCAI 2008 folder or CSV manifest (default: built-in)")
    p.add_argument("--label", default="mask1", choices=data.LABELS, help="which rater's mask (default mask1)")
    p.add_argument("--split", default="scan", choices=("scan", "subject"), help="paper: scan (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="most epochs (paper 100)")
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs (paper 5)")
    p.add_argument("--lr", type=float, help="Adam learning rate (paper 1e-4)")
    p.add_argument("--weight-decay", type=float, help="Adam L2 weight decay (paper 1e-10)")
    p.add_argument("--patch-size", type=int, help="training patch side in voxels (paper 144)")
    p.add_argument("--patches-per-scan", type=int, help="patches per training scan and epoch (paper 10)")
    p.add_argument("--base-filters", type=int, help="first level's channels (residual 16, unet 32)")
    p.add_argument("--spacing", type=float, help="built-in data voxel size in mm (1; --quick 2)")
    p.add_argument("--window", type=int, help="sliding-window side for whole-scan inference (default: whole scan)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train without augmentation")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cuda when available)")
    p.add_argument("--out", help="output folder (default runs/<model>-<channel>-seed<k>[-quick])")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out")
    p.add_argument("--quick", action="store_true", help="CPU preset: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--table2", action="store_true", help="run all 8 cells and write table2.md/.csv")
    args = p.parse_args(argv)
    if args.data and args.spacing is not None:
        raise UsageError("--spacing applies to the built-in dataset only; real data are read as they are")
    preset = QUICK if args.quick else PAPER
    for key, value in preset.items():
        if getattr(args, key) is None and not (key == "spacing" and args.data):
            setattr(args, key, value)
    if args.base_filters is None:
        args.base_filters = 16 if args.model == "residual" else 32
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for key in ("epochs", "patience", "patch_size", "patches_per_scan", "base_filters"):
        if getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.window is not None and args.window < 16:
        raise UsageError(f"--window must be at least 16 voxels, got {args.window}")
    manifest = bool(args.data) and args.data.lower().endswith(".csv")  # may name channels of its own (GADO)
    if data.channel_name(args.channel) is None and not manifest:
        raise UsageError(f"unknown channel {args.channel!r}: expected one of {', '.join(CHANNELS)} (or T1 for "
                         "MICCAI 2008)")
    args.channel = data.channel_name(args.channel) or args.channel
    return args


def parse_predict_args(argv):
    p = argparse.ArgumentParser(prog="repro.py predict", description="Segment one new scan with a trained model.")
    p.add_argument("--checkpoint", required=True, help="best.pt (or last.pt) written by a training run")
    p.add_argument("--input", required=True, help="the scan, NIfTI or NRRD, the checkpoint's channel")
    p.add_argument("--output", required=True, help="the mask to write, NIfTI (.nii or .nii.gz)")
    p.add_argument("--model", choices=sorted(MODEL_NAMES), help="check that the checkpoint holds this model")
    p.add_argument("--threshold", type=float, default=0.5, help="on the sigmoid (default 0.5)")
    p.add_argument("--window", type=int, help="sliding-window side (default: whole scan)")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cuda when available)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
    return device


def check_out(args):
    """Refuse an existing or unwritable output folder before anything is computed or written."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: cannot write into {parent}")
    has_results = out.is_dir() and any((out / name).exists() for name in OUTPUTS)
    if args.resume and not (out / "last.pt").exists():
        raise UsageError(f"--resume: {out / 'last.pt'} does not exist; start the run without --resume")
    if has_results and not (args.resume or args.overwrite):
        raise UsageError(f"--out {out} already holds a run; pass --resume to continue it or --overwrite to "
                         "replace it, or choose another --out")


# --------------------------------------------------------------------------------------------
# Small utilities

def atomic(path, write):
    """Write through a temporary sibling and rename, so that a crash never leaves half a file behind."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")  # same suffix: nibabel and matplotlib pick the format by it
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def autocast(device, amp):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def versions():
    import nibabel
    import scipy
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "nibabel": nibabel.__version__}


def voxel_mm(scan):
    """Voxel size in mm along each array axis, from the scan's affine."""
    return tuple(float(s) for s in np.linalg.norm(scan.affine[:3, :3], axis=0))


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def make_deterministic(device):
    """Same --seed, same machine, same result: cuDNN's autotuner and atomics-based kernels off on CUDA."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------------------------
# Whole-scan inference

def gaussian_weights(size, device):
    """nnU-Net's tile weighting: a Gaussian of sigma = side / 8 per axis, so that tile centres dominate."""
    axes = []
    for n in size:
        x = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (n / 8)) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (w / w.max()).clamp_min(1e-3)


@torch.no_grad()
def predict_logits(model, image, window=None, overlap=0.5, amp=True):
    """Logits of a whole cropped scan (X, Y, Z) on the model's device, float32.

    With no window, or a scan that fits in it, the scan goes through in one pass (the network pads it to its
    multiple). Otherwise tiles of `window` voxels overlapping by `overlap` cover it and their logits are
    blended with Gaussian weights (sigma = window / 8), as nnU-Net does, so that tile borders leave no seams.
    """
    device = image.device
    if window is None or all(n <= window for n in image.shape):
        with autocast(device, amp):
            return model(image[None, None])[0, 0].float()
    size = [min(window, n) for n in image.shape]
    starts = []
    for n, w in zip(image.shape, size):
        count = math.ceil((n - w) / (w * (1 - overlap))) + 1
        starts.append(sorted({round(i * (n - w) / max(count - 1, 1)) for i in range(count)}))
    weights = gaussian_weights(size, device)
    total = torch.zeros(image.shape, device=device)
    norm = torch.zeros(image.shape, device=device)
    for x in starts[0]:
        for y in starts[1]:
            for z in starts[2]:
                tile = (slice(x, x + size[0]), slice(y, y + size[1]), slice(z, z + size[2]))
                with autocast(device, amp):
                    logits = model(image[tile][None, None])[0, 0].float()
                total[tile] += logits * weights
                norm[tile] += weights
    return total / norm


def evaluate(model, scans, args, device):
    """Validation: mean BCE-Dice loss and mean DSC over whole scans, without augmentation."""
    model.eval()
    loss_fn = metrics.BCEDiceLoss()
    losses, dscs = [], []
    for scan in scans:
        image, truth = scan.image.to(device), scan.mask.to(device)
        logits = predict_logits(model, image, args.window, amp=args.amp)
        losses.append(loss_fn(logits, truth))
        dscs.append(metrics.dice(logits > 0, truth))
    return torch.stack(losses).mean().item(), torch.stack(dscs).mean().item()


# --------------------------------------------------------------------------------------------
# Training

def load_data(args):
    """The scans of the chosen channel, from --data or the built-in dataset; also a line naming the dataset."""
    if args.data:
        if not Path(args.data).exists():
            raise data.DataError(f"--data {args.data}: no such file or folder; point it at the ISBI 2015 "
                                 "training folder, a MICCAI 2008 folder or a CSV manifest")
        root, (layout, _) = Path(args.data), data.find_scans(args.data)
        dataset = f"{layout} ({root})"
        if (root / "phantom.json").exists():  # a copy written by phantom.py: never call it ISBI 2015
            info = json.loads((root / "phantom.json").read_text())
            dataset = f"synthetic MS data (phantom.py, seed {info['seed']}, {info['spacing_mm']:g} mm) at {root}"
    else:
        root = phantom.ensure_cached(seed=0, spacing=args.spacing)
        dataset = f"built-in synthetic MS data (phantom.py, seed 0, {args.spacing:g} mm)"
    print(f"Reading {args.channel} scans from {root} ...", flush=True)
    scans = data.load_dataset(root, args.channel, args.label)
    if not scans:
        raise data.DataError(f"{root}: no scans found")
    return scans, dataset


def check_patch(args, scans):
    multiple = 16 if args.model == "residual" else 8
    if args.patch_size % multiple or args.patch_size < 2 * multiple:
        raise UsageError(f"--patch-size {args.patch_size}: the {MODEL_NAMES[args.model]} needs a multiple of "
                         f"{multiple} of at least {2 * multiple}")
    if all(args.patch_size > n for scan in scans for n in scan.image.shape):
        largest = max(max(scan.image.shape) for scan in scans)
        raise UsageError(f"--patch-size {args.patch_size} is larger than every cropped scan (the largest side "
                         f"is {largest} voxels); choose a smaller patch")


def estimate_step(model, loss_fn, args, device):
    """Seconds of one training step, timed on a blank patch without touching weights, optimizer or RNG."""
    model.eval()  # no dropout draws, no batch-norm statistics updated
    x = torch.zeros(1, 1, *(args.patch_size,) * 3, device=device)
    seconds = []
    for _ in range(2):  # the first step pays for allocation and kernel selection
        start = time.perf_counter()
        with autocast(device, args.amp):
            loss = loss_fn(model(x), x)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return seconds[-1]


def train(args):
    """Train and test one cell of Table 2; returns its metrics dict."""
    device = check_device(args.device)
    check_out(args)
    scans, dataset = load_data(args)
    check_patch(args, scans)
    split = data.split_scans(scans, args.split, seed=args.seed)
    by_id = {s.id: s for s in scans}
    train_scans, val_scans, test_scans = ([by_id[i] for i in split[k]] for k in ("train", "val", "test"))
    out = Path(args.out)
    config = {**{k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "table2")},
              "dataset": dataset, "split_ids": split, "device_name": describe_device(device),
              "versions": versions(), "command": " ".join(sys.argv)}
    if args.resume:
        old = json.loads((out / "config.json").read_text())
        changed = [k for k in SAME_ON_RESUME if old.get(k) != config[k]]
        if changed:
            raise UsageError(f"--resume: {out} was run with other settings: " + ", ".join(
                f"{k}={old.get(k)!r} (now {config[k]!r})" for k in changed))
    elif args.overwrite:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions").mkdir(exist_ok=True)
    write_json(out / "config.json", config)

    make_deterministic(device)
    torch.manual_seed(args.seed)  # weights and dropout
    generator = torch.Generator(device).manual_seed(args.seed)  # patches and augmentation, on the device
    model = build_model(args.model, base_filters=args.base_filters).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = metrics.BCEDiceLoss()
    sampler = data.PatchSampler(train_scans, args.patch_size, args.patches_per_scan, device, generator)
    transform = augment.paper_augmentation(spacing=voxel_mm(train_scans[0])) if args.augment else None
    state = {"epoch": 0, "history": [], "best_loss": math.inf, "best_epoch": 0, "bad_epochs": 0}
    if args.resume:
        last = torch.load(out / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        state = last["state"]
        torch.set_rng_state(last["rng"]["torch"])
        generator.set_state(last["rng"]["generator"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(last["rng"]["cuda"], device)
        print(f"Resuming {out} after epoch {state['epoch']}.")

    step = estimate_step(model, loss_fn, args, device)
    print(f"{MODEL_NAMES[args.model]} on {args.channel}, {dataset}; {len(train_scans)}:{len(val_scans)}:"
          f"{len(test_scans)} scans ({args.split} split); {describe_device(device)}.\n"
          f"One step takes about {step:.2f} s, so an epoch of {len(sampler)} patches about "
          f"{duration(step * len(sampler))} and {args.epochs} epochs at most "
          f"{duration(step * len(sampler) * args.epochs)} plus validation (early stopping usually ends sooner).",
          flush=True)

    epochs = tqdm(range(state["epoch"], args.epochs), desc="epochs", initial=state["epoch"], total=args.epochs)
    for epoch in epochs:
        if state["bad_epochs"] >= args.patience:
            break
        start = time.perf_counter()
        model.train()
        total = torch.zeros((), device=device)
        steps = tqdm(sampler, desc=f"epoch {epoch + 1}", leave=False)
        for i, (image, label) in enumerate(steps, 1):
            if transform is not None:
                image, label = transform(image, label, generator=generator)
            with autocast(device, args.amp):
                loss = loss_fn(model(image), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            if i % 10 == 0 or i == len(sampler):  # a host sync only every 10 steps
                steps.set_postfix(loss=f"{total.item() / i:.4f}")
        val_loss, val_dsc = evaluate(model, val_scans, args, device)
        state["history"].append({"epoch": epoch + 1, "train_loss": total.item() / len(sampler),
                                 "val_loss": val_loss, "val_dsc": val_dsc,
                                 "seconds": round(time.perf_counter() - start, 2)})
        if val_loss < state["best_loss"]:
            state.update(best_loss=val_loss, best_epoch=epoch + 1, bad_epochs=0)
            atomic(out / "best.pt", lambda tmp: torch.save({"model": model.state_dict(), "config": config,
                                                            "epoch": epoch + 1}, tmp))
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        rng = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        atomic(out / "last.pt", lambda tmp: torch.save({"model": model.state_dict(), "optimizer":
                                                        optimizer.state_dict(), "state": state, "rng": rng,
                                                        "config": config}, tmp))
        write_csv(out / "history.csv", state["history"])
        epochs.set_postfix(val_loss=f"{val_loss:.4f}", val_dsc=f"{val_dsc:.3f}", best=state["best_epoch"])

    model.load_state_dict(torch.load(out / "best.pt", map_location=device, weights_only=False)["model"])
    results = test(model, test_scans, args, device, out)
    results.update(dataset=dataset, model=args.model, channel=args.channel, split=split,
                   best_epoch=state["best_epoch"], epochs_run=state["epoch"],
                   early_stopped=state["bad_epochs"] >= args.patience)
    write_json(out / "metrics.json", results)
    plot_history(out / "fig6.png", state["history"], f"{MODEL_NAMES[args.model]}, {args.channel}")
    plot_slices(out / "fig7.png", test_scans, {MODEL_NAMES[args.model]: out}, args.channel)
    mean = results["mean"]
    print(f"Test ({len(test_scans)} scans, best epoch {state['best_epoch']} of {state['epoch']}): "
          f"DSC {mean['dsc']:.4f}, IoU {mean['iou']:.4f}, lesion TPR {mean['ltpr']:.3f}, "
          f"lesion FPR {mean['lfpr']:.3f}. Results in {out}/")
    return results


def write_csv(path, rows):
    """Rows of dicts (one header, from the first row) to a CSV file, atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    atomic(path, write)


# --------------------------------------------------------------------------------------------
# Testing

def test(model, scans, args, device, out):
    """Score the test scans with the best checkpoint and write their masks in the original grid."""
    import nibabel as nib
    model.eval()
    per_scan = {}
    for scan in tqdm(scans, desc="test", leave=False):
        truth = scan.mask.to(device)
        pred = predict_logits(model, scan.image.to(device), args.window, amp=args.amp) > 0
        per_scan[scan.id] = {
            "dsc": metrics.dice(pred, truth).item(), "iou": metrics.iou(pred, truth).item(),
            "ppv": metrics.precision(pred, truth).item(), "tpr": metrics.sensitivity(pred, truth).item(),
            "rvd": metrics.relative_volume_difference(pred, truth).item(),
            **metrics.lesion_metrics(pred, truth), "hd95_mm": metrics.hausdorff95(pred, truth, voxel_mm(scan)),
            "isbi_score": metrics.isbi_score(pred, truth),
        }
        full = data.paste(pred.to(torch.uint8).cpu().numpy(), scan.box, scan.full_shape)
        image = nib.Nifti1Image(full, scan.affine, scan.header)
        image.set_data_dtype(np.uint8)
        atomic(out / "predictions" / f"{scan.id}_pred.nii.gz", lambda tmp: nib.save(image, tmp))
    keys = [k for k, v in next(iter(per_scan.values())).items() if isinstance(v, float)]
    return {"scans": per_scan, "mean": {k: float(np.mean([s[k] for s in per_scan.values()])) for k in keys}}


# --------------------------------------------------------------------------------------------
# Figures like the paper's

def plot_history(path, history, title):
    """Fig. 6: loss and validation DSC per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_dsc) = plt.subplots(1, 2, figsize=(10, 3.8))
    val_loss = [h["val_loss"] for h in history]
    best = epochs[int(np.argmin(val_loss))]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], ".-", label="train")
    ax_loss.plot(epochs, val_loss, ".-", label="validation")
    ax_loss.axvline(best, color="gray", linestyle=":", label=f"best (epoch {best})")
    ax_loss.set(xlabel="epoch", ylabel="BCE-Dice loss", title=f"Loss ({title})")
    ax_loss.legend()
    ax_dsc.plot(epochs, [h["val_dsc"] for h in history], ".-", color="C2")
    ax_dsc.axvline(best, color="gray", linestyle=":")
    ax_dsc.set(xlabel="epoch", ylabel="DSC", ylim=(0, 1), title="Validation DSC")
    fig.tight_layout()
    atomic(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def plot_slices(path, scans, runs, channel):
    """Fig. 7: per test scan, the axial slice with the most lesion: image, ground truth, each run's prediction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    red = matplotlib.colors.ListedColormap(["red"])
    columns = 2 + len(runs)
    fig, axes = plt.subplots(len(scans), columns, figsize=(2.6 * columns, 2.8 * len(scans)), squeeze=False)
    for row, scan in zip(axes, scans):
        z = int(scan.mask.sum(dim=(0, 1)).argmax())
        crop = tuple(slice(a, b) for a, b in scan.box)
        image = np.rot90(scan.image[:, :, z].numpy())
        panels = [(None, f"{scan.id} {channel}"), (scan.mask[:, :, z].numpy(), "ground truth")]
        for name, run in runs.items():
            pred = np.asarray(nib.load(Path(run) / "predictions" / f"{scan.id}_pred.nii.gz").dataobj)[crop]
            panels.append((pred[:, :, z], name))
        for ax, (mask, title) in zip(row, panels):
            ax.imshow(image, cmap="gray")
            if mask is not None:  # the mask in red over the image, as the paper's figure
                ax.imshow(np.ma.masked_equal(np.rot90(mask), 0), cmap=red, alpha=0.7)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    atomic(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Table 2

def table2(args, argv):
    """Train and test the 8 cells (2 models x 4 channels) into --out/<model>-<channel>/, then write the table.

    A cell that already has metrics.json is reused and one with last.pt is resumed, so an interrupted
    --table2 continues where it stopped.
    """
    out = Path(args.out or f"runs/table2-seed{args.seed}{'-quick' if args.quick else ''}")
    rows = []
    for model_name in ("unet", "residual"):
        for channel in CHANNELS:
            cell = out / f"{model_name}-{channel}"
            if (cell / "metrics.json").exists() and not args.overwrite:
                results = json.loads((cell / "metrics.json").read_text())
            else:
                cell_argv = [a for a in argv if a not in ("--table2",)]
                cell_args = parse_args(cell_argv + ["--model", model_name, "--channel", channel])
                cell_args.out = str(cell)
                cell_args.resume = (cell / "last.pt").exists() and not args.overwrite
                results = train(cell_args)
            paper_dsc, paper_iou = PAPER_TABLE2[(model_name, channel)]
            rows.append({"model": MODEL_NAMES[model_name], "channel": channel, "paper_dsc": paper_dsc,
                         "paper_iou": paper_iou, "dsc": results["mean"]["dsc"], "iou": results["mean"]["iou"],
                         "test_scans": len(results["scans"]), "dataset": results["dataset"]})
    write_table2(out, rows)
    flair = {MODEL_NAMES[m]: out / f"{m}-FLAIR" for m in ("residual", "unet")}
    if all((run / "metrics.json").exists() for run in flair.values()):
        scans, _ = load_data(parse_args([a for a in argv if a != "--table2"] + ["--channel", "FLAIR"]))
        test_ids = json.loads((flair[MODEL_NAMES["residual"]] / "metrics.json").read_text())["split"]["test"]
        plot_slices(out / "fig7.png", [s for s in scans if s.id in test_ids], flair, "FLAIR")
    print(f"Table 2 written to {out}/table2.md and table2.csv")


def write_table2(out, rows):
    datasets = sorted({r["dataset"] for r in rows})
    lines = ["# Table 2: test DSC and IoU, ours beside the paper's", "",
             f"Ours: {'; '.join(datasets)}. Paper: ISBI 2015 training data (called MICCAI 2008 in the paper), "
             "scan-level 17:2:2 split.", "",
             "| model | channel | paper DSC | our DSC | paper IoU | our IoU | test scans |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['channel']} | {r['paper_dsc']:.4f} | {r['dsc']:.4f} | {r['paper_iou']:.4f} | "
              f"{r['iou']:.4f} | {r['test_scans']} |" for r in rows]
    atomic(out / "table2.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    write_csv(out / "table2.csv", rows)


# --------------------------------------------------------------------------------------------
# Predict

def predict(args):
    """Segment one new scan: the training preprocessing, whole-scan inference, the mask in the input's grid."""
    import nibabel as nib
    device = check_device(args.device)
    if not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    if not str(args.output).endswith((".nii", ".nii.gz")):
        raise UsageError(f"--output {args.output}: expected a NIfTI file name ending in .nii or .nii.gz")
    try:
        checkpoint = torch.load(args.checkpoint, map_location=device, weights_only=False)
        config = checkpoint["config"]
    except Exception as e:
        raise UsageError(f"--checkpoint {args.checkpoint}: not a checkpoint written by repro.py ({e})") from None
    if args.model and args.model != config["model"]:
        raise UsageError(f"--checkpoint {args.checkpoint} holds a {MODEL_NAMES[config['model']]}, not a "
                         f"{MODEL_NAMES[args.model]}")
    model = build_model(config["model"], base_filters=config["base_filters"]).to(device)
    model.load_state_dict(checkpoint["model"])
    array, affine, header = data.read_image(args.input)
    image, _, box = data.prepare(array, source=str(args.input))
    logits = predict_logits(model.eval(), image.to(device), args.window, amp=args.amp)
    mask = data.paste((torch.sigmoid(logits) > args.threshold).to(torch.uint8).cpu().numpy(), box, array.shape)
    out = nib.Nifti1Image(mask, affine, header)
    out.set_data_dtype(np.uint8)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic(args.output, lambda tmp: nib.save(out, tmp))
    print(f"{args.output}: {int(mask.sum())} lesion voxels ({config['channel']} {MODEL_NAMES[config['model']]}, "
          f"trained on {config['dataset']})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["predict"]:
            predict(parse_predict_args(argv[1:]))
            return 0
        args = parse_args(argv)
        if args.table2:
            table2(args, argv)
        else:
            args.out = args.out or f"runs/{args.model}-{args.channel}-seed{args.seed}{'-quick' if args.quick else ''}"
            train(args)
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
