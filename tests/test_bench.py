"""bench.py's augment command runs end to end on small volumes (no timing is asserted: speed goes
in the benchmark, never in a test)."""

import shutil

import pytest
import torch

import bench


def test_augment_counts_and_profile_print_their_tables(capsys):
    bench.main(['augment', '--quick', '--counts'])
    counts = capsys.readouterr().out
    rows = [line for line in counts.splitlines() if line.startswith('| pipeline 48x48x48 | 1 |')]
    assert len(rows) == 1
    ops_b1, ops_b8 = (float(cell) for cell in rows[0].split('|')[3:5])
    assert ops_b1 == ops_b8 <= 50
    # the pipeline's bytes by op add up to its total, and name the resampling
    head = next(line for line in counts.splitlines() if line.startswith("the pipeline's ops by name"))
    by_op = counts.split(head)[1].split('\n\n')[1].splitlines()[2:]
    assert any(line.startswith('| grid_sampler_3d |') for line in by_op)
    total = float(head.split(' ops, ')[1].split(' bytes')[0])
    assert abs(sum(float(line.split('|')[3]) for line in by_op) - total) <= 0.1 * len(by_op) + 1
    assert sum(int(line.split('|')[2]) for line in by_op) == int(head.split('(')[1].split(' ops')[0])
    bench.main(['augment', '--quick', '--profile', '--repeats', '1'])
    profile = capsys.readouterr().out
    assert 'aten::grid_sampler_3d' in profile and 'ms per call' in profile


@pytest.mark.skipif(shutil.which('c++') is None and shutil.which('g++') is None,
                    reason="inductor's CPU code needs a C++ compiler")
@pytest.mark.filterwarnings('ignore::UserWarning')
def test_augment_compile_gives_time_and_bytes_of_both(capsys):
    """Inductor's byte count comes from a private metrics log: a torch that renames it would give 0."""
    torch._dynamo.reset()
    bench.main(['augment', '--quick', '--compile', '--repeats', '1'])
    torch._dynamo.reset()
    rows = {line.split('|')[1].strip(): line.split('|')[2:4] for line in capsys.readouterr().out.splitlines()
            if line.startswith(('| eager |', '| compiled |'))}
    assert set(rows) == {'eager', 'compiled'}
    assert all(float(ms) > 0 and 50 < float(moved) < 2000 for ms, moved in rows.values())
