import csv
import json

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
