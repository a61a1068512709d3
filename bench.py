"""Benchmarks of the project's building blocks.

    python bench.py augment [--device cpu|cuda] [--repeats N] [--quick] [--threads N] [--counts | --profile | --compile]
    python bench.py model [--size 144]
    python bench.py train [--size 48] [--device cpu|cuda] [--threads N] [--repeats N] [--compile | --profile] [--fp32] [--quick]
    python bench.py gpu [--report gpu-report.md] [--quick] [--no-compile]

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
TorchIO 1.2.1, MONAI and mriaug 0.1.1 on the CPU in the same run, and ours and mriaug on CUDA
when present, one volume at a time and as a batch of 8. mriaug's semantics differ from
TorchIO's (``MRIAUG_NOTE``): it always applies each transform, sizes them in fractions of the
field of view rather than mm, and draws its warp and bias field from a few low-frequency
Fourier coefficients. Each figure at p = 1 is the median of ``--repeats`` calls after
one warm-up call; at p = 0.5 (pipeline only), where calls differ by what they draw, the mean
of ``4 * repeats`` calls. The load average is printed before and after each table: on a shared
machine, multi-threaded eager torch code (ours, MONAI) slows down far more than the load alone
suggests, because every parallel op waits for its slowest thread. The process keeps freed
memory as training does (``repro.keep_freed_memory``). ``--profile`` instead shows where our
pipeline's time goes on one 144^3 call (``torch.profiler``, self time per op), and
``--compile`` times its device part eager against ``torch.compile`` and gives the bytes per
voxel of each.

``model`` gives each network's parameters, forward GFLOP and training-step GFLOP (forward and
backward, ``torch.utils.flop_counter``) at a cube side.

``train`` races the training step (forward, BCE-Dice, backward, Adam; batch 1; bf16 autocast
unless ``--fp32``) of each network in the plain eager contiguous form against ours, the form
train.py runs (``model.fast_form``: channels-last 3-D; ``--compile`` adds it through
torch.compile, whose compile time is shown apart), in one process, interleaved: wall and CPU
seconds per step, the speed-up of each, FLOP and achieved TFLOP/s, the first step's loss of each
form (same weights, patch and dropout draws), the machine, threads and load average. The CPU
seconds count only the time the process ran, which a shared machine does not take away.
``--profile`` shows instead where one step of ours goes, op by op.

``gpu`` measures everything on one GPU and writes one markdown report (``--report``, never
overwritten): the tests that need CUDA; our augmentation (B = 1 and 8, 144^3 and 256^3; eager,
through ``augment.CUDAGraphCall`` and compiled) against mriaug on the GPU and TorchIO on 2 CPU
threads, with the bytes moved per patch against the memory bandwidth; the ``train`` race at
144^3; a slice of an epoch per network at 144^3 in bf16 and fp32 with the augmentation in the
loop (step time, TFLOP/s and share of the bf16 peak, peak memory); one whole 1 mm validation
scan; and the projected wall time of ``python repro.py --table2``. A section that cannot run (a
missing package, a failure) is one line of the report. Without CUDA, ``--quick`` runs the same
code on the CPU at tiny sizes, in seconds, and the report says that no GPU figure was measured.
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
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import augment

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
             f'torch {torch.__version__}, torch threads {torch.get_num_threads()}, '
             f'OMP_WAIT_POLICY {os.environ.get("OMP_WAIT_POLICY", "unset")}']
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


def mriaug_transform(name: str, p: float = 1.0):
    """mriaug 0.1.1's nearest equivalent of our transform ``name``, as a call on (image, label) with
    TorchIO's default ranges where mriaug takes them; a spatial transform moves a float label with the
    same draw (nearest). None at p < 1: mriaug has no probabilities. Its semantics: see MRIAUG_NOTE."""
    import mriaug
    if p < 1:
        return None
    if name == 'pipeline':
        steps = [mriaug_transform(n) for n in TRANSFORMS[:-1]]

        def pipeline(image, label):
            for step in steps:
                image, label = step(image, label)
            return image, label
        return pipeline

    def uniform(image, bound):  # one draw per volume and axis in [-bound, bound]
        return (2 * torch.rand(len(image), 3, device=image.device) - 1) * bound

    def affine(image, label):
        zoom, rotate = uniform(image, 0.1), uniform(image, math.radians(10))
        return (mriaug.affine3d(image, zoom=zoom, rotate=rotate),
                mriaug.affine3d(label, zoom=zoom, rotate=rotate, mode='nearest'))

    def warp(image, label):
        k = torch.randn(len(image), 3, 2, 2, 2, device=image.device)
        k[..., 0, 0, 0] = 0
        return mriaug.warp3d(image, k=k), mriaug.warp3d(label, k=k, mode='nearest')

    return {
        'Flip': lambda image, label: (mriaug.flip3d(image), mriaug.flip3d(label)),
        'Motion': lambda image, label: (mriaug.motion3d(image), label),
        'BiasField': lambda image, label: (mriaug.bias_field3d(image), label),
        'Noise': lambda image, label: (mriaug.noise3d(image, 0.25 * torch.rand(len(image), device=image.device)),
                                       label),
        'Affine': affine,
        'ElasticDeformation': warp,
    }[name]


MRIAUG_NOTE = ('mriaug 0.1.1 differs from TorchIO in what it draws: every transform always applies (no p); '
               'sizes are fractions of the field of view, not mm; its elastic warp and bias field are a few '
               'random low-frequency Fourier coefficients (TorchIO: cubic B-splines on a 7^3 control grid, '
               'and exp of a random cubic polynomial); it pads with zeros (TorchIO: the image minimum); its '
               'motion blends k-space with one translated copy (TorchIO: two rotations and translations); '
               'and it draws from torch\'s global random state.')


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
        usage_error('--device cuda: CUDA is not available on this machine; use --device cpu')
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
    try:
        import mriaug
    except ImportError:
        mriaug = None

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
        columns = ['ours CPU', 'TorchIO CPU', 'MONAI CPU', 'mriaug CPU', 'TorchIO / ours CPU']
        if cuda:
            columns += ['ours CUDA', 'mriaug CUDA', 'TorchIO / ours CUDA']
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
            mriaug_call = mriaug_transform(name, p) if mriaug is not None else None
            if mriaug_call is not None:
                row['mriaug CPU'] = median_seconds(lambda: mriaug_call(image, label.float()), n)
                if cuda:
                    row['mriaug CUDA'] = median_seconds(lambda: mriaug_call(cuda_image, cuda_label.float()), n,
                                                        cuda=True)
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
    print(MRIAUG_NOTE if mriaug is not None else 'mriaug not installed: its columns are n/a.')


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
    with the bytes per voxel of each (``eager_and_compiled``)."""
    figures = eager_and_compiled(ours('pipeline'), shape, 1, repeats, device)
    print(f'\ncompiling took {figures["compile s"]:.1f} s\n')
    print(f'| {"x".join(map(str, shape))} image + label, {device} | ms per call | bytes per voxel |')
    print('|---|---|---|')
    for name in ('eager', 'compiled'):
        seconds, moved = figures[name]
        print(f'| {name} | {seconds * 1e3:.0f} | {moved:.0f} |')
    print(f'\nload average: {load()}')


def eager_and_compiled(pipeline, shape, batch: int, repeats: int, device: str) -> dict:
    """``pipeline.run`` (p = 1) on a (batch, 1, *shape) image + label, eager and compiled by
    ``torch.compile`` (inductor): ``{'eager': (seconds, bytes per voxel), 'compiled': (...),
    'compile s': seconds}``, medians of ``repeats`` calls with new draws each. Bytes per voxel:
    eager counted as ``--counts`` counts them (on ``device`` rather than meta: its own code path),
    compiled as inductor estimates its graph's kernels (``graph.count_bytes``, the buffers each fused
    kernel and each library call reads and writes); per voxel of the whole batch."""
    import torch._inductor.config as inductor_config
    import torch._inductor.metrics as inductor_metrics
    image, label = sample(shape, batch, device=device)
    voxels = batch * math.prod(shape)
    # Inductor leaves Motion's FFTs to ATen and says so, and dynamo traces through our lru_caches,
    # which hold pure functions of their arguments: both expected here.
    warnings.filterwarnings('ignore', 'Torchinductor does not support code generation for complex operators')
    warnings.filterwarnings('ignore', 'Dynamo detected a call to a `functools.lru_cache`')
    plans = [pipeline.plan(batch, 1, shape, torch.Generator().manual_seed(seed)) for seed in range(repeats + 1)]
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
    figures = {'compile s': time.perf_counter() - start}
    moved = {'eager': counter.bytes / voxels, 'compiled': inductor_metrics.num_bytes_accessed / voxels}
    for name, run in (('eager', pipeline.run), ('compiled', compiled)):
        draws = itertools.cycle(plans)
        seconds = median_seconds(lambda: run(image, label, next(draws)), repeats, cuda=device == 'cuda')
        figures[name] = (seconds, moved[name])
    return figures


# ---------------------------------------------------------------------------------------------
# model

def step_flops(name: str, size: int, base_filters=None) -> int:
    """FLOP of one training step's forward and backward at batch 1 (torch.utils.flop_counter: convolutions,
    counted on the meta device, so free)."""
    from torch.utils.flop_counter import FlopCounterMode

    import model
    with torch.device('meta'):
        net = model.build_model(name, base_filters=base_filters)
        x = torch.zeros(1, 1, size, size, size)
    with FlopCounterMode(display=False) as counter:
        net(x).float().sum().backward()
    return counter.get_total_flops()


def bench_model(args) -> None:
    """Parameters and GFLOP of both networks at size^3 (counted on the meta device, so free)."""
    from torch.utils.flop_counter import FlopCounterMode

    import model
    print('\n'.join(machine()[:3]))
    print(f'\n| model | parameters | forward GFLOP at {args.size}^3 | training step GFLOP (forward + backward) |')
    print('|---|---|---|---|')
    for name in NETWORKS:
        with torch.device('meta'):
            net = model.build_model(name)
            x = torch.zeros(1, 1, args.size, args.size, args.size)
        with FlopCounterMode(display=False) as counter:
            net(x)
        print(f'| {name} | {sum(p.numel() for p in net.parameters()):,} | {counter.get_total_flops() / 1e9:,.1f} | '
              f'{step_flops(name, args.size) / 1e9:,.1f} |')


# ---------------------------------------------------------------------------------------------
# train

NETWORKS = ('residual', 'unet')
FORMS = ('plain', 'ours', 'ours compiled')
"""The training steps ``bench.py train`` races: ``plain`` is the eager step on a contiguous network;
``ours`` is the network in ``model.fast_form`` (channels-last 3-D) as train.py runs it; ``ours compiled``
is that through torch.compile as well. All three are ``model.training_step``: forward and BCE-Dice under
the same autocast, backward, Adam."""


def training_patch(size: int, device, channels: int = 1):
    """A smooth random image and its sparse lesion mask, (1, channels, size^3), fixed."""
    image, _ = sample((size,) * 3, device=device)
    g = torch.Generator().manual_seed(1)
    label = (torch.rand(1, 1, size, size, size, generator=g) > 0.99).float().to(device)
    return image.expand(-1, channels, -1, -1, -1).contiguous(), label


def make_step(name: str, form: str, size: int, device, amp: bool = True, base_filters=None, augmentation=None):
    """One training step of network ``name`` in ``form`` (see FORMS) on a fixed patch, as a call; the
    network starts from seed 0 whatever the form, so that the forms start from the same weights. With
    ``augmentation`` (a transform of augment.py), every step first augments the patch on its device, as
    training does."""
    import metrics
    import model
    torch.manual_seed(0)
    net = model.build_model(name, base_filters=base_filters).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    image, label = training_patch(size, device)
    if form != 'plain':
        net = model.fast_form(net, compile=form == 'ours compiled')
    loss_fn = metrics.BCEDiceLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    generator = torch.Generator().manual_seed(0)

    def step():
        x, y = (image, label) if augmentation is None else augmentation(image, label, generator)
        return model.training_step(net, optimizer, loss_fn, x, y, autocast)
    return step


def timed(call, cuda: bool):
    """(wall seconds, process CPU seconds, result) of one call."""
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def race(name: str, forms, size: int, device, repeats: int, amp: bool = True, base_filters=None) -> dict:
    """Time the training step of ``name`` in each of ``forms``, interleaved in one process (the order
    alternating from one round to the next), after one first step each (which compiles a compiled
    form). Returns per form: the median wall and CPU seconds of a step, the first step's wall seconds
    and loss (seeded alike, so the forms' losses compare), and the peak GPU memory of that step."""
    cuda = device.type == 'cuda'
    steps = {form: make_step(name, form, size, device, amp, base_filters) for form in forms}
    results = {}
    for form, step in steps.items():
        torch.manual_seed(1)  # the same dropout draws for every form's first step
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        wall, _, loss = timed(step, cuda)
        results[form] = {'first': wall, 'loss': loss.item(), 'walls': [], 'cpus': [],
                         'peak': torch.cuda.max_memory_allocated(device) if cuda else None}
    for round_ in range(repeats):
        for form in (forms if round_ % 2 == 0 else forms[::-1]):
            wall, cpu, _ = timed(steps[form], cuda)
            results[form]['walls'].append(wall)
            results[form]['cpus'].append(cpu)
    for result in results.values():
        result['wall'], result['cpu'] = statistics.median(result['walls']), statistics.median(result['cpus'])
    return results


def train_rows(name: str, size: int, device, repeats: int, forms, amp: bool = True, base_filters=None) -> list[str]:
    """``race``'s figures as markdown rows: step time (wall and CPU), speed-up over plain by each, FLOP,
    achieved TFLOP/s, the first step's loss and wall time (a compiled form's includes compiling it, or
    loading it from inductor's cache) and peak memory."""
    flops = step_flops(name, size, base_filters)
    results = race(name, forms, size, device, repeats, amp, base_filters)
    plain = results['plain']
    rows = []
    for form, r in results.items():
        peak = f'{r["peak"] / 2**30:.2f}' if r['peak'] is not None else 'n/a'
        cpu = device.type == 'cpu'
        rows.append(f'| {name} | {form} | {r["wall"]:.3f} | {r["cpu"]:.3f} | '
                    f'{plain["wall"] / r["wall"]:.2f}x | ' + (f'{plain["cpu"] / r["cpu"]:.2f}x' if cpu else 'n/a') +
                    f' | {flops / 1e9:,.1f} | {flops / r["wall"] / 1e12:.3g} | {r["loss"]:.5f} | {r["first"]:.1f} | '
                    f'{peak} |')
    return rows


TRAIN_HEADER = ['| network | form | step s (wall) | step s (CPU) | speed-up (wall) | speed-up (CPU) | GFLOP '
                '(fwd + bwd) | TFLOP/s | loss, first step | first step s | peak GPU GiB |',
                '|---|---|---|---|---|---|---|---|---|---|---|']


def bench_train(args) -> None:
    """Training step of both networks: ours as train.py runs it against the plain eager step."""
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        usage_error('--device cuda: CUDA is not available on this machine; use --device cpu')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick and not args.threads:
        torch.set_num_threads(1)  # tiny steps are mostly thread synchronisation, and a shared core stalls it
    size = 32 if args.quick else args.size
    base_filters = 4 if args.quick else None
    repeats = args.repeats or (2 if args.quick else 5)
    forms = FORMS if args.compile else FORMS[:2]
    print('\n'.join(machine()[:3]))
    setting = (f'training step at {size}^3, batch 1, {"bf16 autocast" if args.amp else "fp32"}, on {device}'
               f'{" (tiny networks: base filters 4)" if args.quick else ""}')
    if args.profile:
        print(f'\n{setting}')
        for name in NETWORKS:
            profile_step(name, size, device, args.amp, base_filters)
        return
    print(f'\n{setting}: median of {repeats} steps per form, interleaved, after one first step\n')
    print('\n'.join(TRAIN_HEADER))
    for name in NETWORKS:
        for row in train_rows(name, size, device, repeats, forms, args.amp, base_filters):
            print(row, flush=True)
    print(f'\nload average after the table: {load()}')
    print('step s (CPU) is the process\'s CPU time: on a shared machine it counts only the time this process ran. '
          'A compiled form\'s first step includes compiling it, or loading it from inductor\'s cache.')


def profile_step(name: str, size: int, device, amp: bool, base_filters=None) -> None:
    """Where one training step of ours goes (after two warm-up steps): torch.profiler's self time per op,
    the largest first, and the convolutions' share (forward and backward) of the whole."""
    step = make_step(name, 'ours', size, device, amp, base_filters)
    step(), step()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == 'cuda' else [])
    with torch.profiler.profile(activities=activities) as profiler:
        timed(step, device.type == 'cuda')
    self_time = (lambda e: e.self_device_time_total) if device.type == 'cuda' else (lambda e: e.self_cpu_time_total)
    events = sorted(profiler.key_averages(), key=lambda e: -self_time(e))
    total = sum(self_time(e) for e in events)
    convolutions = sum(self_time(e) for e in events if 'convolution' in e.key)
    print(f'\n{name}, ours, {size}^3: one step under the profiler, {total / 1e3:.0f} ms of self time, '
          f'{convolutions / total:.0%} of it in convolutions (forward and backward)\n')
    print('| op | calls | self ms | share |')
    print('|---|---|---|---|')
    for event in events[:12]:
        print(f'| {event.key} | {event.count} | {self_time(event) / 1e3:.1f} | {self_time(event) / total:.1%} |')
    print(f'\nload average: {load()}')


# ---------------------------------------------------------------------------------------------
# gpu

GPU_PEAKS = (('H200', 989e12, 4.8e12), ('H100 PCIe', 756e12, 2.0e12), ('H100 NVL', 835e12, 3.9e12),
             ('H100', 989e12, 3.35e12))
"""(name contains, dense bf16 FLOP/s, memory bytes/s), first match wins: NVIDIA's H100 and H200 datasheets."""

GPU_SIZES = {
    False: {'augment': ((144,) * 3, (256,) * 3), 'batches': (1, 8), 'patch': 144, 'base_filters': None,
            'scan': (181, 217, 181), 'repeats': 10, 'steps': 10},
    True: {'augment': ((32,) * 3, (48,) * 3), 'batches': (1, 8), 'patch': 32, 'base_filters': 4,
           'scan': (46, 55, 46), 'repeats': 2, 'steps': 2},
}
"""What ``bench.py gpu`` measures, in full (the paper's 144^3 patches, 256^3 volumes, a 1 mm scan of the
MNI field of view) and with --quick (tiny sizes and networks, seconds on a CPU)."""


def usage_error(message: str):
    print(f'bench.py: error: {message}', file=sys.stderr)
    raise SystemExit(2)


def check_report(args) -> None:
    """--report must be a new file in a folder that exists and can be written."""
    path = Path(args.report)
    if path.exists():
        usage_error(f'--report {path}: exists; choose another path (a report is never overwritten)')
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        usage_error(f'--report {path}: cannot write into {path.parent}')
    if not torch.cuda.is_available() and not args.quick:
        usage_error('gpu: CUDA is not available; --quick runs the same code on the CPU at tiny sizes')


def bench_gpu(args) -> None:
    """Everything on one GPU into one markdown report, section by section; a section that cannot run
    (a missing package, a failure) is one line in the report, and the others still run."""
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    if not cuda:
        torch.set_num_threads(1)  # as train --quick: tiny steps on shared cores stall on thread synchronisation
    sizes = GPU_SIZES[args.quick]
    peak, bandwidth = next(((flops, rate) for name, flops, rate in GPU_PEAKS
                            if cuda and name in torch.cuda.get_device_name()), (None, None))
    context = {'device': device, 'sizes': sizes, 'peak': peak, 'bandwidth': bandwidth,
               'compile': args.compile and not args.quick, 'quick': args.quick}
    lines = [f'# bench.py gpu{" --quick" if args.quick else ""}', '', *[f'- {line}' for line in machine()[:3]],
             f'- Python {platform.python_version()}; peak dense bf16 '
             f'{f"{peak / 1e12:.0f} TFLOP/s, memory {bandwidth / 1e12:.2f} TB/s (datasheet)" if peak else "unknown"}']
    if not cuda:
        lines.append('- No CUDA device: every section ran on the CPU at tiny sizes; no GPU figure was measured.')
    if not context['compile']:
        lines.append('- The torch.compile forms are left out (--quick or --no-compile).')
    start = time.perf_counter()
    print('\n'.join(lines), flush=True)
    for title, section in (('Tests that need CUDA', gpu_tests), ('Augmentation', gpu_augmentation),
                           ('Training step: ours against plain', gpu_race),
                           ('Training: a slice of an epoch with augmentation', gpu_training),
                           ('Validation: one whole scan', gpu_validation),
                           ('Projected wall time of python repro.py --table2', gpu_projection)):
        part = ['', f'## {title}', '']
        try:
            part += section(context)
        except Exception as error:  # one line in the report; the other sections still run
            part.append(f'{title}: not measured ({type(error).__name__}: '
                        f'{(str(error).strip().splitlines() or [""])[0]})')
        print('\n'.join(part), flush=True)
        lines += part
    lines += ['', f'Whole run: {time.perf_counter() - start:.0f} s; load average at the end {load()}.', '']
    write_report(Path(args.report), '\n'.join(lines))
    print(f'\nreport written to {args.report}')


def write_report(path: Path, text: str) -> None:
    """Through infer.atomic where infer imports (it needs nibabel), else in one write."""
    try:
        from infer import atomic
    except ImportError:
        path.write_text(text)
        return
    atomic(path, lambda tmp: tmp.write_text(text))


def gpu_tests(context) -> list[str]:
    """The tests that need CUDA (they skip without it): pytest -k cuda over tests/, in a subprocess."""
    import importlib.util
    import subprocess
    if importlib.util.find_spec('pytest') is None:
        return ['not run: pytest is not installed (pip install -r requirements-dev.txt)']
    command = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-k', 'cuda', 'tests']
    done = subprocess.run(command, cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                          timeout=300)
    output = [line for line in done.stdout.splitlines() if line.strip()]
    kept = [line for line in output if line.startswith(('FAILED', 'ERROR', 'SKIPPED'))]
    lines = [f'`{" ".join(["python"] + command[1:])}`: {output[-1] if output else "no output"}', '']
    lines += [f'- {line}' for line in kept]
    if any('ModuleNotFoundError' in line for line in output):
        lines.append('- the suite imports nibabel, pynrrd, TorchIO and MONAI: pip install -r requirements-dev.txt')
    return lines


def gpu_augmentation(context) -> list[str]:
    """Our pipeline at p = 1 per patch, eager, through CUDAGraphCall and compiled, against mriaug on the
    same device and TorchIO on the CPU at 2 threads; bytes moved per patch against the bandwidth."""
    device, sizes, bandwidth = context['device'], context['sizes'], context['bandwidth']
    cuda, repeats = device.type == 'cuda', context['sizes']['repeats']
    notes = []
    try:
        import mriaug  # noqa: F401
    except ImportError:
        notes.append('mriaug not installed (pip install mriaug==0.1.1 resize-right==0.0.2): its column is n/a.')
    else:
        notes.append(MRIAUG_NOTE)
    try:
        import torchio  # noqa: F401
    except ImportError:
        notes.append('TorchIO not installed (pip install torchio==1.2.1): its column is n/a.')
    if not cuda:
        notes.append('CUDAGraphCall needs CUDA: its column is n/a.')
    lines = ['Per patch (image + label), p = 1 for every transform, background 0 as training pads; ms; '
             f'median of {repeats} calls after one warm-up. Bytes: what the eager ops read and write '
             '(counted on meta tensors, as `bench.py augment --counts`), compiled: inductor\'s own count; '
             'floor: those bytes at the datasheet bandwidth.', '',
             '| volume | B | ours eager | ours CUDA graph | ours compiled | mriaug | TorchIO CPU 2 threads | '
             'TorchIO / ours best | mriaug / ours best | MB moved eager / compiled | floor ms | floor / best |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for index, shape in enumerate(sizes['augment']):
        torchio_ms = torchio_pipeline_seconds(shape, repeats) if index == 0 else None
        for batch in sizes['batches']:
            row = augmentation_row(shape, batch, device, repeats,
                                   context['compile'] and index == 0 and batch == sizes['batches'][-1])
            best = min(v for v in (row['eager'], row['graph'], row['compiled']) if v is not None)
            mb = row['bytes'] / 1e6
            moved = f'{mb:,.0f} / {row["compiled bytes"] / 1e6:,.0f}' if row['compiled bytes'] else f'{mb:,.0f} / n/a'
            floor = min(b for b in (row['bytes'], row['compiled bytes']) if b) / bandwidth if bandwidth else None
            lines.append(
                f'| {"x".join(map(str, shape))} | {batch} | {ms(row["eager"])} | {ms(row["graph"])} | '
                f'{ms(row["compiled"])} | {ms(row["mriaug"])} | {ms(torchio_ms) if batch == 1 else "-"} | '
                f'{ratio(torchio_ms, best)} | {ratio(row["mriaug"], best)} | {moved} | {ms(floor)} | '
                f'{f"{floor / best:.2f}" if floor else "n/a"} |')
    lines += ['', *[f'- {note}' for note in notes],
              '- TorchIO is timed at the first volume only, per patch (it takes one subject at a time); the '
              'compiled form at the first volume and the largest batch only (each compiles for minutes).', '']
    lines += transforms_table(sizes['augment'][-1], device, repeats)
    return lines


def ms(seconds) -> str:
    return 'n/a' if seconds is None else format_cell('ms', seconds)


def ratio(numerator, denominator) -> str:
    if numerator is None or not denominator:
        return 'n/a'
    return f'{numerator / denominator:,.{1 if numerator < 10 * denominator else 0}f}x'


def augmentation_row(shape, batch: int, device, repeats: int, compile_too: bool) -> dict:
    """Seconds per patch of our pipeline (eager; through CUDAGraphCall on CUDA; compiled when asked) and
    of mriaug's, with the bytes per patch each of ours moves."""
    cuda = device.type == 'cuda'
    pipeline = ours('pipeline, background 0')
    image, label = sample(shape, batch, device)
    generator = torch.Generator().manual_seed(0)
    row = {'eager': median_seconds(lambda: pipeline(image, label, generator), repeats, cuda) / batch,
           'bytes': device_ops(pipeline, batch, shape).bytes / batch, 'graph': None, 'compiled': None,
           'compiled bytes': None, 'mriaug': None}
    if cuda:
        captured = augment.CUDAGraphCall(pipeline, image, label, generator)
        row['graph'] = median_seconds(lambda: captured(image, label, generator), repeats, cuda) / batch
    if compile_too:
        figures = eager_and_compiled(pipeline, shape, batch, repeats, device.type)
        voxels = math.prod(shape)
        row['compiled'], row['compiled bytes'] = figures['compiled'][0] / batch, figures['compiled'][1] * voxels
    try:
        theirs = mriaug_transform('pipeline')
    except ImportError:
        return row
    float_label = label.float()
    row['mriaug'] = median_seconds(lambda: theirs(image, float_label), repeats, cuda) / batch
    return row


def torchio_pipeline_seconds(shape, repeats: int):
    """TorchIO's six on one CPU patch, torch and SimpleITK pinned to 2 threads; None without TorchIO."""
    try:
        import SimpleITK
        import torchio as tio
    except ImportError:
        return None
    threads, itk_threads = torch.get_num_threads(), SimpleITK.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(2)
    SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    try:
        warnings.filterwarnings('ignore', 'The maximum displacement is larger', RuntimeWarning)
        image, label = sample(shape)
        subject = tio.Subject(image=tio.ScalarImage(tensor=image[0]), label=tio.LabelMap(tensor=label[0]))
        return median_seconds(lambda: torchio_transform('pipeline')(subject), max(1, repeats // 5))
    finally:
        torch.set_num_threads(threads)
        SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)


def transforms_table(shape, device, repeats: int) -> list[str]:
    """Each of the six alone at B = 1, ours eager against mriaug's nearest equivalent, on ``device``."""
    cuda = device.type == 'cuda'
    image, label = sample(shape, 1, device)
    float_label = label.float()
    generator = torch.Generator().manual_seed(0)
    lines = [f'Each transform alone, {"x".join(map(str, shape))}, B = 1, on {device.type}, ms:', '',
             '| transform | ours eager | mriaug | mriaug / ours |', '|---|---|---|---|']
    for name in TRANSFORMS:
        transform = ours(name)
        mine = median_seconds(lambda: transform(image, label, generator), repeats, cuda)
        try:
            theirs = mriaug_transform(name)
            other = median_seconds(lambda: theirs(image, float_label), repeats, cuda)
        except ImportError:
            other = None
        lines.append(f'| {name} | {ms(mine)} | {ms(other)} | {ratio(other, mine)} |')
    return lines


def gpu_race(context) -> list[str]:
    """``bench.py train``'s table at the protocol's patch size, bf16: ours against plain (and compiled)."""
    device, sizes = context['device'], context['sizes']
    forms = FORMS if context['compile'] else FORMS[:2]
    command = '--quick' if context['quick'] else f'--size {sizes["patch"]} --device {device.type}'
    lines = [f'`python bench.py train {command}{" --compile" if context["compile"] else ""}`: '
             f'{sizes["patch"]}^3, batch 1, bf16 autocast, '
             f'median of {sizes["repeats"]} steps per form, interleaved', '', *TRAIN_HEADER]
    for name in NETWORKS:
        lines += train_rows(name, sizes['patch'], device, sizes['repeats'], forms, True, sizes['base_filters'])
    return lines


def gpu_training(context) -> list[str]:
    """The paper's protocol per network and precision: training steps of our form on one patch each,
    the paper's augmentation (p = 0.5) on the device in the loop; step time, TFLOP/s, share of the bf16
    peak, peak memory."""
    device, sizes, peak = context['device'], context['sizes'], context['peak']
    cuda = device.type == 'cuda'
    lines = [f'{sizes["patch"]}^3 patches, batch 1, `paper_augmentation(p=0.5)` on the device before each '
             f'step; median of {sizes["steps"]} steps after 2 warm-up steps.', '',
             '| network | precision | step ms | TFLOP/s | share of bf16 peak | peak GPU GiB |', '|---|---|---|---|---|---|']
    context['step s'] = {}
    for name in NETWORKS:
        flops = step_flops(name, sizes['patch'], sizes['base_filters'])
        for amp in (True, False):
            step = make_step(name, 'ours', sizes['patch'], device, amp, sizes['base_filters'],
                             augmentation=augment.paper_augmentation(p=0.5, background=0.0))
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            step()
            seconds = median_seconds(step, sizes['steps'], cuda)  # after a second warm-up step
            achieved = flops / seconds
            lines.append(f'| {name} | {"bf16" if amp else "fp32"} | {seconds * 1e3:.1f} | {achieved / 1e12:.3g} | '
                         f'{f"{achieved / peak:.1%}" if peak else "n/a"} | '
                         f'{f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if cuda else "n/a"} |')
            if amp:
                context['step s'][name] = seconds
    return lines


def gpu_validation(context) -> list[str]:
    """One whole scan through infer.predict_logits (one pass, bf16, our form) per network."""
    import infer
    import model
    device, sizes = context['device'], context['sizes']
    cuda = device.type == 'cuda'
    image, _ = sample(sizes['scan'], device=device)
    lines = [f'One {"x".join(map(str, sizes["scan"]))} scan (the MNI field of view at 1 mm; --quick: 4 mm), '
             '`infer.predict_logits` in one pass, bf16; median of 3 after one warm-up.', '',
             '| network | ms per scan | peak GPU GiB |', '|---|---|---|']
    context['scan s'] = {}
    for name in NETWORKS:
        net = model.fast_form(model.build_model(name, base_filters=sizes['base_filters']).to(device))
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds = median_seconds(lambda: infer.predict_logits(net, image[0], amp=True), 3, cuda)
        context['scan s'][name] = seconds
        lines.append(f'| {name} | {seconds * 1e3:.0f} | '
                     f'{f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if cuda else "n/a"} |')
    return lines


def gpu_projection(context) -> list[str]:
    """Table 2's wall time from the measured step and scan times: per cell, at most ``epochs`` epochs of
    one step per training patch and one pass per validation scan, then the test scans; 4 channels per
    network. Data reading, checkpoints and metrics are left out."""
    import data
    import train
    steps, scans = context.get('step s'), context.get('scan s')
    if not steps or not scans:
        return ['not projected: the training or validation section did not measure']
    protocol = train.PAPER
    split = {'train': 17, 'val': 2, 'test': 2}  # the paper's 17:2:2 of ISBI 2015's 21 scans (§4.1)
    cells = {name: protocol.epochs * (split['train'] * protocol.patches_per_scan * steps[name]
                                      + split['val'] * scans[name]) + split['test'] * scans[name]
             for name in NETWORKS}
    total = len(data.CHANNELS) * sum(cells.values())
    lines = [f'At most {protocol.epochs} epochs per cell (early stopping ends most sooner), '
             f'{split["train"]} x {protocol.patches_per_scan} patches per epoch, {split["val"]} validation and '
             f'{split["test"]} test scans, {len(data.CHANNELS)} channels per network, bf16, our form'
             f'{" (--quick: tiny sizes, not the protocol)" if context["quick"] else ""}:', '']
    lines += [f'- {name}: at most {train.duration(cells[name])} per cell' for name in NETWORKS]
    lines.append(f'- `python repro.py --table2`: at most {train.duration(total)}')
    return lines


def format_cell(column: str, value) -> str:
    if value is None:
        return 'n/a'
    if '/' in column:
        return f'{value:.1f}x'
    milliseconds = value * 1e3
    return f'{milliseconds:.2f}' if milliseconds < 10 else f'{milliseconds:.0f}'


def parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per benchmark, each with its own flags."""
    default_device = 'cuda' if torch.cuda.is_available() else 'cpu'
    top = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    commands = top.add_subparsers(dest='command', required=True)
    augment_parser = commands.add_parser('augment', help='augment.py against TorchIO 1.2.1, MONAI and mriaug')
    augment_parser.add_argument('--device', choices=('cpu', 'cuda'), default=default_device,
                                help='cuda adds our and mriaug\'s CUDA columns and runs the batch of 8 there '
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
    model_parser = commands.add_parser('model', help='parameters and GFLOP of both networks')
    model_parser.add_argument('--size', type=int, default=144, help='cube side in voxels (default 144)')
    model_parser.set_defaults(run=bench_model)
    train_parser = commands.add_parser('train', help='training step time of both networks: ours against the '
                                                     'plain eager step, side by side')
    train_parser.add_argument('--size', type=int, default=48, help='patch side in voxels (default 48)')
    train_parser.add_argument('--device', choices=('cpu', 'cuda'), default=default_device,
                              help='default: cuda when available')
    train_parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    train_parser.add_argument('--repeats', type=int, default=None,
                              help='timed steps per form (default 5, 2 with --quick)')
    train_parser.add_argument('--compile', action='store_true',
                              help='also race our form through torch.compile (its compile time shown apart)')
    train_parser.add_argument('--profile', action='store_true',
                              help='instead, where one step of ours goes: torch.profiler, self time per op')
    train_parser.add_argument('--fp32', dest='amp', action='store_false',
                              help='no autocast (default: bf16 autocast, as training)')
    train_parser.add_argument('--quick', action='store_true',
                              help='tiny networks (base filters 4) at 32^3, 2 repeats, 1 thread unless '
                                   '--threads: a smoke test')
    train_parser.set_defaults(run=bench_train)
    gpu_parser = commands.add_parser('gpu', help='everything on one GPU, into one markdown report')
    gpu_parser.add_argument('--report', default='gpu-report.md',
                            help='the markdown report to write; must not exist (default gpu-report.md)')
    gpu_parser.add_argument('--quick', action='store_true',
                            help='tiny sizes, seconds: without CUDA, the same code paths on the CPU')
    gpu_parser.add_argument('--no-compile', dest='compile', action='store_false',
                            help='leave out the torch.compile forms (they take minutes to compile)')
    gpu_parser.set_defaults(run=bench_gpu)
    return top


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.command == 'gpu':
        check_report(args)  # before anything is measured
    # The training entry point's allocator setting (repro.keep_freed_memory), for every library
    # timed here alike: without it each fresh 10-70 MB buffer faults its pages in again, which is
    # about 15% of our pipeline's time at 144^3 and not what a training step pays.
    keep_freed_memory()
    args.run(args)


def keep_freed_memory() -> bool:
    """repro.keep_freed_memory where repro imports (it needs nibabel); False where it does not."""
    try:
        import repro
    except ImportError:
        return False
    repro.keep_freed_memory()
    return True


if __name__ == '__main__':
    main()
