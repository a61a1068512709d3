"""Benchmarks of the project's building blocks.

    python bench.py augment [--device cpu|cuda] [--repeats N] [--quick] [--threads N] [--counts | --profile | --compile]
    python bench.py model [--size 144] [--time] [--device cpu|cuda] [--repeats N]

``augment`` first counts, for each of the paper's six augmentations and the whole pipeline
(TorchIO's default parameters, the flip always happening), the device ops one call dispatches
and the bytes they move per voxel: the call runs on ``meta`` tensors with a CPU generator under
a ``TorchDispatchMode``, where every non-view op on a meta tensor is one kernel on a GPU
(``_unsafe_view``, with which matmul reshapes its result, is a view: no kernel) and host
arithmetic on CPU tensors is not counted; bytes are the inputs and outputs of those ops, each
storage once per op, counting the span of memory a view covers (not the whole storage it
belongs to). Counts are given at p = 1 and at the pipeline's p = 0.5 (there the mean over 20
seeds), at B = 1 and B = 8, and for the optional one-resampling AffineElasticDeformation, then
the pipeline's bytes by op (``--counts`` stops there: it costs seconds, not minutes). Then it
times one 144^3 patch + label and one 181x217x181 volume + label: ours (augment.py) on the CPU,
TorchIO 1.2.1 and MONAI on the CPU in the same run, and ours on CUDA when present, one volume
at a time and as a batch of 8. Each figure at p = 1 is the median of ``--repeats`` calls after
one warm-up call; at p = 0.5 (pipeline only), where calls differ by what they draw, the mean
of ``4 * repeats`` calls. The load average is printed before and after each table: on a shared
machine, multi-threaded eager torch code (ours, MONAI) slows down far more than the load alone
suggests, because every parallel op waits for its slowest thread. The process keeps freed
memory as training does (``repro.keep_freed_memory``). ``--profile`` instead shows where our
pipeline's time goes on one 144^3 call (``torch.profiler``, self time per op), and
``--compile`` times its device part eager against ``torch.compile`` and gives the bytes per
voxel of each.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
import math
import os
import platform
import statistics
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import augment
import repro

TRANSFORMS = ('Flip', 'Motion', 'BiasField', 'Noise', 'Affine', 'ElasticDeformation', 'pipeline')
# Counted only: TorchIO 1.2.1 and MONAI have no single-resampling affine + elastic to time against,
# and the training call's numeric background (no minimum to reduce) changes the bytes, not the race.
COUNTED = TRANSFORMS[:-1] + ('AffineElasticDeformation', 'pipeline', 'pipeline, background 0',
                             'pipeline, one resampling')


def machine() -> list[str]:
    """CPU model, cores, GPU, versions and thread counts, one line each."""
    cpu = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            cpu = next(line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    lines = [f'CPU: {cpu}, {os.cpu_count()} logical cores, load average {load()}',
             f'GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}',
             f'torch {torch.__version__}, torch threads {torch.get_num_threads()}']
    try:
        import SimpleITK
        import torchio
        lines.append(f'torchio {torchio.__version__}, SimpleITK threads '
                     f'{SimpleITK.ProcessObject.GetGlobalDefaultNumberOfThreads()}')
    except ImportError:
        lines.append('torchio not installed')
    try:
        import monai
        lines.append(f'monai {monai.__version__}')
    except ImportError:
        lines.append('monai not installed')
    return lines


def load() -> str:
    return ' '.join(f'{value:.2f}' for value in os.getloadavg())


def median_seconds(call, repeats: int, cuda: bool = False, statistic=statistics.median) -> float:
    """Median (or ``statistic``) wall time of ``call()`` over ``repeats`` runs, after one warm-up run."""
    times = []
    for run in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        if run:
            times.append(time.perf_counter() - start)
    return statistic(times)


# ---------------------------------------------------------------------------------------------
# augment

# Ops that return a view of their input without being marked as views: no kernel runs (matmul
# reshapes its bmm result with one).
ALIASES = {torch.ops.aten._unsafe_view.default}


class DeviceOps(TorchDispatchMode):
    """Count the non-view ops that touch a tensor on ``device_type`` (on meta, one op is one GPU
    kernel), the bytes they read and write (each storage once per op, the span its views cover),
    and the largest tensor an op writes."""

    def __init__(self, device_type: str = 'meta'):
        super().__init__()
        self.device_type = device_type
        self.ops, self.bytes, self.largest = 0, 0, 0
        self.by_op = collections.defaultdict(lambda: [0, 0])  # op name -> [calls, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor) and t.device.type == self.device_type]
        if func.is_view or func in ALIASES or not tensors:
            return out
        spans = {}
        for t in tensors:
            extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
            key = t.untyped_storage()._cdata
            spans[key] = max(spans.get(key, 0), min(extent * t.element_size(), t.untyped_storage().nbytes()))
        self.ops += 1
        self.bytes += sum(spans.values())
        entry = self.by_op[func.overloadpacket.__name__]
        entry[0] += 1
        entry[1] += sum(spans.values())
        self.largest = max([self.largest] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def device_ops(transform, batch: int, shape, seed: int = 0) -> DeviceOps:
    """One call of ``transform`` on a meta (batch, 1, *shape) image and label, counted (after one
    uncounted call, so that cached constants are not counted)."""
    image, label = (torch.zeros(batch, 1, *shape, device='meta') for _ in range(2))
    transform(image, label, torch.Generator().manual_seed(seed))
    with DeviceOps() as counter:
        transform(image, label, torch.Generator().manual_seed(seed))
    return counter


def count_table(shapes) -> None:
    print('| transform | p | ops B=1 | ops B=8 | bytes/voxel B=1 | bytes/voxel B=8 |')
    print('|---|---|---|---|---|---|')
    for shape in shapes:
        voxels = math.prod(shape)
        for name in COUNTED:
            for p in (1.0, 0.5) if name.startswith('pipeline') else (1.0,):
                seeds = range(20) if p < 1 else range(1)
                cells = []
                for batch in (1, 8):
                    counts = [device_ops(ours(name, p), batch, shape, seed) for seed in seeds]
                    cells.append((statistics.mean(c.ops for c in counts),
                                  statistics.mean(c.bytes for c in counts) / (batch * voxels)))
                print(f'| {name} {"x".join(map(str, shape))} | {p:g} | {cells[0][0]:.1f} | {cells[1][0]:.1f} | '
                      f'{cells[0][1]:.0f} | {cells[1][1]:.0f} |')
    print()


def op_table(shape) -> None:
    """Where the pipeline's bytes go: one call at p = 1, B = 1, by op, largest first."""
    counter = device_ops(ours('pipeline'), 1, shape)
    voxels = math.prod(shape)
    print(f'the pipeline\'s ops by name, {"x".join(map(str, shape))}, p = 1, B = 1 '
          f'({counter.ops} ops, {counter.bytes / voxels:.0f} bytes per voxel)\n')
    print('| op | calls | bytes/voxel |')
    print('|---|---|---|')
    for name, (calls, moved) in sorted(counter.by_op.items(), key=lambda item: -item[1][1]):
        print(f'| {name} | {calls} | {moved / voxels:.1f} |')
    print()


def ours(name: str, p: float = 1.0):
    """Our transform ``name`` with TorchIO's defaults (flip always); ``p`` for the pipeline (or for
    ``'pipeline, one resampling'``, with Affine and Elastic in one resampling, and ``'pipeline,
    background 0'``, padding with 0 as training does after normalisation)."""
    if name.startswith('pipeline'):
        return augment.paper_augmentation(p=p, single_resampling=name == 'pipeline, one resampling',
                                          background=0.0 if name == 'pipeline, background 0' else None)
    if name == 'Flip':
        return augment.RandomFlip(flip_probability=1.0)
    return getattr(augment, 'Random' + name)()


def torchio_transform(name: str, p: float = 1.0):
    import torchio as tio
    if name == 'pipeline':
        return tio.Compose([torchio_transform(n, p) for n in TRANSFORMS[:-1]])
    if p < 1:
        return getattr(tio, 'Random' + name)(**({'flip_probability': 1.0} if name == 'Flip' else {}), p=p)
    if name == 'Flip':
        return tio.RandomFlip(flip_probability=1.0)
    return getattr(tio, 'Random' + name)()


def monai_transform(name: str, p: float = 1.0):
    """MONAI's nearest equivalent (dict transforms on 'image' and 'label'); None for Motion."""
    from monai import transforms as mt
    keys, modes = ('image', 'label'), ('bilinear', 'nearest')
    if name == 'pipeline':
        return mt.Compose([t for t in (monai_transform(n, p) for n in TRANSFORMS[:-1]) if t is not None])
    return {
        'Flip': lambda: mt.RandFlipd(keys, prob=p, spatial_axis=0),
        'Motion': lambda: None,
        'BiasField': lambda: mt.RandBiasFieldd('image', degree=3, coeff_range=(-0.5, 0.5), prob=p),
        'Noise': lambda: mt.RandGaussianNoised('image', prob=p, std=0.25),
        'Affine': lambda: mt.RandAffined(keys, prob=p, rotate_range=(math.radians(10),) * 3,
                                         scale_range=(0.1,) * 3, mode=modes, padding_mode='border'),
        'ElasticDeformation': lambda: mt.Rand3DElasticd(keys, sigma_range=(5, 8), magnitude_range=(100, 200),
                                                        prob=p, mode=modes, padding_mode='border'),
    }[name]()


def sample(shape, batch: int = 1, device='cpu'):
    """A Z-normalised smooth random image and a binary label of blobs, (B, 1, *shape)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, 1, *shape, generator=g)
    image = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2)
    image = (image - image.mean()) / image.std()
    label = (image > 1.5).to(torch.uint8)
    return image.to(device), label.to(device)


def bench_augment(args) -> None:
    quick = args.quick
    repeats = args.repeats or (2 if quick else 5)
    shapes = [(48, 48, 48), (61, 72, 61)] if quick else [(144, 144, 144), (181, 217, 181)]
    cuda = args.device == 'cuda'
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda and not torch.cuda.is_available():
        raise SystemExit('--device cuda asked, but CUDA is not available')
    try:
        import SimpleITK
        import torchio as tio
        if args.threads:
            SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    except ImportError:
        tio = None
    try:
        import monai
    except ImportError:
        monai = None

    # TorchIO warns that its default 7.5 mm may fold the small --quick volumes.
    warnings.filterwarnings('ignore', 'The maximum displacement is larger', RuntimeWarning)
    print('\n'.join(machine()))
    if args.profile:
        return profile_pipeline(shapes[0], repeats)
    if args.compile:
        return compiled_pipeline(shapes[0], repeats, 'cuda' if cuda else 'cpu')
    print('\ndevice ops per call and bytes moved per voxel (meta tensors, image + label)\n')
    count_table(shapes)
    op_table(shapes[0])
    if args.counts:
        return
    print(f'median of {repeats} calls after one warm-up at p=1; mean of {4 * repeats} calls at p=0.5; '
          'times in ms\n')
    for shape in shapes:
        image, label = sample(shape)
        batch_device = 'cuda' if cuda else 'cpu'
        batch_image, batch_label = sample(shape, 8, batch_device)
        columns = ['ours CPU', 'TorchIO CPU', 'MONAI CPU', 'TorchIO / ours CPU']
        if cuda:
            columns += ['ours CUDA', 'TorchIO / ours CUDA']
            cuda_image, cuda_label = image.cuda(), label.cuda()
        batch_column = f'ours {batch_device.upper()} batch 8, per volume'
        columns += [batch_column, 'TorchIO / ours batch 8']
        print(f'### {"x".join(map(str, shape))} image + label\n')
        print('| transform | ' + ' | '.join(columns) + ' |')
        print('|---' * (len(columns) + 1) + '|')
        for name, p in [(name, 1.0) for name in TRANSFORMS] + [('pipeline', 0.5)]:
            transform = ours(name, p)
            n, statistic = (repeats, statistics.median) if p == 1 else (4 * repeats, statistics.mean)
            generator = torch.Generator().manual_seed(0)  # CPU, whatever the device
            row = {'ours CPU': median_seconds(lambda: transform(image, label, generator), n, statistic=statistic)}
            if tio is not None:
                subject = tio.Subject(image=tio.ScalarImage(tensor=image[0]), label=tio.LabelMap(tensor=label[0]))
                theirs = torchio_transform(name, p)
                row['TorchIO CPU'] = median_seconds(lambda: theirs(subject), n, statistic=statistic)
                row['TorchIO / ours CPU'] = row['TorchIO CPU'] / row['ours CPU']
            monai_call = monai_transform(name, p) if monai is not None else None
            if monai_call is not None:
                data = {'image': image[0], 'label': label[0]}
                row['MONAI CPU'] = median_seconds(lambda: monai_call(data), n, statistic=statistic)
            if cuda:
                row['ours CUDA'] = median_seconds(
                    lambda: transform(cuda_image, cuda_label, generator), n, cuda=True, statistic=statistic)
                if 'TorchIO CPU' in row:
                    row['TorchIO / ours CUDA'] = row['TorchIO CPU'] / row['ours CUDA']
            row[batch_column] = median_seconds(
                lambda: transform(batch_image, batch_label, generator), n, cuda=cuda, statistic=statistic) / 8
            if 'TorchIO CPU' in row:
                row['TorchIO / ours batch 8'] = row['TorchIO CPU'] / row[batch_column]
            cells = [format_cell(column, row.get(column)) for column in columns]
            print(f'| {name}{"" if p == 1 else f" p={p:g}"} | ' + ' | '.join(cells) + ' |')
        print(f'\nload average after this table: {load()}\n')
    if monai is not None:
        print('MONAI has no motion artefact: its pipeline has five transforms.')


def minor_faults() -> int:
    """The process's minor page faults so far (0 where ``resource`` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def profile_pipeline(shape, repeats: int) -> None:
    """Our pipeline at p = 1 on one CPU volume + label under ``torch.profiler``: the self time of
    each op (by input shapes), in ms per call, over ``repeats`` calls after three warm-up calls."""
    image, label = sample(shape)
    pipeline, generator = ours('pipeline'), torch.Generator().manual_seed(0)
    for _ in range(3):
        pipeline(image, label, generator)
    with torch.profiler.profile(record_shapes=True) as profiler:
        faults, start = minor_faults(), time.perf_counter()
        for _ in range(repeats):
            pipeline(image, label, generator)
        seconds, faults = (time.perf_counter() - start) / repeats, (minor_faults() - faults) / repeats
    # The profiler's own allocations can keep freed buffers from being reused: the pages of a
    # fresh one fault in on first write, inside whichever op writes it first (the grids).
    print(f'\npipeline, {"x".join(map(str, shape))} image + label, p = 1: {seconds * 1e3:.0f} ms per call '
          f'under the profiler ({repeats} calls), {faults:.0f} minor page faults per call\n')
    print('| op | input shapes | self ms per call |')
    print('|---|---|---|')
    events = sorted(profiler.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    for event in events[:15]:
        shapes = ', '.join('x'.join(map(str, s)) for s in event.input_shapes if s)
        print(f'| {event.key} | {shapes} | {event.self_cpu_time_total / 1e3 / repeats:.1f} |')
    print(f'\nload average: {load()}')


def compiled_pipeline(shape, repeats: int, device: str) -> None:
    """The device part of our pipeline (``run`` given a plan, p = 1) eager and compiled by
    ``torch.compile`` (inductor), medians of ``repeats`` calls with new draws each, in one run;
    with the bytes per voxel of each: eager counted as ``--counts`` counts them (on ``device``
    rather than meta: its own code path), compiled as inductor estimates its graph's kernels
    (``graph.count_bytes``, the buffers each fused kernel and each library call reads and writes)."""
    import torch._inductor.config as inductor_config
    import torch._inductor.metrics as inductor_metrics
    image, label = sample(shape, device=device)
    voxels = math.prod(shape)
    pipeline = ours('pipeline')
    # Inductor leaves Motion's FFTs to ATen and says so, and dynamo traces through our lru_caches,
    # which hold pure functions of their arguments: both expected here.
    warnings.filterwarnings('ignore', 'Torchinductor does not support code generation for complex operators')
    warnings.filterwarnings('ignore', 'Dynamo detected a call to a `functools.lru_cache`')
    plans = [pipeline.plan(1, 1, shape, torch.Generator().manual_seed(seed)) for seed in range(repeats + 1)]
    pipeline.run(image, label, plans[0])
    with DeviceOps(device) as counter:
        pipeline.run(image, label, plans[0])
    # Inductor counts its graph's bytes only while its metrics log is on (here muted), and only
    # when it compiles rather than loads the graph from its cache.
    metrics_log = logging.getLogger('torch._inductor.compile_fx.__inductor_metrics')
    metrics_log.setLevel(logging.INFO)
    metrics_log.propagate = False
    metrics_log.addHandler(logging.NullHandler())
    inductor_metrics.reset()
    compiled = torch.compile(pipeline.run)
    start = time.perf_counter()
    with inductor_config.patch(fx_graph_cache=False):
        compiled(image, label, plans[0])
    print(f'\ncompiling took {time.perf_counter() - start:.1f} s\n')
    moved = {'eager': counter.bytes / voxels, 'compiled': inductor_metrics.num_bytes_accessed / voxels}
    print(f'| {"x".join(map(str, shape))} image + label, {device} | ms per call | bytes per voxel |')
    print('|---|---|---|')
    for name, run in (('eager', pipeline.run), ('compiled', compiled)):
        draws = itertools.cycle(plans)
        seconds = median_seconds(lambda: run(image, label, next(draws)), repeats, cuda=device == 'cuda')
        print(f'| {name} | {seconds * 1e3:.0f} | {moved[name]:.0f} |')
    print(f'\nload average: {load()}')


# ---------------------------------------------------------------------------------------------
# model

def bench_model(args) -> None:
    """Parameters and forward GFLOP of both networks at size^3 (counted on the meta device, so free);
    with --time, one training step (forward, BCE-Dice, backward, Adam) and its peak memory."""
    from torch.utils.flop_counter import FlopCounterMode

    import metrics
    import model
    print('\n'.join(machine()[:3]))
    columns = ['parameters', f'forward GFLOP at {args.size}^3']
    if args.time:
        amp = args.device == 'cuda'
        columns += [f'train step s ({args.device}{", bf16 autocast" if amp else ", fp32"})', 'peak memory GiB']
    print('\n| model | ' + ' | '.join(columns) + ' |')
    print('|---' * (len(columns) + 1) + '|')
    for name in ('residual', 'unet'):
        with torch.device('meta'):
            net = model.build_model(name)
            x = torch.zeros(1, 1, args.size, args.size, args.size)
        with FlopCounterMode(display=False) as counter:
            net(x)
        cells = [f'{sum(p.numel() for p in net.parameters()):,}', f'{counter.get_total_flops() / 1e9:,.1f}']
        if args.time:
            cells += time_step(model.build_model(name), metrics.BCEDiceLoss(), args)
        print(f'| {name} | ' + ' | '.join(cells) + ' |')


def time_step(net, loss_fn, args) -> list[str]:
    device = torch.device(args.device)
    net = net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.randn(1, 1, args.size, args.size, args.size, device=device)
    y = (torch.rand_like(x) > 0.99).float()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'):
            loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, args.repeats or 3, cuda=device.type == 'cuda')
    if device.type == 'cuda':
        peak = f'{torch.cuda.max_memory_allocated(device) / 2**30:.2f}'
    else:
        import resource
        peak = f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} (process RSS)'
    return [f'{seconds:.3f}', peak]


def format_cell(column: str, value) -> str:
    if value is None:
        return 'n/a'
    if '/' in column:
        return f'{value:.1f}x'
    milliseconds = value * 1e3
    return f'{milliseconds:.2f}' if milliseconds < 10 else f'{milliseconds:.0f}'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    augment_parser = commands.add_parser('augment', help='augment.py against TorchIO 1.2.1 and MONAI')
    augment_parser.add_argument('--device', choices=('cpu', 'cuda'),
                                default='cuda' if torch.cuda.is_available() else 'cpu',
                                help='cuda adds our CUDA column and runs the batch of 8 there '
                                     '(default: cuda when available)')
    augment_parser.add_argument('--repeats', type=int, default=None,
                                help='timed calls per figure (default 5, 2 with --quick)')
    augment_parser.add_argument('--quick', action='store_true', help='small volumes, 2 repeats: a smoke test')
    only = augment_parser.add_mutually_exclusive_group()
    only.add_argument('--counts', action='store_true',
                      help='only the device ops and bytes per voxel (meta tensors: no timing, seconds)')
    only.add_argument('--profile', action='store_true',
                      help='only where the pipeline\'s CPU time goes: torch.profiler, one 144^3 call')
    only.add_argument('--compile', action='store_true',
                      help='only our pipeline eager against torch.compile (inductor), one 144^3 call: '
                           'ms and bytes per voxel')
    augment_parser.add_argument('--threads', type=int, default=None,
                                help='CPU threads for torch and SimpleITK alike (default: their own defaults)')
    augment_parser.set_defaults(run=bench_augment)
    model_parser = commands.add_parser('model', help='parameters, forward GFLOP and step time of both networks')
    model_parser.add_argument('--size', type=int, default=144, help='cube side in voxels (default 144)')
    model_parser.add_argument('--time', action='store_true', help='also time one training step')
    model_parser.add_argument('--device', choices=('cpu', 'cuda'),
                              default='cuda' if torch.cuda.is_available() else 'cpu')
    model_parser.add_argument('--repeats', type=int, default=None, help='timed steps (default 3)')
    model_parser.set_defaults(run=bench_model)
    args = parser.parse_args(argv)
    # The training entry point's allocator setting (repro.keep_freed_memory), for every library
    # timed here alike: without it each fresh 10-70 MB buffer faults its pages in again, which is
    # about 15% of our pipeline's time at 144^3 and not what a training step pays.
    repro.keep_freed_memory()
    args.run(args)


if __name__ == '__main__':
    main()
