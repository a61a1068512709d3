"""Fixtures shared by the end-to-end tests: one tiny phantom dataset and one finished tiny run."""
import pytest

import phantom
import repro

# A tiny network and short run: every end-to-end test trains in seconds on two CPU cores.
TINY = ["--epochs", "2", "--patch-size", "32", "--patches-per-scan", "2", "--base-filters", "4", "--device", "cpu"]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """3 subjects x 2 time points of the built-in phantom at 4 mm (46 x 55 x 46 voxels)."""
    root = tmp_path_factory.mktemp("phantom")
    return phantom.generate(root, seed=0, spacing=4.0, subjects=3, timepoints=(2, 2, 2), progress=False)


@pytest.fixture(scope="session")
def finished(dataset, tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert repro.main(["--data", str(dataset), "--out", str(out), *TINY]) == 0
    return out
