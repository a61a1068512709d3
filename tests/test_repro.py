import csv
import json
from pathlib import Path

import pytest

import repro
import train
from conftest import TINY

ONE_EPOCH = [*TINY, "--epochs", "1"]


def test_table2_with_two_seeds_writes_every_cell_the_spread_and_the_findings(dataset, tmp_path, monkeypatch):
    out = tmp_path / "table"
    calls = []
    real_train = train.train

    def interrupt_the_third_cell(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train, "train", interrupt_the_third_cell)
    argv = ["--table2", "--seeds", "0,1", "--data", str(dataset), "--out", str(out), *ONE_EPOCH]
    assert repro.main(argv) == 130
    monkeypatch.setattr(train, "train", real_train)
    assert repro.main(argv) == 0  # the two finished cells are reused, the rest trained
    for seed in (0, 1):
        for model in ("unet", "residual"):
            for channel in ("FLAIR", "MPRAGE", "T2W", "PDW"):
                cell = out / f"seed{seed}" / f"{model}-{channel}"
                assert (cell / "metrics.json").is_file() and (cell / "report.md").is_file(), cell
    rows = list(csv.DictReader(open(out / "table2-seeds0-1.csv")))
    assert len(rows) == 16 and {r["seed"] for r in rows} == {"0", "1"}
    table = (out / "table2-seeds0-1.md").read_text()
    flair = [r for r in rows if r["model"] == "residual" and r["channel"] == "FLAIR"]
    mean = (float(flair[0]["dsc"]) + float(flair[1]["dsc"])) / 2
    assert f"| Residual 3D U-Net | FLAIR | 0.7068 | {mean:.4f} ± " in table
    assert "FLAIR is the best channel for the Residual 3D U-Net: **" in table
    assert "FLAIR is the best channel for the 3D U-Net: **" in table
    assert "The residual net beats the plain one on FLAIR: **" in table and "2 seeds" in table
    assert repro.VERDICT_RULE in table
    dsc = {(r["model"], r["channel"], int(r["seed"])): float(r["dsc"]) for r in rows}
    for seed in (0, 1):  # the findings are computed from the rows of the CSV, paired by seed
        difference = dsc[("residual", "FLAIR", seed)] - dsc[("unet", "FLAIR", seed)]
        assert f"{difference:+.4f} (seed {seed})" in table.split("The residual net beats")[1]
    assert "(seed0/residual-FLAIR/report.md)" in table
    assert (out / "fig7.png").is_file()  # both networks on FLAIR, read back from the cells' predictions
    seeds = {json.loads((out / f"seed{s}" / "residual-FLAIR" / "config.json").read_text())["protocol"]["seed"]
             for s in (0, 1)}
    assert seeds == {0, 1}


def test_table2_refuses_a_finished_cell_of_other_settings(dataset, tmp_path, capsys):
    out = tmp_path / "table"
    assert repro.main(["--table2", "--channel", "FLAIR", "--data", str(dataset), "--out", str(out), *ONE_EPOCH]) == 0
    assert len(list(csv.DictReader(open(out / "table2-FLAIR.csv")))) == 2
    assert repro.main(["--table2", "--channel", "FLAIR", "--data", str(dataset), "--out", str(out), *ONE_EPOCH,
                       "--lr", "0.01"]) == 2
    assert "other settings (lr)" in capsys.readouterr().err


def test_help_names_every_flag_predict_and_the_cache(capsys):
    with pytest.raises(SystemExit):
        repro.main(["--help"])
    text = capsys.readouterr().out
    assert "repro.py predict" in text and "RESUNET_CACHE" in text
    for action in repro.parser()._actions:
        assert action.help, action.option_strings
    for action in repro.predict_parser()._actions:
        assert action.help, action.option_strings


def test_the_quick_preset_gives_both_networks_the_same_settings():
    assert train.QUICK.base_filters is None  # each network's own width, as in the paper
    protocols = [repro.parse(["--quick", "--model", m])[0] for m in ("unet", "residual")]
    a, b = ({k: v for k, v in vars(p).items() if k != "model"} for p in protocols)
    assert a == b


def test_the_verdict_rule_on_known_differences():
    t = 4.302652729911275  # Student's t, 0.975 quantile, 2 degrees of freedom
    verdict, (low, high) = repro.judge([0.02, 0.03, 0.025])
    half = t * 0.005 / 3 ** 0.5  # the mean 0.025 and the sample sd 0.005 of the three differences
    assert verdict == "holds" and (low, high) == pytest.approx((0.025 - half, 0.025 + half))
    assert repro.judge([-0.02, -0.03, -0.025])[0] == "does not hold"
    assert repro.judge([-0.036, 0.031, 0.019])[0] == "undecided"  # signs split, mean inside the noise
    assert repro.judge([0.001, 0.05, 0.1])[0] == "undecided"  # every sign positive is not enough with 3 seeds
    assert repro.judge([0.001, 0.05, 0.1] * 3)[0] == "holds"  # the same spread over 9 seeds is clear of 0
    assert repro.judge([0.06]) == ("one seed: cannot judge", None)


def test_findings_pair_by_seed_against_the_runner_up_beside_the_papers_difference():
    per_seed = {("residual", "FLAIR"): {0: 0.70, 1: 0.72, 2: 0.71}, ("unet", "FLAIR"): {0: 0.60, 1: 0.61, 2: 0.62},
                ("residual", "T2W"): {0: 0.60, 1: 0.61, 2: 0.63}, ("unet", "T2W"): {0: 0.80, 1: 0.55, 2: 0.56},
                ("residual", "PDW"): {0: 0.50, 1: 0.52, 2: 0.51}, ("unet", "PDW"): {0: 0.70, 1: 0.70, 2: 0.70}}
    residual, unet, headline = repro.findings(per_seed, ("FLAIR", "T2W", "PDW"))
    assert residual.startswith("- FLAIR is the best channel for the Residual 3D U-Net: **holds**.")
    assert "runner-up, T2W" in residual and "+0.1000 (seed 0), +0.1100 (seed 1), +0.0800 (seed 2)" in residual
    assert "signs + + +" in residual and "FLAIR 0.7068 − T2W 0.5177 = +0.1891" in residual
    # the runner-up is the best other channel by mean (PDW), not at each seed (T2W wins seed 0)
    assert unet.startswith("- FLAIR is the best channel for the 3D U-Net: **does not hold**.")
    assert "runner-up, PDW" in unet
    assert "-0.1000 (seed 0), -0.0900 (seed 1), -0.0800 (seed 2)" in unet and "signs - - -" in unet
    assert "FLAIR 0.6470 − T2W 0.5637 = +0.0833" in unet  # the paper's own runner-up for its 3D U-Net
    assert headline.startswith("- The residual net beats the plain one on FLAIR: **holds**.")
    assert "mean +0.1000, sd 0.0100" in headline and "0.7068 − 0.6470 = +0.0598" in headline
    one = repro.findings({k: {0: v[0]} for k, v in per_seed.items()}, ("FLAIR", "T2W", "PDW"))
    assert all("**one seed: cannot judge**" in line and "interval" not in line for line in one)
    assert "+0.1000 (seed 0)" in one[2]


def test_the_docs_state_the_verdict_rule_the_code_applies():
    results = (Path(__file__).resolve().parent.parent / "docs" / "results.md").read_text()
    assert repro.VERDICT_RULE in " ".join(word for word in results.split() if word != ">")  # a block quote
