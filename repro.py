"""Reproduce Choi et al. 2021: train and test one cell of Table 2, all eight cells, or segment new scans.

    python repro.py --model residual --channel FLAIR     # one cell, the paper's protocol (§4.2, Table 1)
    python repro.py --quick                              # the CPU preset (train.QUICK): 2 mm data, 48³ patches
    python repro.py --table2 --quick                     # 2 networks x 4 channels, beside the paper's numbers
    python repro.py --table2 --quick --seeds 0,1,2 --channel FLAIR   # one column, three seeds
    python repro.py predict --checkpoint runs/residual-FLAIR-seed0-quick/best.pt --input scan.nii.gz --output mask.nii.gz

The protocol and the training loop are in train.py, every prediction in infer.py; this file is the command
line and Table 2. Without --data the built-in synthetic MS dataset (phantom.py) is generated once into a
cache: $RESUNET_CACHE, else ~/.cache/resunet3d-ms.
"""
import argparse
import ctypes
import json
import math
import os
import re
import signal
import statistics
import sys
from contextlib import nullcontext
from dataclasses import asdict, fields, replace
from pathlib import Path

NOTHING_STARTED = "interrupted before a run started; nothing was written"


class Terminated(KeyboardInterrupt):
    """SIGTERM, what a cluster scheduler sends before its kill: handled as Ctrl-C, with exit status 143."""


def terminate(signum, frame):
    raise Terminated


def exit_status(stop: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process that the signal ended: 143 SIGTERM, 130 SIGINT."""
    stop = getattr(stop, "cause", None) or stop  # infer.Interrupted carries the stop that ended predict
    return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


if __name__ == "__main__":  # before the heavy imports, so that SIGTERM during them ends as Ctrl-C does
    signal.signal(signal.SIGTERM, terminate)
try:
    import nibabel as nib
    import numpy as np
    import torch
    from scipy import stats

    import data
    import figures
    import infer
    import train
    from infer import UsageError
    from model import NORMS as UNET_NORMS
    from train import MODEL_NAMES, PAPER, QUICK, Protocol
except KeyboardInterrupt as stop:
    print(NOTHING_STARTED, file=sys.stderr)
    sys.exit(exit_status(stop))

# Table 2 of the paper (test set): DSC and mean IoU.
PAPER_TABLE2 = {
    ("unet", "FLAIR"): (0.6470, 0.4583), ("unet", "MPRAGE"): (0.4201, 0.2576),
    ("unet", "T2W"): (0.5637, 0.3827), ("unet", "PDW"): (0.4833, 0.3134),
    ("residual", "FLAIR"): (0.7068, 0.5279), ("residual", "MPRAGE"): (0.5234, 0.3390),
    ("residual", "T2W"): (0.5177, 0.3360), ("residual", "PDW"): (0.4476, 0.2767),
}
TABLE_MARKER = "table2.json"  # written first into a --table2 folder: the folder is a table of repro.py
TABLE_SCHEMA = {"schema": "resunet3d-ms table2", "version": 1}
# The network each option shapes: given for the other network, it would be ignored, so it is refused.
NETWORK_OPTIONS = {"dropout": "residual", "shared_context": "residual", "unet_norm": "unet"}
USAGE = ("python repro.py [--model M] [--channel C] [--data PATH] [--quick] [--table2] [options]\n"
         "       python repro.py predict --checkpoint best.pt --input SCAN... --output MASK_OR_FOLDER [options]")


# --------------------------------------------------------------------------------------------
# Command line -> Protocol

def seeds_list(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds such as 0,1,2, got {text!r}") from None
    if any(not 0 <= s <= train.SEED_MAX for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds in [0, 2**63 - 1], got {text!r}")
    return seeds


class Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported as one line (the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see python {self.prog} --help)\n")


def parser():
    d = PAPER
    p = Parser(prog="repro.py", usage=USAGE, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               argument_default=argparse.SUPPRESS)  # only what was given overrides the preset
    run = p.add_argument_group("what to train (a resumed run must keep these)")
    run.add_argument("--model", choices=sorted(MODEL_NAMES), help=f"network (default {d.model})")
    run.add_argument("--channel", dest="channels", metavar="C[,C...]",
                     help="FLAIR, MPRAGE, T2W or PDW (T1 for MICCAI 2008), or several stacked as input channels, "
                          "e.g. FLAIR,T2W, or 'all' (default FLAIR)")
    run.add_argument("--data", help="ISBI 2015 folder, MICCAI 2008 folder or CSV manifest (default: the built-in "
                                    "synthetic data, cached in $RESUNET_CACHE or ~/.cache/resunet3d-ms). Scans are "
                                    "expected skull-stripped: the crop and the z-score use the non-zero voxels. "
                                    "MICCAI 2008 is not (whole heads at 0.5 mm): give a manifest with a brainmask "
                                    "column, else the whole head is cropped and normalised")
    run.add_argument("--label", choices=data.LABEL_CHOICES, help=f"which rater's mask (default {d.label})")
    run.add_argument("--split", choices=data.SPLIT_BY, help="split by scan (the paper's, default) or subject")
    run.add_argument("--seed", type=int, help="split, weights, patches and augmentation (default 0)")
    run.add_argument("--spacing", type=float, help="voxel size in mm: the built-in data are generated at it, "
                                                   "real data resampled to it (default: the data's own; --quick 2)")
    run.add_argument("--norm", choices=data.NORMS, help="z-score over the brain (default) or the whole crop "
                                                              "(TorchIO's ZNormalization)")
    run.add_argument("--patch-size", type=int, help=f"training patch side in voxels (paper {d.patch_size})")
    run.add_argument("--patches-per-scan", type=int, help=f"per training scan and epoch (paper {d.patches_per_scan})")
    run.add_argument("--no-augment", dest="augment", action="store_false", help="train without augmentation")
    run.add_argument("--mixup", type=float, metavar="ALPHA", help="mix-up with Beta(ALPHA, ALPHA) (default off)")
    run.add_argument("--base-filters", type=int, help="first level's channels (residual 16, unet 32)")
    run.add_argument("--dropout", type=float, help=f"residual net's dropout (default {d.dropout}; pykao 0.6)")
    run.add_argument("--shared-context", action="store_true", help="pykao's shared context convolution")
    run.add_argument("--unet-norm", choices=tuple(UNET_NORMS), help="the 3D U-Net's norm (default batch)")
    run.add_argument("--lr", type=float, help=f"Adam learning rate, in (0, {train.LR_MAX:g}] (paper {d.lr:g})")
    run.add_argument("--weight-decay", type=float, help=f"Adam L2 weight decay (paper {d.weight_decay:g})")
    run.add_argument("--no-amp", dest="amp", action="store_false",
                     help="fp32 throughout (default: bf16 autocast where the CPU or GPU has bf16)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the training step (default off: it barely pays on CPUs)")
    how = p.add_argument_group("how long, and how it is evaluated")
    how.add_argument("--epochs", type=int, help=f"most epochs (paper {d.epochs})")
    how.add_argument("--patience", type=int, help=f"early-stopping patience in epochs (paper {d.patience})")
    how.add_argument("--window", type=int, help="sliding-window side for inference (default: whole scans)")
    how.add_argument("--tta", action="store_true", help="test-time mirroring over 8 flips (default off)")
    how.add_argument("--device", help="cpu, cuda or cuda:N (default cuda when available; '' is refused)")
    out = p.add_argument_group("the run")
    out.add_argument("--quick", action="store_true", help="the CPU preset: " + ", ".join(
        f"{f.name}={getattr(QUICK, f.name)}" for f in fields(Protocol) if getattr(QUICK, f.name) != getattr(PAPER, f.name)))
    out.add_argument("--out", help="output folder (default runs/<model>-<channel>-seed<k>[-quick], or "
                                   "runs/table2[-quick] with --table2)")
    out.add_argument("--resume", action="store_true", help="continue an interrupted run from its last.pt")
    out.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out")
    out.add_argument("--table2", action="store_true", help="all 8 cells (or the --channel columns), table2.md/.csv")
    out.add_argument("--seeds", type=seeds_list, help="with --table2: each cell under each seed, e.g. 0,1,2 "
                                                     "(replaces --seed; mean ± sd in table2.md)")
    out.add_argument("--all-channels-row", action="store_true",
                     help="with --table2: one more row, the residual net on all channels stacked (the paper's "
                          "future work, not one of its results)")
    return p


def parse(argv):
    """The command line as (Protocol, the run's options); nothing read or written yet."""
    args = vars(parser().parse_args(argv))
    run = {k: args.pop(k, False) for k in ("quick", "out", "resume", "overwrite", "table2", "seeds",
                                           "all_channels_row")}
    if "channels" in args:
        manifest = str(args.get("data", "")).lower().endswith(".csv")  # may name channels of its own (GADO)
        names = [n.strip() for n in args["channels"].split(",")]
        args["channels"] = data.parse_channels(names, available=names if manifest else None, where="--channel")
    if run["all_channels_row"] and not run["table2"]:
        raise UsageError("--all-channels-row applies to --table2")
    if run["seeds"] and not run["table2"]:
        raise UsageError("--seeds applies to --table2; a single run takes --seed")
    if run["seeds"] and "seed" in args:
        raise UsageError("--seeds replaces --seed; give one of them")
    if run["resume"] and run["overwrite"]:
        raise UsageError("--resume continues a run and --overwrite replaces it; give one of them")
    if run["table2"] and run["resume"]:
        raise UsageError("--resume: --table2 resumes its interrupted cells by itself; rerun the --table2 command")
    if run["table2"] and "model" in args:
        raise UsageError("--model: --table2 trains both networks; leave --model out")
    if "data" in args and not args["data"].strip():
        raise UsageError("--data is empty: expected a dataset folder or a CSV manifest (leave --data out for the "
                         "built-in data)")
    if "data" in args:  # DIR/, DIR, ./DIR and /abs/DIR are the same data, for --resume and reused --table2 cells
        args["data"] = train.data_path(args["data"])
    base = QUICK if run["quick"] else PAPER
    config = Path(run["out"] or "") / "config.json"
    if run["resume"] and not run["table2"] and run["out"] and config.is_file():
        # a resumed run continues with its own settings; those given again must match them
        saved = train.saved_protocol(Path(run["out"]))
        try:
            base = Protocol(**{**saved, "channels": tuple(saved["channels"])})
        except TypeError:  # settings this version does not know
            raise UsageError(f"--resume: {config} records settings this repro.py does not know") from None
    protocol = replace(base, **args)
    for name, model in NETWORK_OPTIONS.items():
        if name in args and not run["table2"] and protocol.model != model:
            raise UsageError(f"--{name.replace('_', '-')} applies to the {MODEL_NAMES[model]} (--model {model}) "
                             f"only; this run trains the {MODEL_NAMES.get(protocol.model, protocol.model)}")
    return protocol, run


def default_out(protocol, quick):
    return f"runs/{protocol.model}-{'+'.join(protocol.channels)}-seed{protocol.seed}{'-quick' if quick else ''}"


# --------------------------------------------------------------------------------------------
# Table 2

def table2(base, run, explicit_channels):
    """Train and test every cell (2 networks x 4 channels, x seeds) into <out>/seed<k>/<model>-<channel>/,
    then write table2.md and table2.csv. A cell with metrics.json is reused, one with last.pt resumed, so
    an interrupted --table2 continues where it stopped. Every cell's settings, folder and data are checked
    before the first cell trains; the table's folder is held (train.lock_folder) until the table is written."""
    out = Path(run["out"] or f"runs/table2{'-quick' if run['quick'] else ''}")
    seeds = run["seeds"] or [base.seed]
    channels = base.channels if explicit_channels else data.CHANNELS
    cells = [(s, m, (c,)) for s in seeds for m in ("unet", "residual") for c in channels]
    if run["all_channels_row"]:  # the paper's future work (§5): every channel at once, the residual net
        cells += [(s, "residual", data.CHANNELS if not base.data else ("all",)) for s in seeds]
    group = train.Group.current()
    train.check_folder(out, "--out", table_files, probe=group.lead)
    plan = []
    for seed, model, stack in cells:
        protocol = replace(base, model=model, channels=stack, seed=seed)
        cell = out / f"seed{seed}" / f"{model}-{'+'.join(stack)}"
        plan.append((protocol, cell, plan_cell(protocol, cell, run["overwrite"], group)))
    loaded = check_data(plan, group)
    train.ACTIVE["table"] = out
    with train.lock_folder(out, "--out") if group.lead else nullcontext():
        train.check_folder(out, "--out", table_files, probe=group.lead)  # again, now that no one else writes
        marked = (out / TABLE_MARKER).exists()
        try:
            if group.lead and not marked:
                train.write_json(out / TABLE_MARKER, TABLE_SCHEMA)
            rows = []
            for protocol, cell, action in plan:
                results = run_cell(protocol, cell, action, run["overwrite"], loaded.get(protocol.channels))
                rows.append({"seed": protocol.seed, "model": protocol.model, "channel": "+".join(results["channels"]),
                             "dsc": results["mean"]["dsc"], "iou": results["mean"]["iou"],
                             "test_scans": len(results["scans"]), "dataset": results["dataset"],
                             "report": f"{cell.relative_to(out)}/report.md"})
            # The whole table is table2.md; a subset of channels or several seeds is named after itself, so that
            # the headline pair with three seeds and the eight cells can share their cells in one folder.
            stem = "table2" + ("" if tuple(channels) == data.CHANNELS else "-" + "+".join(channels)) + \
                ("" if seeds == [0] else "-seeds" + "-".join(map(str, seeds)))
            write_table2(out, stem, rows, seeds, channels)
            draw_fig7(out / f"seed{seeds[0]}", base, channels, loaded.get(("FLAIR",)))
        except BaseException:  # a table that kept no cell leaves its folder as it was
            if group.lead and not marked and {p.name for p in out.iterdir()} <= {TABLE_MARKER, train.LOCK}:
                (out / TABLE_MARKER).unlink()
            raise
    print(f"Table 2 written to {out}/{stem}.md and {stem}.csv")


def table_files(root: Path) -> str | None:
    """What in the --table2 folder ``root`` repro.py did not write there (None: nothing), as
    ``train.run_files`` says it of a run folder: table2.json marks it; its own are the tables
    (table2*.md, table2*.csv), fig7.png, the lock, their temporaries, and the folders seed<k>/<model>-<channels>
    (each checked as a run folder when its cell runs)."""
    marker = train.read_marker(root / TABLE_MARKER, TABLE_SCHEMA)
    if marker is None and os.path.lexists(root / TABLE_MARKER):
        return f"its {TABLE_MARKER} was not written by repro.py"
    def known(name):
        return name in (TABLE_MARKER, train.LOCK) or marker is not None and (
            name == "fig7.png" or re.fullmatch(r"table2(-.+)?\.(md|csv)", name) is not None)
    cell = re.compile(f"({'|'.join(train.MODELS)})-.+")
    for entry in sorted(root.iterdir()):
        if marker is not None and re.fullmatch(r"seed\d+", entry.name) and entry.is_dir() and not entry.is_symlink():
            inner = next((p for p in sorted(entry.iterdir())
                          if not (cell.fullmatch(p.name) and p.is_dir() and not p.is_symlink())), None)
            if inner is not None:
                return f"{entry.name}/{inner.name} was not written by repro.py"
        elif not train.own_file(entry, known):
            return (f"{entry.name} was not written by repro.py" if marker is not None else
                    f"it holds {entry.name} and no {TABLE_MARKER} of a --table2 run of repro.py")
    return None


def plan_cell(protocol, cell, overwrite, group) -> str:
    """How one cell will run, checked before any cell trains: "reuse" (finished, same settings), "resume"
    (interrupted, same settings) or "train"; a cell run with other settings is refused."""
    train.check_protocol(protocol, group)
    if (cell / "metrics.json").exists() and not overwrite:
        action = "reuse"
        train.check_folder(cell, "--out", train.run_files, probe=group.lead)
    else:
        action = "resume" if (cell / "last.pt").exists() and not overwrite else "train"
        train.check_out(cell, action == "resume", overwrite, group)
    if action != "train":
        old = train.saved_protocol(cell)
        changed = [k for k in train.SAME_ON_RESUME if old.get(k) != asdict(protocol)[k] and k != "channels"]
        if changed or tuple(old["channels"]) != protocol.channels:
            raise UsageError(f"{cell} holds a cell run with other settings ({', '.join(changed) or 'channels'}); "
                             "pass --overwrite to rerun it, or choose another --out")
    return action


def check_data(plan, group):
    """The data of every cell that will train or resume, read and checked before the first cell: its
    channels, its scans, the split, the sizes each network needs, and for a resumed cell that its split
    and data files are those it was run with. Each set of channels is read once; returns them by channels
    (``train.load_scans``'s results), so that the cells train on what was read here."""
    by_channels = {}
    for protocol, cell, action in plan:
        if action != "reuse":
            by_channels.setdefault(protocol.channels, []).append((protocol, cell, action))
    loaded = {}
    for channels, same in by_channels.items():
        scans, dataset, fingerprint = loaded[channels] = train.load_scans(same[0][0])
        for protocol, cell, action in same:
            split_ids, _ = train.split_and_check(protocol, scans, group)
            if action == "resume":
                device = train.check_protocol(protocol, group)
                train.check_resume(cell, train.run_config(protocol, scans, dataset, fingerprint, split_ids, device,
                                                          group))
    return loaded


def draw_fig7(root, base, channels, loaded=None):
    """Fig. 7 as the paper draws it: both networks' test predictions on FLAIR, side by side. The cells
    may come from an earlier run, so their masks are read back from predictions/ into the scans' grid;
    the scans are ``loaded`` (``train.load_scans``'s results) when the table read them already."""
    cells = {MODEL_NAMES[m]: root / f"{m}-FLAIR" for m in ("residual", "unet")}
    if "FLAIR" not in channels or not all((c / "metrics.json").exists() for c in cells.values()):
        return
    protocol = replace(base, channels=("FLAIR",))
    test_ids = json.loads((cells[MODEL_NAMES["residual"]] / "metrics.json").read_text())["split_ids"]["test"]
    scans = [s for s in (loaded or train.load_scans(protocol))[0] if s.id in test_ids]
    masks = {name: {s.id: s.geometry.apply(np.asarray(nib.load(cell / "predictions" / f"{s.id}_pred.nii.gz")
                                                      .dataobj), order=0) for s in scans}
             for name, cell in cells.items()}
    figures.slices(root.parent / "fig7.png", scans, masks, "FLAIR")


def run_cell(protocol, cell, action, overwrite, loaded=None):
    """One cell, as ``plan_cell`` planned it: its metrics read back, or the cell trained (or resumed) on the
    scans ``check_data`` ``loaded``."""
    if action == "reuse":
        return json.loads((cell / "metrics.json").read_text())
    return train.train(protocol, cell, resume=action == "resume", overwrite=overwrite, loaded=loaded)


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_table2(out, stem, rows, seeds, channels):
    """<stem>.md (ours beside the paper's: mean ± sd over seeds and each seed's value; the findings, judged by
    VERDICT_RULE) and <stem>.csv (one row per cell and seed: the numbers the findings are computed from)."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["channel"]), []).append(r)
    fmt = lambda m, s: f"{m:.4f} ± {s:.4f}" if len(seeds) > 1 else f"{m:.4f}"  # noqa: E731
    lines = ["# Table 2: test DSC and IoU, ours beside the paper's", "",
             f"Ours: {'; '.join(sorted({r['dataset'] for r in rows}))}; seeds {', '.join(map(str, seeds))} "
             f"(mean ± sample sd over {len(seeds)} seed{'s' * (len(seeds) > 1)}), each scan scored in its own grid. "
             "Paper: ISBI 2015 training data, scan-level 17:2:2 split, one run.", "",
             "| model | channel | paper DSC | our DSC | per seed | paper IoU | our IoU | test scans | report |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (model, channel), cell in by.items():
        dsc, iou = mean_sd([r["dsc"] for r in cell]), mean_sd([r["iou"] for r in cell])
        paper = [f"{v:.4f}" for v in PAPER_TABLE2[(model, channel)]] if (model, channel) in PAPER_TABLE2 else \
            ["future work (§5), not in the paper"] * 2
        lines.append(f"| {MODEL_NAMES[model]} | {channel} | {paper[0]} | {fmt(*dsc)} | "
                     f"{', '.join(format(r['dsc'], '.3f') for r in cell)} | {paper[1]} | {fmt(*iou)} | "
                     f"{cell[0]['test_scans']} | " + " ".join(f"[seed {r['seed']}]({r['report']})" for r in cell) + " |")
    per_seed = {key: {r["seed"]: r["dsc"] for r in cell} for key, cell in by.items()}
    lines += ["", "## The paper's findings, on our data", "", VERDICT_RULE, "", *findings(per_seed, channels)]
    infer.atomic(out / f"{stem}.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    train.write_csv(out / f"{stem}.csv", rows)


VERDICT_LEVEL = 0.95
VERDICT_RULE = (
    "Each finding is judged on its test DSC difference per seed, signed so that the paper's claim is positive. "
    "One seed draws the split, the initial weights, the patches and the augmentation of both cells alike, so "
    f"each seed gives one paired difference. The finding **holds** when the two-sided {VERDICT_LEVEL:.0%} paired "
    f"t interval of the mean difference (mean ± t({(1 + VERDICT_LEVEL) / 2:g}, n - 1) × sd / √n over n seeds) lies "
    "above 0, **does not hold** when it lies below 0, and is **undecided** when it contains 0. One seed gives no "
    "interval: no verdict.")
"""The one rule by which table2.md judges the paper's findings, printed there and quoted in docs/results.md
(which says why this rule); ``judge`` applies it at ``VERDICT_LEVEL``."""


def judge(differences, level=VERDICT_LEVEL):
    """VERDICT_RULE on one finding's per-seed differences (signed so that the paper's claim is positive):
    (verdict, the two-sided ``level`` Student's t interval of their mean, or None for a single seed)."""
    n = len(differences)
    if n < 2:
        return "one seed: cannot judge", None
    mean, sd = mean_sd(differences)
    half = stats.t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    interval = (float(mean - half), float(mean + half))
    verdict = "holds" if interval[0] > 0 else "does not hold" if interval[1] < 0 else "undecided"
    return verdict, interval


def findings(per_seed, channels):
    """The paper's two findings (§4.3), each judged by VERDICT_RULE on differences paired by seed, beside the
    paper's own difference. ``per_seed``: {(model, channel): {seed: test DSC}}."""
    lines = []
    for model in ("residual", "unet"):
        cells = {c: per_seed[(model, c)] for c in channels if (model, c) in per_seed}
        if "FLAIR" not in cells or len(cells) < 2:
            continue
        others = [c for c in cells if c != "FLAIR"]
        runner = max(others, key=lambda c: statistics.mean(cells[c].values()))
        lines.append(finding(f"FLAIR is the best channel for the {MODEL_NAMES[model]}",
                             f"FLAIR minus the runner-up, {runner} (the best other channel by mean DSC)",
                             cells["FLAIR"], cells[runner], paper_runner_up(model, others)))
    if ("residual", "FLAIR") in per_seed and ("unet", "FLAIR") in per_seed:
        ours, theirs = PAPER_TABLE2[("residual", "FLAIR")][0], PAPER_TABLE2[("unet", "FLAIR")][0]
        lines.append(finding("The residual net beats the plain one on FLAIR",
                             "Residual 3D U-Net minus 3D U-Net on FLAIR", per_seed[("residual", "FLAIR")],
                             per_seed[("unet", "FLAIR")], f"{ours:.4f} − {theirs:.4f} = {ours - theirs:+.4f}"))
    return lines or ["- Too few cells ran to judge either finding."]


def paper_runner_up(model, others):
    """The paper's FLAIR minus its best of the ``others`` channels, for the network ``model`` (Table 2)."""
    known = [c for c in others if (model, c) in PAPER_TABLE2]
    if not known:
        return f"none of {', '.join(others)} is in Table 2"
    best = max(known, key=lambda c: PAPER_TABLE2[(model, c)][0])
    flair, second = PAPER_TABLE2[(model, "FLAIR")][0], PAPER_TABLE2[(model, best)][0]
    return f"FLAIR {flair:.4f} − {best} {second:.4f} = {flair - second:+.4f}"


def finding(claim, what, first, second, paper):
    """One finding's line: ``first`` minus ``second`` ({seed: DSC}, paired on their common seeds), its
    verdict, mean, sample sd, signs and interval, and the paper's difference (one run of each)."""
    seeds = sorted(set(first) & set(second))
    differences = [first[s] - second[s] for s in seeds]
    verdict, interval = judge(differences)
    each = ", ".join(f"{d:+.4f} (seed {s})" for s, d in zip(seeds, differences))
    if interval is None:
        return f"- {claim}: **{verdict}**. {what}: {each}. Paper, one run: {paper}."
    mean, sd = mean_sd(differences)
    signs = " ".join("+" if d > 0 else "-" if d < 0 else "0" for d in differences)
    return (f"- {claim}: **{verdict}**. {what}, per seed: {each}; mean {mean:+.4f}, sd {sd:.4f}, signs {signs}, "
            f"{VERDICT_LEVEL:.0%} interval [{interval[0]:+.4f}, {interval[1]:+.4f}]. Paper, one run: {paper}.")


# --------------------------------------------------------------------------------------------
# predict

def predict_parser():
    p = Parser(
        prog="repro.py predict", description="Segment new scans with a trained model. Each scan is read as in "
        "training: reoriented to RAS, resampled to the checkpoint's voxel size (unless --no-resample), cropped to "
        "its non-zero brain and z-normalised; it should be skull-stripped like the training data. The mask comes "
        "back in the input's own grid, orientation, affine and header, with a table of its lesions (connected "
        "components) beside it; a BIDS dataset as --input gives a BIDS derivatives dataset as --output.")
    p.add_argument("--checkpoint", required=True, help="best.pt (or last.pt) written by a training run")
    p.add_argument("--input", required=True, nargs="+", metavar="SCAN",
                   help="NIfTI or NRRD files, or one folder of them, or a BIDS dataset (a folder with "
                        "dataset_description.json); a multi-channel model takes one file per channel in its order, "
                        "or a CSV manifest with one column per channel")
    p.add_argument("--output", required=True,
                   help="the mask, NIfTI, for one scan; a folder for several (masks named <input>_mask.nii.gz, "
                        "summary.csv) or for a BIDS dataset's derivatives")
    p.add_argument("--participant-label", "--participant_label", dest="participants", nargs="+", metavar="LABEL",
                   help="with a BIDS dataset: only these subjects (with or without sub-); the BIDS Apps spelling "
                        "--participant_label works too")
    p.add_argument("--model", choices=sorted(MODEL_NAMES), help="check that the checkpoint holds this model")
    p.add_argument("--threshold", type=float, default=0.5, help="on the sigmoid, in (0, 1) (default 0.5)")
    p.add_argument("--min-lesion-size", type=float, default=0.0, metavar="MM3",
                   help="drop lesions smaller than this many mm³ from the mask and the tables (default 0: keep "
                        "every lesion)")
    p.add_argument("--window", type=int, help="sliding-window side in voxels (default: whole scan)")
    p.add_argument("--tta", action="store_true", help="average the logits over the 8 mirrorings (nnU-Net's TTA)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write the sigmoid as float32 NIfTI (<mask>_prob.nii.gz)")
    p.add_argument("--lesion-map", action="store_true",
                   help="also write the labelled lesion mask, each lesion its number in the table "
                        "(<input>_lesions.nii.gz)")
    p.add_argument("--qc", action="store_true", help="also write a picture to check each result (<input>_qc.png)")
    p.add_argument("--no-resample", dest="resample", action="store_false",
                   help="predict at the scan's own voxel size, not the checkpoint's")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 (default bf16 where supported)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cuda when available)")
    return p


def predict(argv):
    """The predict command. Its output folder (the folder of --output for one scan) is held with
    train.lock_folder while masks are written: one writer per folder."""
    args = predict_parser().parse_args(argv)
    device = train.resolve_device(args.device)
    output = Path(args.output)
    folder = output.parent if output.name.endswith((".nii", ".nii.gz")) else output
    if folder.is_dir():
        train.check_unlocked(folder, "--output")
    model, config = infer.load_model(args.checkpoint, device)
    if args.model:
        if config["network"]["name"] != args.model:
            raise UsageError(f"--checkpoint {args.checkpoint} holds a {MODEL_NAMES[config['network']['name']]}, "
                             f"not a {MODEL_NAMES[args.model]}")
    if args.window is not None:
        smallest = train.MODELS[config["network"]["name"]].min_side
        if args.window < smallest:
            raise UsageError(f"--window must be at least {smallest} voxels for this network, got {args.window}")
    train.ACTIVE["predict"] = folder
    with train.lock_folder(folder, "--output"):
        return infer.predict(model, config, args.input, args.output, args.threshold, args.window, args.tta,
                             args.save_probabilities, args.resample, args.overwrite, args.amp, device,
                             min_lesion_size=args.min_lesion_size, lesion_map=args.lesion_map, qc=args.qc,
                             participants=args.participants, checkpoint=args.checkpoint)


# --------------------------------------------------------------------------------------------
# Entry point

def make_deterministic():
    """Same --seed, same machine, same result: cuDNN's autotuner and atomics-based kernels off on CUDA.
    Process-wide, so set once here at the entry point and never inside the library functions."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def keep_freed_memory():
    """Keep freed memory in the process instead of handing it back to the kernel. Every training step and
    every whole-scan prediction frees and reallocates the same large activations (a 1 mm scan's are
    hundreds of MB); glibc serves blocks over 32 MB with mmap and returns them with munmap, so each call
    faults every page in again; kept in the heap, they are reused from the third call on (docs/performance.md
    has the counts and the command). Process-wide, so set here at the entry point only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-4, 0)          # M_MMAP_MAX = 0: large blocks come from the heap and are reused
    libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD: return heap memory only past 1 GB of free top


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    train.ACTIVE.clear()
    previous = signal.signal(signal.SIGTERM, terminate)  # SIGTERM ends the command as Ctrl-C does
    make_deterministic()
    keep_freed_memory()
    protocol, group = None, train.Group()
    try:
        if argv[:1] == ["predict"]:
            return predict(argv[1:])
        protocol, run = parse(argv)
        group = train.start_group(protocol.device)  # a process group under torchrun only
        if run["table2"]:
            table2(protocol, run, explicit_channels="--channel" in argv)
        else:
            out = run["out"] or default_out(protocol, run["quick"])
            train.train(protocol, out, resume=run["resume"], overwrite=run["overwrite"])
    except (UsageError, data.DataError) as e:
        run = train.ACTIVE.get("out")  # set while a run writes its folder: say what it left
        return fail(group, f"error: {e}" + (f"; {stopped(run)}" if run else ""), 2)
    except train.Diverged as e:
        run = train.ACTIVE.get("out")
        return fail(group, f"error: {run}: {e}" + (f"; {stopped(run, resume=False)}" if run else "") +
                    f". Try a lower --lr (this run: {protocol.lr:g}).", 1)
    except KeyboardInterrupt as stop:
        return fail(group, interrupted_message(stop), exit_status(stop))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if group.world > 1:
            torch.distributed.destroy_process_group()
    return 0


def fail(group, message, status):
    """One line on stderr (from rank 0 only under torchrun) and the exit status."""
    if group.lead:
        print(message, file=sys.stderr)
    return status


def saved_epochs(run) -> int:
    """How many epochs the run folder ``run`` holds: none without last.pt, else history.csv's rows."""
    run = Path(run)
    if not (run / "last.pt").exists():
        return 0
    history = run / "history.csv"
    return max(len(history.read_text().splitlines()) - 1 if history.exists() else 0, 1)


def stopped(run, resume=True) -> str:
    """What a run that stopped left in its folder (train.open_run keeps it only from the first saved epoch),
    and the command that continues it."""
    epochs = saved_epochs(run)
    if not epochs:
        return f"no epoch of {run} had been saved, so the files the run had written there were removed"
    if not resume:
        return f"{run} was last saved after epoch {epochs} (best.pt, last.pt and history.csv are kept)"
    return f"{run} was last saved after epoch {epochs}; continue with: python repro.py --out {run} --resume"


def interrupted_message(stop):
    """What an interrupted command (Ctrl-C or SIGTERM) leaves behind, truthfully, and how to go on."""
    if isinstance(stop, infer.Interrupted):  # predict names every file it wrote whole
        return f"{stop} (in {train.ACTIVE['predict']})"
    output = train.ACTIVE.get("predict")
    if output is not None:
        return f"interrupted before predict wrote anything into {output}"
    run, table = train.ACTIVE.get("out"), train.ACTIVE.get("table")
    again = f"; the same --table2 command continues {table} (its finished cells are reused)" if table else ""
    if run is None:
        return f"interrupted{again}" if table else NOTHING_STARTED
    return f"interrupted: {stopped(run)}{again}"


if __name__ == "__main__":
    sys.exit(main())
