"""bench.py's commands run end to end at tiny sizes and print or write what they promise (no speed is
asserted: speed goes in the benchmark, never in a test)."""

import shutil

import pytest
import torch

import bench


@pytest.fixture(autouse=True)
def threads():
    """bench.py sets the process's thread count, as a benchmark must; the tests after these run as before."""
    count = torch.get_num_threads()
    yield
    torch.set_num_threads(count)


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


def table_rows(text, first_cells):
    """The markdown rows of ``text`` whose first cell is one of ``first_cells``, as lists of cells."""
    rows = [[cell.strip() for cell in line.split('|')[1:-1]] for line in text.splitlines() if line.startswith('| ')]
    return [row for row in rows if row[0] in first_cells]


def test_train_quick_races_ours_against_plain_for_each_network(capsys):
    bench.main(['train', '--quick'])
    out = capsys.readouterr().out
    assert 'CPU:' in out and 'load average' in out and 'torch threads 1' in out
    header = next(line for line in out.splitlines() if line.startswith('| network |'))
    columns = [cell.strip() for cell in header.split('|')[1:-1]]
    rows = {(row[0], row[1]): dict(zip(columns, row)) for row in table_rows(out, bench.NETWORKS)}
    assert set(rows) == {(name, form) for name in bench.NETWORKS for form in ('plain', 'ours')}
    for name in bench.NETWORKS:
        plain, ours = rows[name, 'plain'], rows[name, 'ours']
        assert plain['speed-up (wall)'] == '1.00x'
        assert float(ours['speed-up (wall)'].rstrip('x')) > 0 and float(ours['speed-up (CPU)'].rstrip('x')) > 0
        assert float(ours['GFLOP (fwd + bwd)']) == float(plain['GFLOP (fwd + bwd)']) > 0
        assert float(ours['TFLOP/s']) > 0
        # the same weights, patch and dropout draws: the forms' first losses agree to bf16's precision
        assert abs(float(ours['loss, first step']) - float(plain['loss, first step'])) < 1e-2


def test_gpu_quick_writes_every_section_of_its_report(tmp_path, capsys):
    report = tmp_path / 'report.md'
    bench.main(['gpu', '--quick', '--report', str(report)])
    text = report.read_text()
    for title in ('Tests that need CUDA', 'Augmentation', 'Training step: ours against plain',
                  'Training: a slice of an epoch with augmentation', 'Validation: one whole scan',
                  'Projected wall time of python repro.py --table2'):
        assert f'## {title}' in text
    assert 'not measured (' not in text  # no section failed
    tests = text.split('## Tests that need CUDA')[1].split('##')[0]
    assert ' passed' in tests or ' skipped' in tests
    augmentation = table_rows(text, ('32x32x32', '48x48x48'))
    assert {(row[0], row[1]) for row in augmentation} == {(s, b) for s in ('32x32x32', '48x48x48') for b in '18'}
    assert all(float(row[2]) > 0 for row in augmentation)  # ours eager, ms per patch
    if not torch.cuda.is_available():
        assert 'no GPU figure was measured' in text
        assert all(row[3] == 'n/a' for row in augmentation)  # the CUDA graph needs CUDA
    race = table_rows(text.split('## Training step')[1].split('##')[0], bench.NETWORKS)
    assert [(row[0], row[1]) for row in race] == [(n, f) for n in bench.NETWORKS for f in ('plain', 'ours')]
    assert all(float(row[4].rstrip('x')) > 0 and float(row[7]) > 0 for row in race)  # speed-up, TFLOP/s
    training = table_rows(text.split('## Training: a slice')[1].split('##')[0], bench.NETWORKS)
    assert [(row[0], row[1]) for row in training] == [(n, p) for n in bench.NETWORKS for p in ('bf16', 'fp32')]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in training)  # step ms, TFLOP/s
    assert len(table_rows(text.split('## Validation')[1].split('##')[0], bench.NETWORKS)) == 2
    assert '`python repro.py --table2`: at most ' in text
    # a report is never overwritten: a second run stops before measuring anything
    before = report.read_text()
    with pytest.raises(SystemExit) as stop:
        bench.main(['gpu', '--quick', '--report', str(report)])
    assert stop.value.code == 2 and report.read_text() == before
    assert '--report' in capsys.readouterr().err


def test_parser_lists_every_subcommand():
    commands = next(a for a in bench.parser()._actions if a.dest == 'command').choices
    assert set(commands) == {'augment', 'model', 'train', 'gpu'}
    assert '--time' not in commands['model'].format_help()
