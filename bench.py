"""Benchmarks of the project's building blocks.

    python bench.py augment [--device cpu|cuda] [--repeats N] [--quick] [--threads N]
    python bench.py model [--size 144] [--time] [--device cpu|cuda] [--repeats N]

``augment`` times each of the paper's six augmentations and the whole pipeline, all at p=1
with TorchIO's default parameters (the flip always happens), on one 144^3 patch + label and one
181x217x181 volume + label: ours (augment.py) on the CPU, TorchIO 1.2.1 and MONAI on the CPU in
the same run, and ours on CUDA when present, one volume at a time and as a batch of 8. Each
figure is the median of ``--repeats`` calls after one warm-up call. The load average is printed
before and after each table: on a shared machine, multi-threaded eager torch code (ours, MONAI)
slows down far more than the load alone suggests, because every parallel op waits for its
slowest thread.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
import warnings

import torch

import augment

TRANSFORMS = ('Flip', 'Motion', 'BiasField', 'Noise', 'Affine', 'ElasticDeformation', 'pipeline')


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


def median_seconds(call, repeats: int, cuda: bool = False) -> float:
    """Median wall time of ``call()`` over ``repeats`` runs, after one warm-up run."""
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
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# augment

def ours(name: str):
    """Our transform ``name`` at p=1 with TorchIO's defaults (flip always)."""
    if name == 'pipeline':
        return augment.paper_augmentation(p=1.0)
    if name == 'Flip':
        return augment.RandomFlip(flip_probability=1.0)
    return getattr(augment, 'Random' + name)()


def torchio_transform(name: str):
    import torchio as tio
    if name == 'pipeline':
        return tio.Compose([torchio_transform(n) for n in TRANSFORMS[:-1]])
    if name == 'Flip':
        return tio.RandomFlip(flip_probability=1.0)
    return getattr(tio, 'Random' + name)()


def monai_transform(name: str):
    """MONAI's nearest equivalent (dict transforms on 'image' and 'label'); None for Motion."""
    from monai import transforms as mt
    keys, modes = ('image', 'label'), ('bilinear', 'nearest')
    if name == 'pipeline':
        return mt.Compose([t for t in map(monai_transform, TRANSFORMS[:-1]) if t is not None])
    return {
        'Flip': lambda: mt.RandFlipd(keys, prob=1.0, spatial_axis=0),
        'Motion': lambda: None,
        'BiasField': lambda: mt.RandBiasFieldd('image', degree=3, coeff_range=(-0.5, 0.5), prob=1.0),
        'Noise': lambda: mt.RandGaussianNoised('image', prob=1.0, std=0.25),
        'Affine': lambda: mt.RandAffined(keys, prob=1.0, rotate_range=(math.radians(10),) * 3,
                                         scale_range=(0.1,) * 3, mode=modes, padding_mode='border'),
        'ElasticDeformation': lambda: mt.Rand3DElasticd(keys, sigma_range=(5, 8), magnitude_range=(100, 200),
                                                        prob=1.0, mode=modes, padding_mode='border'),
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
    print(f'median of {repeats} calls after one warm-up; all transforms at p=1; times in ms\n')
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
        for name in TRANSFORMS:
            transform = ours(name)
            cpu_generator = torch.Generator().manual_seed(0)
            row = {'ours CPU': median_seconds(lambda: transform(image, label, cpu_generator), repeats)}
            if tio is not None:
                subject = tio.Subject(image=tio.ScalarImage(tensor=image[0]), label=tio.LabelMap(tensor=label[0]))
                theirs = torchio_transform(name)
                row['TorchIO CPU'] = median_seconds(lambda: theirs(subject), repeats)
                row['TorchIO / ours CPU'] = row['TorchIO CPU'] / row['ours CPU']
            monai_call = monai_transform(name) if monai is not None else None
            if monai_call is not None:
                data = {'image': image[0], 'label': label[0]}
                row['MONAI CPU'] = median_seconds(lambda: monai_call(data), repeats)
            batch_generator = torch.Generator(device=batch_device).manual_seed(0)
            if cuda:
                row['ours CUDA'] = median_seconds(
                    lambda: transform(cuda_image, cuda_label, batch_generator), repeats, cuda=True)
                if 'TorchIO CPU' in row:
                    row['TorchIO / ours CUDA'] = row['TorchIO CPU'] / row['ours CUDA']
            row[batch_column] = median_seconds(
                lambda: transform(batch_image, batch_label, batch_generator), repeats, cuda=cuda) / 8
            if 'TorchIO CPU' in row:
                row['TorchIO / ours batch 8'] = row['TorchIO CPU'] / row[batch_column]
            cells = [format_cell(column, row.get(column)) for column in columns]
            print(f'| {name} | ' + ' | '.join(cells) + ' |')
        print(f'\nload average after this table: {load()}\n')
    if monai is not None:
        print('MONAI has no motion artefact: its pipeline has five transforms.')


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
    args.run(args)


if __name__ == '__main__':
    main()
