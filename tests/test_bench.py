"""bench.py's augment command runs end to end on small volumes (no timing is asserted: speed goes
in the benchmark, never in a test)."""

import bench


def test_augment_counts_and_profile_print_their_tables(capsys):
    bench.main(['augment', '--quick', '--counts'])
    counts = capsys.readouterr().out
    rows = [line for line in counts.splitlines() if line.startswith('| pipeline 48x48x48 | 1 |')]
    assert len(rows) == 1
    ops_b1, ops_b8 = (float(cell) for cell in rows[0].split('|')[3:5])
    assert ops_b1 == ops_b8 <= 50
    bench.main(['augment', '--quick', '--profile', '--repeats', '1'])
    profile = capsys.readouterr().out
    assert 'aten::grid_sampler_3d' in profile and 'ms per call' in profile
