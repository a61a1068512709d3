"""The paper's six 3-D augmentations in torch, batched, on any device, with TorchIO 1.2.1's semantics.

The paper augments every 144^3 training patch with TorchIO: Flip, Motion, Bias field, Noise, Affine
and Elastic deformation, in that order, each with a random probability, after Z-normalisation.
TorchIO transforms one volume at a time on the CPU through SimpleITK; this module does the same
arithmetic in torch, where the tensor lives, for a whole batch at once. Each section names the
TorchIO source it follows; ``tests/test_augment.py`` checks the results against TorchIO itself.

Call form: ``image, label = transform(image, label=None, generator=None)``. ``image`` is a
floating-point ``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)`` tensor on any device; ``label`` (optional, any
dtype) has the same batch size and spatial shape and any channel count. Intensity transforms touch
the image only; spatial ones move image and label with one draw, the label by nearest neighbour, so
that it keeps its values and dtype. ``generator`` is a CPU ``torch.Generator`` (what is drawn from it,
and where: :meth:`Transform.plan`). Inputs are never modified in place (an untouched one may be
returned as is). A tensor's voxel axes are the world axes R, A, S, origin at voxel (0, 0, 0)
(TorchIO's identity affine), voxels ``spacing`` mm apart (default 1 mm); rotations are in degrees,
translations and displacements in mm.

Contents, in this order: :class:`Transform`, :class:`Compose` and :func:`paper_augmentation`; one
section per transform of the pipeline, each with its ``Random`` class: Flip, Motion, BiasField,
Noise, Affine, ElasticDeformation; AffineElasticDeformation (the last two in one resampling);
ZNormalization; :class:`CUDAGraphCall`; then the shared machinery: argument parsing, the host's
draws and their upload, grids, and resampling with ITK's inside test.

Deviations from TorchIO 1.2.1:
    * Motion rotates about the image centre; TorchIO sets that centre, then drops it
      (``Motion.get_rigid_transforms``) and pivots about world (0, 0, 0), a corner of a raw tensor.
    * Labels keep their dtype (TorchIO returns float32). Their nearest lookups and the inside tests
      run in float32 on a grid shifted to round an exact half voxel up, as ITK does in float64;
      within float32 rounding of a half voxel they can differ from ITK. Motion, which has no label,
      tests on the unshifted grid, where a GPU's lookup counts the tie ``u = n - 0.5`` inside for odd n.
    * A transform applies when its draw ``r < p`` (TorchIO: ``r <= p``), and every element's
      parameters are drawn whatever its decision. Noise is drawn on the image's device from a seed
      drawn from ``generator``, not on the CPU from a ``seed`` argument.
    * Not offered: interpolators other than ``'linear'`` and ``'nearest'``, Affine's ``'otsu'`` pad,
      ``label_interpolation`` (labels are always nearest), TorchIO's special cases for 2-D images.
    * Extensions: ``default_pad_value`` for Motion and Elastic, pads per element or channel (Affine's
      too), ElasticDeformation without ``max_displacement``, and :class:`AffineElasticDeformation`,
      which resamples once where the pipeline resamples twice.

Example
    >>> import torch, augment
    >>> g = torch.Generator().manual_seed(0)
    >>> image, label = torch.randn(1, 1, 32, 32, 32), torch.zeros(1, 1, 32, 32, 32, dtype=torch.uint8)
    >>> image, label = augment.paper_augmentation()(image, label, generator=g)
    >>> image.shape, label.dtype
    (torch.Size([1, 1, 32, 32, 32]), torch.uint8)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

__all__ = [
    'Transform', 'Compose', 'ZNormalization',
    'Flip', 'RandomFlip', 'Motion', 'RandomMotion', 'BiasField', 'RandomBiasField',
    'Noise', 'RandomNoise', 'Affine', 'RandomAffine',
    'ElasticDeformation', 'RandomElasticDeformation', 'AffineElasticDeformation',
    'RandomAffineElasticDeformation', 'paper_augmentation', 'CUDAGraphCall',
]


# ---------------------------------------------------------------------------------------------
# The call: every transform is a Transform; Compose chains them; the paper's pipeline.

class Transform:
    """Base of every transform: checks the input, handles the batch and the probability ``p``.

    A call is :meth:`plan` (the host's part) then :meth:`run` (the device's). Each element of a
    batch draws its own parameters, its own ``p`` decision included, and the whole batch goes
    through vectorised calls (one ``grid_sample``, one FFT, ...); the only loop over the batch is
    ZNormalization's callable mask, user code written for one ``(C, X, Y, Z)`` image as in TorchIO.

    Args:
        p: Probability, in [0, 1], that the transform is applied to a batch element; each
            element draws its own decision ``r ~ U[0, 1)`` (float64) and is transformed iff
            ``r < p`` (TorchIO: ``r <= p``, so that p = 0 applies with probability 2^-24).
            Default 1: always, and no decision is drawn. Only the elements drawn are
            transformed; the others are returned as they came. Deviation from TorchIO: the
            parameters of every element are drawn whatever its decision, so that a call always
            takes the same count of numbers from the generator.

    Subclasses implement ``_draw(batch, channels, shape, generator)`` (host: draws and
    parameter arithmetic; returns host tensors with a leading batch axis and Python values),
    ``_apply(image, label, params)`` (device work on 5-D tensors: one upload of the host tensors,
    no branch on a tensor's value) and, where params hold more than batch-indexed tensors,
    ``_select(params, index)``. A random class whose ``_draw`` returns what its deterministic
    class X plans says so, ``class RandomX(Transform, draws_for=X)``, and then applies its draws
    with X's ``_apply`` (and moves the label when X does).
    """

    # False for intensity transforms, which leave the label as it came: below p = 1 their chosen
    # elements go through without their labels, which are neither gathered nor written back.
    moves_label = True

    def __init_subclass__(cls, draws_for: type[Transform] | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if draws_for is not None:
            cls._apply, cls.moves_label = draws_for._apply, draws_for.moves_label

    def __init__(self, p: float = 1.0):
        self.p = _parse_probability(p, 'p')

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        """Return ``(image, label)`` transformed; ``label`` stays None when not given.

        Args:
            image: Floating-point ``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)`` tensor, on any device.
            label: Optional tensor of any dtype with the image's layout, batch size and spatial
                shape (channels may differ), on the image's device.
            generator: CPU ``torch.Generator``, the source of every random number (see
                :meth:`plan`); None uses torch's default CPU generator.
        """
        if not isinstance(image, torch.Tensor) or image.ndim not in (4, 5):
            raise ValueError('image must be a (C, X, Y, Z) or (B, C, X, Y, Z) tensor, got '
                             f'{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image)}')
        if not image.is_floating_point():
            raise ValueError(f'image must be a floating-point tensor, got {image.dtype}')
        if label is not None and not (
                isinstance(label, torch.Tensor) and label.ndim == image.ndim
                and label.shape[-3:] == image.shape[-3:] and label.device == image.device
                and (image.ndim == 4 or label.shape[0] == image.shape[0])):
            raise ValueError('label must be a tensor on the image device with the same layout, batch '
                             f'size and spatial shape as the image {tuple(image.shape)}, got '
                             f'{tuple(label.shape) if isinstance(label, torch.Tensor) else type(label)}')
        generator = _host_generator(generator)
        unbatched = image.ndim == 4
        if unbatched:
            image, label = image[None], None if label is None else label[None]
        plan = self.plan(len(image), image.shape[1], tuple(image.shape[2:]), generator)
        image, label = self.run(image, label, plan)
        if unbatched:
            image, label = image[0], None if label is None else label[0]
        return image, label

    def plan(self, batch: int, channels: int, shape: tuple[int, int, int], generator: torch.Generator):
        """The host's part of a call on a ``(batch, channels, *shape)`` image on any device.

        Every random number of a call is drawn here, on the host, from ``generator`` (a CPU
        ``torch.Generator``) whatever the image's device, in a fixed order: per transform, in a
        Compose's order, the ``batch`` decisions (when p < 1), then the parameters of every
        element, chosen or not (so that a call takes the same count of numbers whatever it
        decides), and for Noise one seed from which the per-voxel noise is drawn on the device.
        The parameter arithmetic (rotation matrices, motion cuts, spline coefficients, k-space
        weights) is done here too, in float64. A seeded generator thus repeats a call exactly on
        a given device; CPU and CUDA differ in the noise only. The streams differ from TorchIO's,
        which draws on the global generator, so parity with TorchIO is tested through the
        deterministic classes.

        Returns ``(chosen, params)``: chosen None (p = 1) or a bool tensor (batch,); params holds
        host tensors with a leading batch axis and Python values (which :meth:`run` may branch on).
        """
        chosen = None if self.p == 1 else torch.rand(batch, dtype=torch.float64, generator=generator) < self.p
        return chosen, self._draw(batch, channels, shape, generator)

    def run(self, image: torch.Tensor, label: torch.Tensor | None, plan, owned: Sequence[torch.Tensor] = ()):
        """Apply a plan to 5-D tensors on their device: only the elements it chose go through
        ``_apply``.

        The plan's host tensors are copied to the device once per transform, pinned and without
        blocking on CUDA, and no value is read back (except by ZNormalization, which checks that
        no standard deviation is 0). Arithmetic runs in float32 (float64 images stay float64):
        float16 and bfloat16 images are upcast for it, because sampling coordinates, FFTs and the
        bias polynomial need float32 precision, and the result is cast back to the input dtype.

        At p = 1 this is device work only, with no graph break under ``torch.compile`` and no host
        sync, so that new plans reuse one compiled graph and :class:`CUDAGraphCall` can capture
        it. Below 1 it gathers the chosen elements (with their labels for a spatial transform
        only), which changes shapes (eager mode), transforms them and writes them back in place
        into those of ``image`` and ``label`` that are in ``owned`` (buffers of the call, never the
        caller's: Compose passes what its earlier steps wrote), into a copy of the others.
        """
        chosen, params = plan
        if chosen is None or bool(chosen.all()):
            return self._apply(image, label, params)
        if not bool(chosen.any()):
            return image, label
        index = chosen.nonzero()[:, 0]
        on_device = index.to(image.device, non_blocking=True)
        moved = label is not None and self.moves_label
        new_image, new_label = self._apply(image.index_select(0, on_device),
                                           label.index_select(0, on_device) if moved else None,
                                           self._select(params, index))

        def write_back(old, new):
            if any(old is tensor for tensor in owned):
                return old.index_copy_(0, on_device, new)
            return old.index_copy(0, on_device, new)

        return write_back(image, new_image), write_back(label, new_label) if moved else label

    def _draw(self, batch, channels, shape, generator):
        return None

    def _select(self, params, index: torch.Tensor):
        """The parameters of the batch elements ``index`` (host)."""
        return _take(params, index)

    def _apply(self, image, label, params):
        raise NotImplementedError


class Compose(Transform):
    """Apply transforms one after the other, all of them with probability ``p``.

    Args:
        transforms: Sequence of transforms, applied in order; each still draws its own
            probability. Elements of this module are planned with the Compose (their numbers are
            drawn when the Compose draws, in order); any other callable with this module's call
            form is called with the generator when its turn comes.
        p: Probability that the whole sequence is applied to a batch element. Default 1.

    Example:
        >>> image, label = torch.rand(1, 1, 32, 32, 32), torch.zeros(1, 1, 32, 32, 32)
        >>> pipeline = Compose([RandomFlip(), RandomNoise(std=0.1)], p=0.8)
        >>> pipeline(image, label, generator=torch.Generator().manual_seed(0))[0].shape
        torch.Size([1, 1, 32, 32, 32])
    """

    def __init__(self, transforms: Sequence[Callable], p: float = 1.0):
        super().__init__(p)
        if isinstance(transforms, (str, bytes)) or not isinstance(transforms, Sequence) \
                or not all(callable(t) for t in transforms):
            raise ValueError(f'transforms must be a sequence of transforms, got {transforms!r}')
        self.transforms = list(transforms)

    def _draw(self, batch, channels, shape, generator):
        return [t.plan(batch, channels, shape, generator) if isinstance(t, Transform) else generator
                for t in self.transforms]

    def _select(self, params, index):
        return [(None if plan[0] is None else plan[0][index], transform._select(plan[1], index))
                if isinstance(transform, Transform) else plan for transform, plan in zip(self.transforms, params)]

    def _apply(self, image, label, params):
        owned = []  # what earlier steps wrote: a later step may write its chosen elements into it
        for transform, plan in zip(self.transforms, params):
            if isinstance(transform, Transform):
                out = transform.run(image, label, plan, owned)
                # A transform returns its input as it came or new tensors, never a view of them.
                owned = [new for new, old in zip(out, (image, label))
                         if new is not None and (new is not old or any(new is tensor for tensor in owned))]
            else:
                out = transform(image, label, plan)
                owned = []  # another callable may keep, or return a view of, what it was given
            image, label = out
        return image, label


def paper_augmentation(p: float = 0.5, spacing=None, background=None, single_resampling: bool = False) -> Compose:
    """The paper's augmentation: Flip, Motion, Bias field, Noise, Affine, Elastic deformation.

    In the paper's order, each applied independently with probability ``p``, every other
    parameter at TorchIO's default (the paper names TorchIO's transforms and no parameter):
    left-right flip; 2 motions of U(-10, 10) degrees and U(-10, 10) mm; order-3 bias field with
    coefficients U(-0.5, 0.5); noise with std U(0, 0.25) (Z-normalised units); scales
    U(0.9, 1.1) and rotations U(-10, 10) degrees per axis; elastic deformation on 7^3 control
    points with displacements up to 7.5 mm. The flip is drawn with ``flip_probability=1`` so
    that, like the other five, it happens with probability exactly ``p``.

    Why p = 0.5: the paper applies the transforms "sequentially with a random probability"
    without numbers; 0.5 makes every one of the 64 on/off combinations equally likely, so the
    network sees unaugmented-looking patches (1/64) as well as the full chain (1/64).
    Z-normalisation is not part of it: the paper normalises each scan before cutting patches.

    Args:
        p: Probability of each of the six transforms, in [0, 1]. Default 0.5.
        spacing: Voxel size ``(sx, sy, sz)`` in mm for Motion, Affine and Elastic. Default 1 mm.
        background: The image value outside the input for Motion, Affine and Elastic, in the
            image's intensity units. None (default): each channel's minimum, TorchIO's rule (in
            the paper's pipeline the background was the minimum). A number; or one value per
            batch element ``(B,)``, per channel ``(C,)`` (e.g. each channel's background after a
            per-channel normalisation) or both ``(B, C)``; a 1-D array with B == C > 1 is
            ambiguous and raises. Extension: TorchIO's Motion and Elastic always pad with the
            minimum, which after a Z-normalisation that leaves the background at 0 would frame
            a moved patch with the (negative) minimum, a frame real scans never have.
        single_resampling: If True, Affine and Elastic become one
            :class:`RandomAffineElasticDeformation` (one interpolation, one decision ``p`` for
            both, so the stream of draws differs too). Default False: the paper's two steps.
            Deviation when True: see :class:`AffineElasticDeformation`.

    Example:
        >>> patch, label = torch.randn(1, 2, 64, 64, 64), torch.zeros(1, 1, 64, 64, 64)
        >>> augmentation = paper_augmentation(spacing=(1.0, 1.0, 1.2), background=[0.0, -0.5])
        >>> out, out_label = augmentation(patch, label, generator=torch.Generator().manual_seed(0))
        >>> out.shape, out_label.shape
        (torch.Size([1, 2, 64, 64, 64]), torch.Size([1, 1, 64, 64, 64]))
    """
    pad = 'minimum' if background is None else _parse_pad(background, 'background')
    return Compose([
        RandomFlip(axes=0, flip_probability=1.0, p=p),
        RandomMotion(spacing=spacing, default_pad_value=pad, p=p),
        RandomBiasField(p=p),
        RandomNoise(p=p),
        *([RandomAffineElasticDeformation(spacing=spacing, default_pad_value=pad, p=p)] if single_resampling else
          [RandomAffine(spacing=spacing, default_pad_value=pad, p=p),
           RandomElasticDeformation(spacing=spacing, default_pad_value=pad, p=p)]),
    ])


# ---------------------------------------------------------------------------------------------
# Flip (TorchIO's transforms/augmentation/spatial/random_flip.py).

class Flip(Transform):
    """Reverse the order of voxels along the given spatial axes, in image and label.

    Args:
        axes: Spatial axis index (0, 1, 2 for X, Y, Z) or tuple of them; anatomical names
            (``'LR'``, ``'Left'``, ``'AP'``, ``'IS'``, ...; first letter used) name the axes of a
            RAS-aligned tensor. The voxel grid is not moved (TorchIO keeps the affine).
        p: Probability of applying the transform. Default 1.

    Example:
        >>> image = torch.arange(4.0).view(1, 1, 4, 1, 1)
        >>> Flip(axes=0)(image)[0].flatten().tolist()
        [3.0, 2.0, 1.0, 0.0]
    """

    def __init__(self, axes, p: float = 1.0):
        super().__init__(p)
        self.axes = _parse_axes(axes)

    def _apply(self, image, label, params):
        dims = [axis + 2 for axis in self.axes]
        return image.flip(dims), None if label is None else label.flip(dims)


class RandomFlip(Transform):
    """Flip each of the given axes with probability ``flip_probability``.

    Draws ``r ~ U[0, 1)^3`` per batch element (all three axes, as TorchIO) and flips axis i iff
    i is in ``axes`` and ``r[i] < flip_probability``.

    Args:
        axes: Axes that may be flipped, as in :class:`Flip`. Default ``0`` (X, left-right only:
            TorchIO's default).
        flip_probability: Probability, per axis, of a flip, in [0, 1]. Default 0.5.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> image = torch.rand(1, 1, 8, 8, 8)
        >>> out, _ = RandomFlip(axes=('LR',), flip_probability=1.0)(image)
        >>> torch.equal(out, image.flip(2))
        True
    """

    def __init__(self, axes=0, flip_probability: float = 0.5, p: float = 1.0):
        super().__init__(p)
        self.axes = _parse_axes(axes)
        self.flip_probability = _parse_probability(flip_probability, 'flip_probability')

    def _draw(self, batch, channels, shape, generator):
        return _flip_plan(torch.rand(batch, 3, dtype=torch.float64, generator=generator) < self.flip_probability,
                          self.axes)

    def _select(self, params, index):
        return _flip_plan(params['flips'][index], self.axes)

    def _apply(self, image, label, params):
        for axis, flip in params['axes']:
            image = _flip_where(image, flip, axis + 2)
            label = None if label is None else _flip_where(label, flip, axis + 2)
        return image, label


def _parse_axes(axes) -> tuple[int, ...]:
    """Axis indices 0, 1, 2, or anatomical names read by their first letter on a RAS tensor."""
    letters = {'L': 0, 'R': 0, 'A': 1, 'P': 1, 'I': 2, 'S': 2}
    items = axes if isinstance(axes, (tuple, list)) else (axes,)
    parsed = []
    for axis in items:
        if isinstance(axis, str) and axis[:1].upper() in letters:
            parsed.append(letters[axis[0].upper()])
        elif isinstance(axis, int) and not isinstance(axis, bool) and axis in (0, 1, 2):
            parsed.append(axis)
        else:
            raise ValueError('axes must be spatial axis indices in {0, 1, 2} or anatomical names '
                             f"('LR', 'AP', 'IS', 'Left', ...), got {axes!r}")
    return tuple(sorted(set(parsed)))


def _flip_plan(flips: torch.Tensor, axes) -> dict:
    """Per axis of ``axes`` that some element flips: ``'all'`` or the host index of the elements
    that flip it, decided on the host so that the device part does not branch on a tensor."""
    plan = []
    for axis in axes:
        flip = flips[:, axis]
        if bool(flip.all()):
            plan.append((axis, 'all'))
        elif bool(flip.any()):
            plan.append((axis, flip.nonzero()[:, 0]))
    return {'flips': flips, 'axes': tuple(plan)}


def _flip_where(x: torch.Tensor, flip, dim: int) -> torch.Tensor:
    """Flip ``dim`` of the batch elements ``flip``: ``'all'`` or a host index tensor."""
    if isinstance(flip, str):
        return x.flip(dim)
    index = flip.to(x.device, non_blocking=True)
    return x.index_copy(0, index, x.index_select(0, index).flip(dim))


# ---------------------------------------------------------------------------------------------
# Motion (TorchIO's transforms/augmentation/intensity/random_motion.py).

class Motion(Transform):
    """MRI motion artefact (Shaw et al. 2019): k-space filled from several rigid poses.

    Each of the n motions is a rigid transform relative to the original pose. The image and its n
    moved copies are Fourier transformed; k-space (centred) is cut along the last axis (Z) into
    n + 1 segments at ``int(Z * times)``, segment s filled from pose s (pose 0 = original), except
    that the original and pose m swap segments, m being the first motion whose time exceeds 0.5:
    the original fills the k-space centre. The image is the real part of the inverse transform;
    labels are untouched. All channels of a batch element move alike.

    Deviation: TorchIO 1.2.1 rotates about world (0, 0, 0), voxel (0, 0, 0) of a raw tensor,
    because ``Motion.get_rigid_transforms`` sets the centre of its ``sitk.Euler3DTransform`` and
    then builds the matrix from ``GetTranslation()`` alone, dropping the centre; here the pivot is
    the image centre, voxel ``(shape - 1) / 2``. TorchIO's result is recovered by giving its image
    an origin at minus that centre (the parity test does so).

    Args:
        degrees: Rotation angles ``(n, 3)`` in degrees, or ``(B, n, 3)`` per batch element, about
            the three axes in TorchIO's convention (ITK Euler ``Rz @ Rx @ Ry`` in LPS).
        translation: Translations ``(n, 3)`` or ``(B, n, 3)`` in mm, in TorchIO's convention
            (LPS: the first two components move towards -X and -Y of the tensor).
        times: ``(n,)`` or ``(B, n)`` fractions in [0, 1] of the acquisition at which each motion
            starts.
        image_interpolation: ``'linear'`` (default) or ``'nearest'``.
        spacing: Voxel size ``(sx, sy, sz)`` in mm. Default 1 mm isotropic.
        default_pad_value: Value of the moved copies outside the input, in intensity units:
            ``'minimum'`` (default: each channel's minimum, as TorchIO), a number, or one value
            per batch element ``(B,)``, per channel ``(C,)`` or both ``(B, C)``. Extension: TorchIO
            has no such argument.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> motion = Motion(degrees=[[5, -3, 8], [0, 2, -4]], translation=[[1, -2, .5], [.3, 0, -1]],
        ...                 times=[0.3, 0.62])
        >>> motion(torch.rand(1, 1, 16, 16, 16))[0].shape
        torch.Size([1, 1, 16, 16, 16])
    """

    moves_label = False

    def __init__(self, degrees, translation, times, image_interpolation: str = 'linear',
                 spacing=None, default_pad_value='minimum', p: float = 1.0):
        super().__init__(p)
        self.times = torch.as_tensor(times, dtype=torch.float64)
        if self.times.ndim not in (1, 2) or self.times.shape[-1] < 1:
            raise ValueError(f'times must have shape (n,) or (B, n), n >= 1, got {tuple(self.times.shape)}')
        self.times = self.times.reshape(-1, self.times.shape[-1])
        n = self.times.shape[-1]
        self.degrees = _parameter(degrees, (n, 3), 'degrees')
        self.translation = _parameter(translation, (n, 3), 'translation')
        self.image_interpolation = _parse_interpolation(image_interpolation)
        self.spacing = _parse_spacing(spacing)
        self.default_pad_value = _parse_pad(default_pad_value, 'default_pad_value')

    def _draw(self, batch, channels, shape, generator):
        return _motion_plan(*(_per_element(getattr(self, name), batch, name) for name in ('degrees', 'translation', 'times')),
                            _pad_plan(self.default_pad_value, batch, channels, 'default_pad_value'), self.spacing, shape)

    def _apply(self, image, label, params):
        return _motion(image, params, self.image_interpolation), label


class RandomMotion(Transform, draws_for=Motion):
    """Random MRI motion artefact; see :class:`Motion` (including the pivot deviation).

    Per batch element, in this order: ``degrees ~ U(degrees range)`` and ``translation ~
    U(translation range)``, each of shape (num_transforms, 3), then ``times[m] = (m + 1) / (n + 1)
    + U(-0.3, 0.3) / (n + 1)``. (TorchIO builds the grid with a float ``arange`` that has one
    value too many for some n, e.g. 48; here it is exact.)

    Args:
        degrees: ``d`` -> angles ~ U(-d, d), or a range ``(a, b)``; degrees. Default 10.
        translation: ``t`` -> U(-t, t), or ``(a, b)``; mm. Default 10.
        num_transforms: Number of motions n, an integer >= 1. Default 2.
        image_interpolation: ``'linear'`` (default) or ``'nearest'``.
        spacing: Voxel size ``(sx, sy, sz)`` in mm. Default 1 mm isotropic.
        default_pad_value: As in :class:`Motion` (an extension). Default ``'minimum'``.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> image = torch.rand(1, 1, 16, 16, 16)
        >>> out, _ = RandomMotion(degrees=10, translation=10, num_transforms=2)(image)
        >>> out.shape
        torch.Size([1, 1, 16, 16, 16])
    """

    def __init__(self, degrees=10, translation=10, num_transforms: int = 2,
                 image_interpolation: str = 'linear', spacing=None, default_pad_value='minimum', p: float = 1.0):
        super().__init__(p)
        self.degrees_range = _parse_range(degrees, 'degrees')
        self.translation_range = _parse_range(translation, 'translation')
        if not isinstance(num_transforms, int) or isinstance(num_transforms, bool) or num_transforms < 1:
            raise ValueError(f'num_transforms must be an integer >= 1, got {num_transforms!r}')
        self.num_transforms = num_transforms
        self.image_interpolation = _parse_interpolation(image_interpolation)
        self.spacing = _parse_spacing(spacing)
        self.default_pad_value = _parse_pad(default_pad_value, 'default_pad_value')

    def _draw(self, batch, channels, shape, generator):
        n = self.num_transforms
        degrees = _uniform(*self.degrees_range, (batch, n, 3), generator)
        translation = _uniform(*self.translation_range, (batch, n, 3), generator)
        step = 1 / (n + 1)
        times = torch.arange(1, n + 1, dtype=torch.float64) * step + _uniform(-0.3 * step, 0.3 * step, (batch, n),
                                                                               generator)
        return _motion_plan(degrees, translation, times,
                            _pad_plan(self.default_pad_value, batch, channels, 'default_pad_value'), self.spacing, shape)


def _motion_plan(degrees, translation, times, pad, spacing, shape) -> dict:
    """Host float64 parameters of a Motion call: the affine_grid matrices (B, n, 3, 4) of the
    moved poses, the k-space weights (B, n + 1, Z // 2 + 1) and the pad ('minimum' or (B, C))."""
    batch, n, _ = degrees.shape
    matrix, offset = _motion_maps(degrees, translation, spacing, shape)
    theta = _theta(matrix.view(-1, 3, 3), offset.view(-1, 3), shape).view(batch, n, 3, 4)
    return {'theta': theta, 'weights': _kspace_weights(times, shape[2]), 'pad': pad}


def _motion_maps(degrees: torch.Tensor, translation: torch.Tensor, spacing, shape):
    """Host float64 voxel maps ``u = matrix @ v + offset`` of the moved poses, (B, n, 3, 3) and
    (B, n, 3), from TorchIO's degrees and translations (B, n, 3).

    TorchIO's map, conjugated from LPS to RAS: u = S^-1 Rz(g) Rx(-a) Ry(-b) S (v - c) + c +
    S^-1 (-t0, -t1, t2), pivot c = the image centre. Float64, so that right angles and integer
    shifts land exactly on voxels.
    """
    batch, n, _ = degrees.shape
    angles = torch.deg2rad(degrees.reshape(-1, 3))
    matrix = _to_voxels(_euler(-angles[:, 0], -angles[:, 1], angles[:, 2]), spacing)
    sign_over_spacing = torch.tensor([s / v for s, v in zip((-1, -1, 1), spacing)], dtype=torch.float64)
    centre = torch.tensor([(size - 1) / 2 for size in shape], dtype=torch.float64)
    offset = centre - matrix @ centre + translation.reshape(-1, 3) * sign_over_spacing
    return matrix.view(batch, n, 3, 3), offset.view(batch, n, 3)


def _kspace_weights(times: torch.Tensor, size: int) -> torch.Tensor:
    """Host float64 weights ``(B, n + 1, size // 2 + 1)`` of the original (0) and moved images
    (1..n) in the real FFT along the last axis.

    TorchIO cuts the fftshifted k-space along the last axis at ``int(size * times)``, fills segment
    s with spectrum s, and first swaps the original spectrum into the segment of the first time
    above 0.5 (the k-space centre). The cuts depend on the last axis only, so the FFTs along the
    other two axes cancel, and because TorchIO keeps the real part, each weight can be replaced by
    its symmetric part (w[k] + w[-k]) / 2, which makes a real FFT enough.
    """
    batch, n = times.shape
    index = torch.arange(size)
    cuts = torch.cat([torch.zeros(batch, 1, dtype=torch.long), (size * times).long(),
                      torch.full((batch, 1), size, dtype=torch.long)], 1)
    # TorchIO assigns segments in order, so with unsorted times the last segment covering k wins.
    covers = (cuts[:, :-1, None] <= index) & (index < cuts[:, 1:, None])
    segments = torch.arange(n + 1).view(1, -1, 1)
    segment = torch.where(covers, segments, -1).amax(1)
    late = times > 0.5
    swap = torch.where(late.any(1), late.double().argmax(1), n)[:, None]
    owner = torch.where(segment == 0, swap, torch.where(segment == swap, 0, segment))
    weights = torch.fft.ifftshift((owner[:, None] == segments).double(), dim=-1)
    weights = (weights + weights.flip(-1).roll(1, -1)) / 2
    return weights[..., : size // 2 + 1]


def _motion(image, params, interpolation):
    """Motion artefact from the host parameters of ``_motion_plan``."""
    x = image.to(_work_dtype(image.dtype))
    batch, channels, *shape = x.shape
    n = params['theta'].shape[1]
    numeric_pad = isinstance(params['pad'], torch.Tensor)
    theta, weights, *pad = _upload(x.device, x.dtype, params['theta'], params['weights'],
                                   *([params['pad']] if numeric_pad else []))
    pad = pad[0].view(batch, channels, 1, 1, 1) if numeric_pad else _min_pad(x, x.dtype)
    # All moved copies of all elements in one resampling, one FFT along Z, one weighted sum.
    grid = _affine_grid(theta.view(-1, 3, 4), batch, shape)
    moved, = _resample([(x, grid, pad, _mode(interpolation))], grid)
    spectra = torch.fft.rfft(moved.view(batch, channels, n, *shape), dim=-1)
    weights = weights.view(batch, 1, n + 1, 1, 1, -1)
    spectrum = torch.fft.rfft(x, dim=-1).mul_(weights[:, :, 0])
    for m in range(n):  # accumulated in place: one read of each copy's spectrum, no temporary
        spectrum.addcmul_(spectra[:, :, m], weights[:, :, m + 1])
    return torch.fft.irfft(spectrum, n=shape[2], dim=-1).to(image.dtype)


# ---------------------------------------------------------------------------------------------
# Bias field (TorchIO's transforms/augmentation/intensity/random_bias_field.py).

class BiasField(Transform):
    """Multiply the image by a smooth field ``exp(polynomial)`` (MRI intensity inhomogeneity).

    ``field(i, j, k) = exp(sum_n coefficients[n] * x_i^a * y_j^b * z_k^c)`` with
    ``x, y, z = linspace(-1, 1)`` over the voxel indices of each axis (0 for an axis of one voxel;
    spacing is ignored, as in TorchIO), and the terms a + b + c <= order in TorchIO's order:
    a outermost, c fastest, so for order 3: 000 001 002 003 010 011 012 020 021 030 100 101 102
    110 111 120 200 201 210 300 (exponents of x, y, z). The constant term is a global gain
    ``exp(c_000)``. One field per batch element, shared by its channels; labels are untouched.

    Args:
        coefficients: ``(order + 1)(order + 2)(order + 3) / 6`` numbers (20 for order 3), or a
            ``(B, N)`` array, one row per batch element; dimensionless (log of the gain).
        order: Polynomial order, an integer >= 0. Default 3.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> out, _ = BiasField(coefficients=[0.3] + [0.0] * 19, order=3)(torch.ones(1, 1, 8, 8, 8))
        >>> round(out.max().item(), 4)  # e^0.3
        1.3499
    """

    moves_label = False

    def __init__(self, coefficients, order: int = 3, p: float = 1.0):
        super().__init__(p)
        self.order = _parse_order(order)
        self.coefficients = _parameter(coefficients, (len(_bias_exponents(self.order)),), 'coefficients')

    def _draw(self, batch, channels, shape, generator):
        return _dense_coefficients(_per_element(self.coefficients, batch, 'coefficients'), self.order)

    def _apply(self, image, label, coefficients):
        return _bias_field(image, coefficients, self.order), label


class RandomBiasField(Transform, draws_for=BiasField):
    """Random bias field; see :class:`BiasField`.

    Per batch element, every coefficient (the constant term included) is drawn independently,
    ``U(coefficients range)``.

    Args:
        coefficients: ``d`` -> U(-d, d), or a range ``(a, b)``; dimensionless (log of the gain).
            Default 0.5.
        order: Polynomial order, an integer >= 0. Default 3 (20 coefficients).
        p: Probability of applying the transform. Default 1.

    Example:
        >>> out, _ = RandomBiasField(coefficients=0.5, order=3)(torch.ones(1, 1, 8, 8, 8))
        >>> bool(out.min() > 0)
        True
    """

    def __init__(self, coefficients=0.5, order: int = 3, p: float = 1.0):
        super().__init__(p)
        self.coefficients_range = _parse_range(coefficients, 'coefficients')
        self.order = _parse_order(order)

    def _draw(self, batch, channels, shape, generator):
        return _dense_coefficients(_uniform(*self.coefficients_range, (batch, len(_bias_exponents(self.order))),
                                            generator), self.order)


def _parse_order(order) -> int:
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise ValueError(f'order must be an integer >= 0, got {order!r}')
    return order


@functools.lru_cache(maxsize=16)
def _bias_exponents(order: int) -> list[tuple[int, int, int]]:
    """Exponents (a, b, c) of x, y, z in TorchIO's coefficient order (c fastest)."""
    return [(a, b, c) for a in range(order + 1) for b in range(order + 1 - a)
            for c in range(order + 1 - a - b)]


def _dense_coefficients(coefficients: torch.Tensor, order: int) -> torch.Tensor:
    """Host float64 (B, o + 1, o + 1, o + 1) array of the coefficients (B, N), zero where a + b + c > o."""
    batch = len(coefficients)
    dense = torch.zeros(batch, (order + 1) ** 3, dtype=torch.float64)
    dense[:, [(a * (order + 1) + b) * (order + 1) + c for a, b, c in _bias_exponents(order)]] = coefficients
    return dense.view(batch, order + 1, order + 1, order + 1)


def _bias_field(image: torch.Tensor, dense: torch.Tensor, order: int) -> torch.Tensor:
    """``image * exp(sum_n coef[n] x^a y^b z^c)``; ``dense`` from ``_dense_coefficients``, on the host."""
    x = image.to(_work_dtype(image.dtype))
    batch = len(x)
    dense, = _upload(x.device, x.dtype, dense)
    px, py, pz = _bias_powers(tuple(x.shape[2:]), order, x.device, x.dtype)
    # Separable: contract z, then y on small tensors, then x in one matmul for the full volume.
    partial = torch.einsum('yb,zc,nabc->nayz', py, pz, dense)
    log_field = (px @ partial.reshape(batch, order + 1, -1)).view(batch, 1, *x.shape[2:])
    return (x * log_field.exp_()).to(image.dtype)


@functools.lru_cache(maxsize=16)
def _bias_powers(shape: tuple[int, int, int], order: int, device: torch.device, dtype: torch.dtype):
    """Per axis, ``coordinate ** arange(order + 1)``, coordinates linspace(-1, 1) (0 for one voxel)."""
    powers = []
    for size in shape:
        coordinate = torch.linspace(-1, 1, size, dtype=torch.float64) if size > 1 \
            else torch.zeros(1, dtype=torch.float64)  # TorchIO: a single voxel sits at 0
        powers.append((coordinate[:, None] ** torch.arange(order + 1)).to(device, dtype))
    return powers


# ---------------------------------------------------------------------------------------------
# Noise (TorchIO's transforms/augmentation/intensity/random_noise.py).

class Noise(Transform):
    """Add Gaussian noise ``N(mean, std^2)``, independent per voxel and channel, to the image.

    Intensities are absolute, which is why the paper Z-normalises first. Labels are untouched.
    Deviation: TorchIO draws the noise from the CPU's global generator seeded with a ``seed``
    parameter; here each call draws a seed from ``generator`` (the host), and the noise is
    drawn on the image's device from it, so there is no ``seed`` argument and CPU and CUDA
    noise differ.

    Args:
        mean: Mean of the noise, a number or one per batch element ``(B,)``; intensity units.
        std: Standard deviation, a number >= 0 or ``(B,)``; intensity units.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> out, _ = Noise(mean=0.0, std=0.1)(torch.zeros(1, 1, 32, 32, 32), generator=torch.Generator())
        >>> round(out.std().item(), 2)
        0.1
    """

    moves_label = False

    def __init__(self, mean, std, p: float = 1.0):
        super().__init__(p)
        self.mean = _parameter(mean, (), 'mean')
        self.std = _parameter(std, (), 'std')
        if (self.std < 0).any():
            raise ValueError(f'std must be >= 0, got {std!r}')

    def _draw(self, batch, channels, shape, generator):
        return _noise_plan(_per_element(self.mean, batch, 'mean'), _per_element(self.std, batch, 'std'), generator)

    def _apply(self, image, label, params):
        return _noise(image, params), label


class RandomNoise(Transform, draws_for=Noise):
    """Gaussian noise with a random mean and standard deviation; see :class:`Noise`.

    Per batch element: ``mean ~ U(mean range)``, then ``std ~ U(std range)``; then one device
    seed for the call's noise field.

    Args:
        mean: ``d`` -> U(-d, d), or ``(a, b)``; intensity units. Default 0 (exactly 0).
        std: ``d`` -> U(0, d), or ``(a, b)`` with a >= 0; intensity units. Default ``(0, 0.25)``.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> out, _ = RandomNoise(std=(0, 0.25))(torch.zeros(1, 1, 16, 16, 16))
        >>> bool(out.std() <= 0.3)
        True
    """

    def __init__(self, mean=0, std=(0, 0.25), p: float = 1.0):
        super().__init__(p)
        self.mean_range = _parse_range(mean, 'mean')
        self.std_range = _parse_range(std, 'std', min_constraint=0)

    def _draw(self, batch, channels, shape, generator):
        mean = _uniform(*self.mean_range, (batch,), generator)
        std = _uniform(*self.std_range, (batch,), generator)
        return _noise_plan(mean, std, generator)


def _noise_plan(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> dict:
    """Host parameters of a Noise call: mean and std (B,), whether any mean is non-zero, and the
    seed of the noise field (63 bits, from the host generator)."""
    seed = torch.randint(0, 2 ** 63 - 1, (1,), generator=generator)
    # The seed once per element (the same value), so that selecting elements keeps it; a tensor,
    # so that torch.compile does not specialise the graph on its value.
    return {'mean': mean, 'std': std, 'shift': bool(mean.any()), 'seed': seed.expand(len(mean)),
            'batch': len(mean), 'element': torch.arange(len(mean))}


def _noise(image, params):
    """``image + N(mean, std^2)``: one field for the whole planned batch, from one generator, of
    which each element takes its own slab (so an element's noise does not depend on the others'
    decisions)."""
    x = image.to(_work_dtype(image.dtype))
    mean, std = _upload(x.device, x.dtype, params['mean'], params['std'])
    noise = _noise_field((params['batch'], *x.shape[1:]), params['seed'], x.device, x.dtype)
    if len(x) < params['batch']:
        noise = noise.index_select(0, params['element'].to(x.device, non_blocking=True))
    noise = torch.addcmul(x, noise, std.view(-1, 1, 1, 1, 1), out=noise)
    if params['shift']:  # known on the host; TorchIO's default mean is exactly 0
        noise.add_(mean.view(-1, 1, 1, 1, 1))
    return noise.to(image.dtype)


# While a CUDAGraphCall captures: the CUDA generators registered with its graph, one per noise
# field in call order (the graph reads their seeds at every replay; see CUDAGraphCall).
_capture_generators: list[torch.Generator] = []


@torch.library.custom_op('augment::noise_field', mutates_args=())
def _noise_field(shape: Sequence[int], seed: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``, from a fresh generator seeded with
    ``seed[0]`` (a host tensor), so that no global state is touched. A custom op, opaque to
    torch.compile, which can neither make nor take a generator inside a graph. Meta tensors
    carry shapes only."""
    if device.type == 'meta':
        return torch.empty(shape, device=device, dtype=dtype)
    if device.type == 'cuda' and torch.cuda.is_current_stream_capturing():
        generator = _capture_generators.pop(0)
    else:
        generator = torch.Generator(device=device).manual_seed(int(seed[0]))
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


@_noise_field.register_fake
def _(shape, seed, device, dtype):
    return torch.empty(shape, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Affine (TorchIO's transforms/augmentation/spatial/random_affine.py).

class Affine(Transform):
    """Scale, rotate and translate image and label (one resampling each; label nearest).

    In world (RAS, mm) coordinates the transform moves a point x to
    ``diag(scales) (R (x - c) + translation) + c`` (the translation is scaled too), with
    ``R = Rz(degrees[2]) Rx(degrees[0]) Ry(degrees[1])`` and pivot c; the image is resampled by
    pulling every output voxel back through the inverse (ITK's ``ResampleImageFilter``).
    Scales above 1 zoom in. All channels of a batch element move alike.

    Args:
        scales: A number s (all three axes) or ``(s1, s2, s3)``, each > 0; or ``(B, 3)``.
        degrees: A number or ``(d1, d2, d3)``, rotations about X, Y, Z in degrees; or ``(B, 3)``.
        translation: A number or ``(t1, t2, t3)`` in mm along X, Y, Z; or ``(B, 3)``.
        center: ``'image'`` (default): pivot at the centre voxel ``(shape - 1) / 2``; ``'origin'``:
            at voxel (0, 0, 0).
        default_pad_value: Image value outside the input, in intensity units: ``'minimum'``
            (default, per channel), ``'mean'`` (mean of the six border faces, per channel), a
            number, or (extension: TorchIO takes only these three) one value per batch element
            ``(B,)``, per channel ``(C,)`` or both ``(B, C)``.
        default_pad_label: Label value outside the input. Default 0.
        image_interpolation: ``'linear'`` (default) or ``'nearest'``.
        spacing: Voxel size ``(sx, sy, sz)`` in mm. Default 1 mm isotropic.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> image = torch.rand(1, 1, 17, 17, 17)
        >>> out, _ = Affine(scales=1, degrees=(90, 0, 0), translation=0)(image)
        >>> torch.equal(out, torch.rot90(image, 1, (3, 4)))
        True
    """

    def __init__(self, scales, degrees, translation, center: str = 'image',
                 default_pad_value='minimum', default_pad_label=0, image_interpolation: str = 'linear',
                 spacing=None, p: float = 1.0):
        super().__init__(p)
        self.scales, self.degrees, self.translation = (
            _parameter(value if not _is_number(value) else (value,) * 3, (3,), name)
            for value, name in ((scales, 'scales'), (degrees, 'degrees'), (translation, 'translation')))
        if (self.scales <= 0).any():
            raise ValueError(f'scales must be > 0, got {scales!r}')
        self.options = _AffineOptions.parse(center, default_pad_value, default_pad_label, image_interpolation)
        self.spacing = _parse_spacing(spacing)

    def _draw(self, batch, channels, shape, generator):
        return _affine_plan(*(_per_element(getattr(self, name), batch, name) for name in ('scales', 'degrees', 'translation')),
                            _pad_plan(self.options.default_pad_value, batch, channels, 'default_pad_value'),
                            self.spacing, shape, self.options)

    def _apply(self, image, label, params):
        return _affine(image, label, params, self.options.image_interpolation)


class RandomAffine(Transform, draws_for=Affine):
    """Random scaling, rotation and translation; see :class:`Affine`.

    Per batch element, nine independent uniform draws, in this order: three scales, three
    angles, three translations. Range forms (TorchIO's ``parse_params``), for scales around 1
    and the others around 0: ``x`` -> U(around - x, around + x) on every axis; ``(a, b)`` ->
    U(a, b) on every axis (not shifted); ``(x1, x2, x3)`` -> U(around - xi, around + xi); six
    values ``(a1, b1, a2, b2, a3, b3)`` -> U(ai, bi).

    Args:
        scales: Scale ranges, lower bounds >= 0. Default 0.1 (U(0.9, 1.1)).
        degrees: Rotation ranges in degrees. Default 10.
        translation: Translation ranges in mm. Default 0.
        isotropic: If True, the first scale drawn is used on all axes; ``scales`` must then have
            one or two values. Default False.
        center, default_pad_value, default_pad_label, image_interpolation, spacing: As in
            :class:`Affine`.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> out, _ = RandomAffine(scales=(0.9, 1.2), degrees=15)(torch.rand(1, 1, 16, 16, 16))
        >>> out.shape
        torch.Size([1, 1, 16, 16, 16])
    """

    def __init__(self, scales=0.1, degrees=10, translation=0, isotropic: bool = False,
                 center: str = 'image', default_pad_value='minimum', default_pad_label=0,
                 image_interpolation: str = 'linear', spacing=None, p: float = 1.0):
        super().__init__(p)
        if isotropic and not _is_number(_plain(scales)) and len(_plain(scales)) in (3, 6):
            raise ValueError(f'with isotropic=True, scales must have 1 or 2 values, got {scales!r}')
        self.isotropic = isotropic
        self.scales = _parse_params(scales, 1.0, 'scales', min_constraint=0)
        self.degrees = _parse_params(degrees, 0.0, 'degrees')
        self.translation = _parse_params(translation, 0.0, 'translation')
        self.options = _AffineOptions.parse(center, default_pad_value, default_pad_label, image_interpolation)
        self.spacing = _parse_spacing(spacing)

    def _draw(self, batch, channels, shape, generator):
        return _affine_plan(*_affine_draws(self, batch, generator),
                            _pad_plan(self.options.default_pad_value, batch, channels, 'default_pad_value'),
                            self.spacing, shape, self.options)


class _AffineOptions(NamedTuple):
    """The checked settings of an Affine or RandomAffine besides its parameters (the one-resampling
    forms hold one of those and take its settings)."""

    center: str  # the pivot: 'image' or 'origin'
    default_pad_value: str | float | torch.Tensor  # 'minimum', 'mean', a number or an array
    default_pad_label: float
    image_interpolation: str  # 'linear' or 'nearest'

    @classmethod
    def parse(cls, center, default_pad_value, default_pad_label, image_interpolation) -> _AffineOptions:
        if center not in ('image', 'origin'):
            raise ValueError(f"center must be 'image' or 'origin', got {center!r}")
        if not _is_number(default_pad_label):
            raise ValueError(f'default_pad_label must be a number, got {default_pad_label!r}')
        return cls(center, _parse_pad(default_pad_value, 'default_pad_value', ('minimum', 'mean')),
                   float(default_pad_label), _parse_interpolation(image_interpolation))


def _affine_draws(transform, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A RandomAffine's host draws (B, 3) in order: scales, degrees, translation."""
    draws = []
    for name in ('scales', 'degrees', 'translation'):
        low, high = zip(*getattr(transform, name))
        draws.append(_uniform(low, high, (batch, 3), generator))
    if transform.isotropic:
        draws[0] = draws[0][:, :1].expand(batch, 3)
    return draws


def _affine_plan(scales, degrees, translation, pad, spacing, shape, options: _AffineOptions) -> dict:
    """Host float64 parameters of an Affine call: the matrices (B, 2, 3, 4) of ``_with_label_grid``,
    the label pad (B, 1) and the image pad ('minimum', 'mean' or (B, C))."""
    theta = _affine_theta(scales, degrees, translation, spacing, shape, options.center)
    return {'theta': _with_label_grid(theta, shape),
            'label_pad': torch.full((len(theta), 1), options.default_pad_label, dtype=torch.float64), 'pad': pad}


def _affine_theta(scales, degrees, translation, spacing, shape, center) -> torch.Tensor:
    """Host float64 affine_grid matrices (B, 3, 4) of the output -> input map."""
    matrix, offset = _affine_maps(scales, degrees, translation, spacing, shape, center)
    return _theta(matrix, offset, shape)


def _affine_maps(scales, degrees, translation, spacing, shape, center):
    """Host float64 voxel maps ``u = matrix @ v + offset``, (B, 3, 3) and (B, 3).

    Output -> input in world RAS: q = R^T (diag(1/s) (p - c) - t) + c with R = Rz Rx Ry, the
    inverse of ITK's ``ScaleTransform`` composed with ``Euler3DTransform`` that TorchIO builds.
    Float64, so that right angles and integer shifts land exactly on voxels.
    """
    angles = torch.deg2rad(degrees)
    rotation_t = _euler(angles[:, 0], angles[:, 1], angles[:, 2]).transpose(1, 2)
    matrix = _to_voxels(rotation_t / scales[:, None, :], spacing)
    inverse_spacing = torch.tensor([1 / s for s in spacing], dtype=torch.float64)
    offset = -(rotation_t @ translation[:, :, None])[..., 0] * inverse_spacing
    if center == 'image':
        centre = torch.tensor([(size - 1) / 2 for size in shape], dtype=torch.float64)
        offset = offset + centre - matrix @ centre
    return matrix, offset


def _with_label_grid(theta: torch.Tensor, shape) -> torch.Tensor:
    """(B, 3, 4) -> (B, 2, 3, 4): per element the image's matrix and the label's, shifted by ``_half_up``."""
    return torch.stack([theta, theta + torch.cat([torch.zeros(3, 3), _half_up(shape)[:, None]], 1)], 1)


def _affine(image, label, params, interpolation):
    """Affine resampling from the host parameters of ``_affine_plan``."""
    dtype = _work_dtype(image.dtype)
    batch, channels, *shape = image.shape
    pad = params['pad']
    # Uploaded as (2, B): the image grids and the label grids each contiguous.
    theta, label_pad, *pad_values = _upload(image.device, dtype, params['theta'].transpose(0, 1), params['label_pad'],
                                            *([pad] if isinstance(pad, torch.Tensor) else []))
    grids = _affine_grid(theta.reshape(-1, 3, 4), 2 * batch, shape).view(2, batch, *shape, 3)
    return _resample_pair(image, label, grids, _image_pad(image, pad, pad_values[0] if pad_values else None, dtype),
                          label_pad.view(batch, 1, 1, 1, 1), interpolation)


# ---------------------------------------------------------------------------------------------
# Elastic deformation (TorchIO's transforms/augmentation/spatial/random_elastic_deformation.py,
# ITK's BSplineTransform).

class ElasticDeformation(Transform):
    """Dense elastic deformation from a coarse grid of control-point displacements (cubic B-spline).

    Exactly ITK's ``BSplineTransform`` as TorchIO initialises it: the grid of
    ``nx x ny x nz`` points spans the image plus 1/8 voxel beyond its outer voxel faces, with one
    point outside on each side; an output voxel at world point p pulls the input at
    ``p + displacement(p)``; the displacement is the B-spline sum of the control points (they are
    coefficients, not values at the points). Labels: nearest neighbour, pad = each label
    channel's minimum, as TorchIO. All channels of a batch element move alike. Like TorchIO, a
    ``max_displacement`` above half the control-grid spacing ((size + 1/4) * spacing /
    (n - 3) mm) warns that the grid may fold (RuntimeWarning).

    Args:
        control_points: Displacements in mm, shape ``(nx, ny, nz, 3)`` or ``(B, nx, ny, nz, 3)``,
            each n >= 4, in TorchIO's convention (LPS: grid axes 0 and 1 run from the last voxel
            of X and Y to the first, and components 0 and 1 point towards -X and -Y).
        max_displacement: TorchIO's bound D or ``(Dx, Dy, Dz)`` in mm, >= 0, used only for the
            folding warning and, when all zero, to return the input unchanged (as TorchIO).
            Default None (deviation: TorchIO requires it): no warning, no early return (zero
            control points give the identity anyway).
        image_interpolation: ``'linear'`` (default) or ``'nearest'``.
        spacing: Voxel size ``(sx, sy, sz)`` in mm. Default 1 mm isotropic.
        default_pad_value: Image value outside the input, in intensity units: ``'minimum'``
            (default: each channel's minimum, as TorchIO), a number, or one value per batch
            element ``(B,)``, per channel ``(C,)`` or both ``(B, C)``. Extension: TorchIO has no
            such argument.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> image = torch.rand(1, 1, 17, 17, 17)
        >>> cp = torch.zeros(7, 7, 7, 3); cp[..., 0] = 1.0          # 1 mm towards -X: a shift
        >>> out, _ = ElasticDeformation(cp)(image)                   # out[:, :, i] = in[:, :, i - 1]
        >>> bool((out[:, :, 1:] - image[:, :, :-1]).abs().max() < 1e-5)
        True
    """

    def __init__(self, control_points, max_displacement=None, image_interpolation: str = 'linear',
                 spacing=None, default_pad_value='minimum', p: float = 1.0):
        super().__init__(p)
        tensor = torch.as_tensor(control_points, dtype=torch.float64)
        if tensor.ndim not in (4, 5) or tensor.shape[-1] != 3 or min(tensor.shape[-4:-1]) < 4:
            raise ValueError('control_points must have shape (nx, ny, nz, 3) or (B, nx, ny, nz, 3) with '
                             f'every n >= 4, got {tuple(tensor.shape)}')
        self.control_points = tensor.reshape(-1, *tensor.shape[-4:])
        self.max_displacement = None if max_displacement is None else tuple(
            map(float, _parse_triplet(max_displacement, 'max_displacement', Real, 0)))
        self.image_interpolation = _parse_interpolation(image_interpolation)
        self.spacing = _parse_spacing(spacing)
        self.default_pad_value = _parse_pad(default_pad_value, 'default_pad_value')

    def _draw(self, batch, channels, shape, generator):
        control_points = _per_element(self.control_points, batch, 'control_points')
        return {'coefficients': _with_label_coefficients(_spline_coefficients(control_points, self.spacing, shape),
                                                         shape),
                'pad': _pad_plan(self.default_pad_value, batch, channels, 'default_pad_value')}

    def plan(self, batch, channels, shape, generator):
        plan = super().plan(batch, channels, shape, generator)
        if self.max_displacement is not None:
            _warn_folding(self.max_displacement, shape, self.control_points.shape[1:4], self.spacing, plan[0])
        return plan

    def _apply(self, image, label, params):
        if self.max_displacement is not None and not any(self.max_displacement):
            return image, label
        return _elastic(image, label, params, self.image_interpolation)


class RandomElasticDeformation(Transform, draws_for=ElasticDeformation):
    """Random elastic deformation; see :class:`ElasticDeformation`.

    Per batch element, every control-point component is drawn ``U[-D_c, D_c)`` (TorchIO's
    docstring says U(0, D): its code draws symmetric values), all ``nx * ny * nz * 3`` of them,
    locked ones included. ``locked_borders`` zeroes the outer layer (1) or two layers (2) of
    control points along grid axes 0 and 1; like TorchIO 1.2.1, axis 2 (Z) is never locked, kept
    on purpose for fidelity to the paper's augmentation.

    Args:
        num_control_points: n or ``(nx, ny, nz)``, integers >= 4. Default 7.
        max_displacement: D or ``(Dx, Dy, Dz)`` in mm, >= 0, per displacement component.
            Default 7.5. All zero returns the input unchanged.
        locked_borders: 0, 1 or 2 (default); 2 needs every n >= 5.
        image_interpolation: ``'linear'`` (default) or ``'nearest'``.
        spacing: Voxel size ``(sx, sy, sz)`` in mm. Default 1 mm isotropic.
        default_pad_value: As in :class:`ElasticDeformation` (an extension). Default ``'minimum'``.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> elastic = RandomElasticDeformation(num_control_points=7, max_displacement=3)
        >>> elastic(torch.rand(1, 1, 32, 32, 32))[0].shape
        torch.Size([1, 1, 32, 32, 32])
    """

    def __init__(self, num_control_points=7, max_displacement=7.5, locked_borders: int = 2,
                 image_interpolation: str = 'linear', spacing=None, default_pad_value='minimum', p: float = 1.0):
        super().__init__(p)
        self.num_control_points = _parse_triplet(num_control_points, 'num_control_points', int, 4)
        self.max_displacement = tuple(map(float, _parse_triplet(max_displacement, 'max_displacement', Real, 0)))
        if locked_borders not in (0, 1, 2) or isinstance(locked_borders, bool):
            raise ValueError(f'locked_borders must be 0, 1 or 2, got {locked_borders!r}')
        if locked_borders == 2 and 4 in self.num_control_points:
            raise ValueError('locked_borders=2 needs at least 5 control points per axis '
                             f'(4 gives the identity), got num_control_points={num_control_points!r}')
        self.locked_borders = locked_borders
        self.image_interpolation = _parse_interpolation(image_interpolation)
        self.spacing = _parse_spacing(spacing)
        self.default_pad_value = _parse_pad(default_pad_value, 'default_pad_value')
        self._scale = _displacement_scale(self.num_control_points, self.max_displacement, locked_borders)

    def _draw(self, batch, channels, shape, generator):
        control_points = _elastic_draws(self, batch, generator)
        return {'coefficients': _with_label_coefficients(_spline_coefficients(control_points, self.spacing, shape),
                                                         shape),
                'pad': _pad_plan(self.default_pad_value, batch, channels, 'default_pad_value')}

    def plan(self, batch, channels, shape, generator):
        plan = super().plan(batch, channels, shape, generator)
        _warn_folding(self.max_displacement, shape, self.num_control_points, self.spacing, plan[0])
        return plan


def _parse_triplet(value, name: str, kind: type, minimum: float) -> tuple:
    value = _plain(value)
    values = (value,) * 3 if _is_number(value) else tuple(value) if isinstance(value, Sequence) else ()
    if len(values) != 3 or not all(isinstance(v, kind) and not isinstance(v, bool) and v >= minimum
                                   for v in values):
        raise ValueError(f'{name} must be a {kind.__name__} >= {minimum} or three of them, got {value!r}')
    return values


def _displacement_scale(points, max_displacement, locked_borders) -> torch.Tensor:
    """``2 D_c`` per control point and component, 0 where locked: maps U[0, 1) - 1/2 to U[-D, D)."""
    scale = torch.tensor(max_displacement, dtype=torch.float64).mul(2).expand(*points, 3).clone()
    for i in range(locked_borders):  # grid axes 0 and 1 only, as TorchIO 1.2.1
        scale[i] = scale[-1 - i] = scale[:, i] = scale[:, -1 - i] = 0
    return scale


def _elastic_draws(transform, batch: int, generator: torch.Generator) -> torch.Tensor:
    """A RandomElasticDeformation's host draws: control points (B, nx, ny, nz, 3), mm, TorchIO's convention."""
    draws = torch.rand(batch, *transform.num_control_points, 3, dtype=torch.float64, generator=generator)
    return (draws - 0.5) * transform._scale


def _spline_coefficients(control_points: torch.Tensor, spacing, shape) -> torch.Tensor:
    """Host float64 (B, nx, ny, nz, 3): the B-spline coefficients of the sampling grid itself
    (normalised units, grid_sample's (k, j, i) order) from TorchIO's control points (B, nx, ny,
    nz, 3), mm, LPS."""
    to_grid, identity = _bspline_frame(tuple(shape), tuple(control_points.shape[1:4]), spacing)
    # TorchIO's grid axes 0 and 1 run from the last voxel of X and Y to the first: flip them.
    return control_points.flip(1, 2).flip(-1) * to_grid + identity


@functools.lru_cache(maxsize=16)
def _bspline_frame(shape: tuple[int, int, int], points: tuple[int, int, int], spacing):
    """Host float64: the factor taking TorchIO's control points (mm, LPS) to normalised grid units
    in grid_sample's (k, j, i) order, and the control values of the identity map in those units.
    The cubic B-spline reproduces linear functions, so adding the identity's control values
    (``(a - 1) h - 5/8`` voxels) makes the spline the sampling grid itself."""
    a, b = _normalisation(shape)
    identity = torch.zeros(*points, 3, dtype=torch.float64)
    for axis, (size, count) in enumerate(zip(shape, points)):
        h = (size + 0.25) / (count - 3)
        values = (torch.arange(count, dtype=torch.float64) - 1) * h - 0.625
        view = [1, 1, 1]
        view[axis] = count
        identity[..., 2 - axis] += (values * a[axis] + b[axis]).view(view)
    # TorchIO's grid ascends in LPS: for a RAS tensor, components 0, 1 point to -X, -Y.
    signs = torch.tensor([s / v for s, v in zip((1, -1, -1), spacing[::-1])], dtype=torch.float64)
    return signs * a.flip(0), identity


def _with_label_coefficients(coefficients: torch.Tensor, shape) -> torch.Tensor:
    """(B, nx, ny, nz, 3) -> (B, 2, nx, ny, nz, 3): per element the image's coefficients and the
    label's; the B-spline reproduces constants, so shifted coefficients give the shifted grid."""
    return torch.stack([coefficients, coefficients + _half_up(shape)], 1)


def _warn_folding(max_displacement, shape, points, spacing, chosen) -> None:
    """TorchIO's warning (``ElasticDeformation.parse_free_form_transform``): a displacement above
    half the control-grid spacing can fold the grid; at planning time, as TorchIO only for a call
    that deforms (``chosen`` None or some element chosen)."""
    if chosen is not None and not bool(chosen.any()):
        return
    grid_spacing = _grid_spacing(shape, points, spacing)
    axes = [axis for axis in range(3) if max_displacement[axis] > grid_spacing[axis] / 2]
    if axes:
        warnings.warn(f'The maximum displacement is larger than the coarse grid spacing for dimensions: {axes}, '
                      'so folding may occur. Choose fewer control points or a smaller maximum displacement',
                      RuntimeWarning, stacklevel=4)


def _grid_spacing(shape, points, spacing) -> tuple[float, float, float]:
    """ITK's control-grid spacing in mm per axis: ``(size + 1/4) * spacing / (points - 3)``."""
    return tuple((size + 0.25) * s / (count - 3) for size, count, s in zip(shape, points, spacing))


def _elastic(image, label, params, interpolation):
    """Resampling through a B-spline grid: params hold the host coefficients (B, 2, nx, ny, nz, 3)
    of ``_with_label_coefficients``, the image pad ('minimum', 'mean' or (B, C)) and, optionally, the
    label pad (B, 1) (default: each label channel's minimum, TorchIO's rule)."""
    dtype = _work_dtype(image.dtype)
    batch, channels, *shape = image.shape
    shape = tuple(shape)
    points = tuple(params['coefficients'].shape[2:5])
    pad = params['pad']
    label_pads = [params['label_pad']] if 'label_pad' in params else []
    image_pads = [pad] if isinstance(pad, torch.Tensor) else []
    # Uploaded as (2, B): the image grids and the label grids each contiguous.
    coefficients, *pads = _upload(image.device, dtype, params['coefficients'].transpose(0, 1), *label_pads,
                                  *image_pads)
    wx, wy, wz = _bspline_weights(shape, points, image.device, dtype)
    # Separable: contract z and y on small tensors, then x in one matmul that writes the grids,
    # component-major (see _affine_grid), handed to grid_sample as a permuted view.
    partial = torch.einsum('yb,zc,nabcd->ndayz', wy, wz, coefficients.reshape(2 * batch, *points, 3))
    planes = wx @ partial.reshape(2 * batch * 3, points[0], -1)
    grids = planes.view(2, batch, 3, *shape).permute(0, 1, 3, 4, 5, 2)
    label_pad = None if label is None else pads[0].view(batch, 1, 1, 1, 1) if label_pads else _min_pad(label, dtype)
    image_pad = _image_pad(image, pad, pads[-1] if image_pads else None, dtype)
    return _resample_pair(image, label, grids, image_pad, label_pad, interpolation)


@functools.lru_cache(maxsize=16)
def _bspline_weights(shape: tuple[int, int, int], points: tuple[int, int, int], device, dtype):
    """Per axis, the cubic B-spline weights ``(size, points)`` of ITK's control grid.

    ITK (``BSplineTransformInitializer``, as TorchIO calls it) spreads ``points - 3`` intervals
    over the image extended by 1/8 voxel beyond its outer voxel faces, ``h = (size + 1/4) /
    (points - 3)`` voxels, control point 1 at the extended edge: voxel v sits at grid coordinate
    ``(v + 5/8) / h + 1``.
    """
    weights = []
    for size, count in zip(shape, points):
        h = (size + 0.25) / (count - 3)
        position = (torch.arange(size, dtype=torch.float64) + 0.625) / h + 1
        t = (position[:, None] - torch.arange(count, dtype=torch.float64)).abs()
        weights.append(torch.where(t < 1, 2 / 3 - t.square() + t.pow(3) / 2,
                                   torch.where(t < 2, (2 - t).pow(3) / 6, 0)).to(device, dtype))
    return weights


# ---------------------------------------------------------------------------------------------
# Affine and elastic deformation in one resampling (as newer TorchIO's
# transforms/augmentation/spatial/random_affine_elastic_deformation.py offers; not in 1.2.1).

class AffineElasticDeformation(Transform):
    """:class:`Affine` followed by :class:`ElasticDeformation`, in one resampling.

    An output voxel at v pulls the input at ``T_affine(T_elastic(v))``, the point that the two
    steps (Affine, then Elastic, the paper pipeline's order) pull from, but interpolates once: the
    affine map is applied to the spline's coefficients on the host, so the call costs what
    Elastic alone costs. Labels: nearest neighbour.

    Deviation (an option, not in TorchIO 1.2.1, which the paper used): the two steps interpolate
    twice, and pad twice (Affine's pad outside the affine's result, then Elastic's), so the
    results differ where the second interpolation blurs, the second nearest lookup rounds, or
    the elastic step reaches the affine result's edge: little on a smooth image, much on a rough
    one, and in labels along their boundaries.
    On a linear image, which interpolation reproduces, the two agree to float32 rounding away
    from the edges (tested). Newer TorchIO's ``AffineElasticDeformation`` (``affine_first=True``)
    adds the displacement in the input's frame, ``T_affine(v) + d(v)``, which differs again by
    the affine's rotation and scaling of d.

    Args:
        scales, degrees, translation: As in :class:`Affine`.
        control_points: As in :class:`ElasticDeformation`.
        max_displacement: As in :class:`ElasticDeformation` (the folding warning only). Default None.
        center, default_pad_value, default_pad_label, image_interpolation, spacing: As in
            :class:`Affine`; the one pad of the one resampling (``default_pad_label`` also for
            labels, where Elastic alone pads with the label minimum).
        p: Probability of applying the transform. Default 1.

    Example:
        >>> image = torch.rand(1, 1, 17, 17, 17)
        >>> both = AffineElasticDeformation(scales=1, degrees=(90, 0, 0), translation=0,
        ...                                 control_points=torch.zeros(7, 7, 7, 3))
        >>> bool((both(image)[0] - torch.rot90(image, 1, (3, 4))).abs().max() < 1e-5)
        True
    """

    def __init__(self, scales, degrees, translation, control_points, max_displacement=None, center: str = 'image',
                 default_pad_value='minimum', default_pad_label=0, image_interpolation: str = 'linear',
                 spacing=None, p: float = 1.0):
        super().__init__(p)
        self._affine = Affine(scales, degrees, translation, center, default_pad_value, default_pad_label,
                              image_interpolation, spacing)
        self._elastic = ElasticDeformation(control_points, max_displacement, spacing=spacing)

    def _draw(self, batch, channels, shape, generator):
        affine = self._affine
        return _affine_elastic_plan(
            *(_per_element(getattr(affine, name), batch, name) for name in ('scales', 'degrees', 'translation')),
            _per_element(self._elastic.control_points, batch, 'control_points'),
            _pad_plan(affine.options.default_pad_value, batch, channels, 'default_pad_value'), affine.spacing, shape,
            affine.options)

    def plan(self, batch, channels, shape, generator):
        plan = super().plan(batch, channels, shape, generator)
        elastic = self._elastic
        if elastic.max_displacement is not None:
            _warn_folding(elastic.max_displacement, shape, elastic.control_points.shape[1:4], elastic.spacing, plan[0])
        return plan

    def _apply(self, image, label, params):
        return _elastic(image, label, params, self._affine.options.image_interpolation)


class RandomAffineElasticDeformation(Transform, draws_for=AffineElasticDeformation):
    """Random :class:`AffineElasticDeformation`: RandomAffine then RandomElasticDeformation,
    resampled once.

    Per batch element the draws of :class:`RandomAffine` (nine) then those of
    :class:`RandomElasticDeformation`, in that order: with the same generator, the parameters of
    ``Compose([RandomAffine(...), RandomElasticDeformation(...)])`` at p = 1. One decision ``p``
    for both (the two steps draw one each). How the result differs from the two steps:
    :class:`AffineElasticDeformation`.

    Args:
        scales, degrees, translation, isotropic: As in :class:`RandomAffine`. Defaults 0.1, 10, 0, False.
        num_control_points, max_displacement, locked_borders: As in
            :class:`RandomElasticDeformation`. Defaults 7, 7.5 mm, 2.
        center, default_pad_value, default_pad_label, image_interpolation, spacing: As in
            :class:`AffineElasticDeformation`.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> both = RandomAffineElasticDeformation(degrees=15, max_displacement=3)
        >>> both(torch.rand(1, 1, 32, 32, 32))[0].shape
        torch.Size([1, 1, 32, 32, 32])
    """

    def __init__(self, scales=0.1, degrees=10, translation=0, isotropic: bool = False, num_control_points=7,
                 max_displacement=7.5, locked_borders: int = 2, center: str = 'image', default_pad_value='minimum',
                 default_pad_label=0, image_interpolation: str = 'linear', spacing=None, p: float = 1.0):
        super().__init__(p)
        self._affine = RandomAffine(scales, degrees, translation, isotropic, center, default_pad_value,
                                    default_pad_label, image_interpolation, spacing)
        self._elastic = RandomElasticDeformation(num_control_points, max_displacement, locked_borders, spacing=spacing)

    def _draw(self, batch, channels, shape, generator):
        affine = self._affine
        return _affine_elastic_plan(*_affine_draws(affine, batch, generator), _elastic_draws(self._elastic, batch, generator),
                                    _pad_plan(affine.options.default_pad_value, batch, channels, 'default_pad_value'),
                                    affine.spacing, shape, affine.options)

    def plan(self, batch, channels, shape, generator):
        plan = super().plan(batch, channels, shape, generator)
        elastic = self._elastic
        _warn_folding(elastic.max_displacement, shape, elastic.num_control_points, elastic.spacing, plan[0])
        return plan


def _affine_elastic_plan(scales, degrees, translation, control_points, pad, spacing, shape,
                         options: _AffineOptions) -> dict:
    theta = _affine_theta(scales, degrees, translation, spacing, shape, options.center)
    coefficients = _compose_affine(_spline_coefficients(control_points, spacing, shape), theta)
    return {'coefficients': _with_label_coefficients(coefficients, shape), 'pad': pad,
            'label_pad': torch.full((len(theta), 1), options.default_pad_label, dtype=torch.float64)}


def _compose_affine(coefficients: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Host float64: the spline coefficients (B, nx, ny, nz, 3) of a grid w(v) into the affine's
    output, mapped through its affine_grid matrices (B, 3, 4), give the coefficients of
    ``theta @ [w(v); 1]``, the grid into the affine's input. Exact: the weights of every voxel sum
    to 1, so an affine map of the coefficients is the same map of the grid."""
    return torch.einsum('bij,bxyzj->bxyzi', theta[:, :, :3], coefficients) + theta[:, None, None, None, :, 3]


# ---------------------------------------------------------------------------------------------
# Z-normalisation (TorchIO's transforms/preprocessing/intensity/z_normalization.py): not in the
# pipeline, since the paper normalises each scan before cutting patches.

class ZNormalization(Transform):
    """Subtract the mean and divide by the standard deviation (TorchIO's ``ZNormalization``).

    Statistics are taken per batch element over the voxels of ``masking_method``, pooled over all
    channels; the standard deviation is unbiased (N - 1), and the result is applied to the whole
    image. A standard deviation of 0 raises RuntimeError, as in TorchIO (checking it reads one
    number per batch element back from the device). Labels are untouched.

    Args:
        masking_method: ``None`` (default): all voxels. A boolean tensor broadcastable to the
            image after leading singleton axes are added: ``(X, Y, Z)``, ``(C | 1, X, Y, Z)`` or
            ``(B | 1, C | 1, X, Y, Z)``. Or a callable ``f(tensor) -> bool tensor``, called with each
            element's ``(C, X, Y, Z)`` image, e.g. ``ZNormalization.mean``. TorchIO's string
            and bounding-box forms, which need a TorchIO Subject, are not offered.
        p: Probability of applying the transform. Default 1.

    Example:
        >>> image = torch.rand(2, 1, 16, 16, 16) * 5 + 3
        >>> out, _ = ZNormalization(masking_method=lambda x: x > 4)(image)
        >>> bool((out[0][image[0] > 4].mean().abs() < 1e-5))
        True
    """

    moves_label = False

    def __init__(self, masking_method: torch.Tensor | Callable | None = None, p: float = 1.0):
        super().__init__(p)
        if masking_method is not None and not callable(masking_method) and not (
                isinstance(masking_method, torch.Tensor) and masking_method.dtype == torch.bool
                and 3 <= masking_method.ndim <= 5):
            raise ValueError('masking_method must be None, a callable or a boolean tensor of 3 to 5 '
                             f'dimensions, got {masking_method!r}')
        self.masking_method = masking_method
        self._masks = {}  # the tensor mask, copied once per device

    @staticmethod
    def mean(tensor: torch.Tensor) -> torch.Tensor:
        """TorchIO's ``ZNormalization.mean``: the voxels brighter than the mean."""
        return tensor > tensor.float().mean()

    def _draw(self, batch, channels, shape, generator):
        if isinstance(self.masking_method, torch.Tensor) and self.masking_method.ndim == 5 \
                and len(self.masking_method) not in (1, batch):
            raise ValueError(f'masking_method has {len(self.masking_method)} batch elements, '
                             f'the image {batch}')
        # The elements' indices, selected with them below p = 1: a per-element mask follows.
        return {'element': torch.arange(batch)}

    def _apply(self, image, label, params):
        x = image.to(_work_dtype(image.dtype))
        dims = (1, 2, 3, 4)
        if self.masking_method is None:
            mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
        else:
            mask = self._mask(x, params['element'])
            count = mask.expand_as(x).sum(dims, keepdim=True)
            mean = torch.where(mask, x, 0).sum(dims, keepdim=True) / count
            std = (torch.where(mask, x - mean, 0).square().sum(dims, keepdim=True) / (count - 1)).sqrt()
        if bool((std == 0).any()):
            raise RuntimeError('Standard deviation is 0 for the masked values of a batch element')
        return ((x - mean) / std).to(image.dtype), label

    def _mask(self, x: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
        if callable(self.masking_method):
            masks = [torch.as_tensor(self.masking_method(e)).to(x.device) for e in x]
            mask = torch.stack([m if m.ndim == 4 else m[None] for m in masks])
        else:
            if x.device not in self._masks:
                mask = self.masking_method.to(x.device)
                self._masks[x.device] = mask.reshape((1,) * (5 - mask.ndim) + tuple(mask.shape))
            mask = self._masks[x.device]
            if len(mask) > len(x):  # the chosen elements' masks (p < 1)
                mask = mask.index_select(0, element.to(x.device, non_blocking=True))
        try:
            torch.broadcast_shapes(mask.shape, x.shape)
        except RuntimeError:
            raise ValueError(f'masking_method gives a mask of shape {tuple(mask.shape)}, '
                             f'which does not broadcast to the image {tuple(x.shape)}') from None
        return mask.bool()


# ---------------------------------------------------------------------------------------------
# CUDA graphs: a plan's parameters in static buffers, the device part captured once.

class CUDAGraphCall:
    """A transform's device work at p = 1, captured once in a CUDA graph and replayed per call.

    What is captured is :meth:`Transform.run` given a plan: at p = 1, device work only, with no
    host sync and no branch on a tensor's value, so one capture serves every plan of the same
    structure. The host still draws a plan per call (the same numbers as ``transform(image,
    label, generator)``); its parameters are copied into one static pinned buffer and from there,
    in one non-blocking copy, into the graph's static device buffer; the inputs are copied into
    the graph's static inputs, and the graph replays: one launch, whatever the kernels. Noise fields
    come from CUDA generators registered with the graph and seeded from the plan before each
    replay, so a replay gives the eager call's result. Needs CUDA and a torch with
    ``CUDAGraph.register_generator_state`` (2.5 and later) when the transform adds noise.

    Args:
        transform: A transform of this module with p = 1 throughout (a Compose of them
            included): below 1, real skipping changes shapes, which a graph cannot replay. Its
            plans must keep their structure call after call (e.g. RandomFlip with
            ``flip_probability`` 0 or 1, pads of one form); a call that plans differently raises
            ValueError.
        image: A ``(B, C, X, Y, Z)`` CUDA tensor: the batch size, shape, dtype and device of
            every call. Used for the warm-up call and the capture.
        label: None or a label of the same layout: every call then passes one alike.
        generator: CPU ``torch.Generator`` for the warm-up and capture plans. Default: torch's.

    A call ``captured(image, label=None, generator=None)`` returns ``(image, label)``, the graph's
    static outputs, overwritten by the next call: clone them to keep them.

    Example (needs CUDA)::

        captured = CUDAGraphCall(paper_augmentation(p=1.0, background=0.0), image, label, generator)
        for image, label in batches:
            out, out_label = captured(image, label, generator)
    """

    def __init__(self, transform: Transform, image: torch.Tensor, label: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        if not _graph_safe(transform):
            raise ValueError('CUDAGraphCall needs a transform of this module with p = 1 throughout, got '
                             f'{transform!r}')
        if not isinstance(image, torch.Tensor) or image.ndim != 5 or image.device.type != 'cuda':
            raise ValueError('CUDAGraphCall needs a (B, C, X, Y, Z) CUDA image, got '
                             f'{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image)} '
                             f'on {getattr(image, "device", None)}')
        self.transform = transform
        self._layout = (len(image), image.shape[1], tuple(image.shape[2:]))
        self._image = image.clone()
        self._label = None if label is None else label.clone()
        plan = transform.plan(*self._layout, _host_generator(generator))
        self._static = _StaticPlan(plan, image.device, _work_dtype(image.dtype))
        seeds = self._static.load(plan)
        self._generators = [torch.Generator(device=image.device) for _ in seeds]
        self._seed(seeds)
        # Warm-up on a side stream (caches, FFT plans, lazy initialisation), then the capture.
        stream = torch.cuda.Stream(image.device)
        stream.wait_stream(torch.cuda.current_stream(image.device))
        with torch.cuda.stream(stream):
            transform.run(self._image, self._label, self._static.plan)
        torch.cuda.current_stream(image.device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        for g in self._generators:
            self._graph.register_generator_state(g)
        _capture_generators[:] = self._generators
        try:
            with torch.cuda.graph(self._graph):
                self._out = transform.run(self._image, self._label, self._static.plan)
        finally:
            _capture_generators.clear()

    def _seed(self, seeds: list[int]) -> None:
        for g, seed in zip(self._generators, seeds):
            g.manual_seed(seed)  # the replay reads the seed, and the offset 0, from the generator

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        if image.shape != self._image.shape or image.dtype != self._image.dtype or (label is None) != (
                self._label is None) or (label is not None and label.shape != self._label.shape):
            raise ValueError('CUDAGraphCall replays the image (and label) layout it captured: '
                             f'{tuple(self._image.shape)}, label {None if self._label is None else tuple(self._label.shape)}')
        self._seed(self._static.load(self.transform.plan(*self._layout, _host_generator(generator))))
        self._image.copy_(image, non_blocking=True)
        if label is not None:
            self._label.copy_(label, non_blocking=True)
        self._graph.replay()
        return self._out


def _graph_safe(transform) -> bool:
    """p = 1 throughout, and no user callable inside: the plan's structure is then fixed."""
    return isinstance(transform, Transform) and transform.p == 1 and all(
        _graph_safe(t) for t in getattr(transform, 'transforms', ()))


class _StaticPlan:
    """A plan whose floating-point host tensors live in one static device buffer (``plan``), and
    ``load`` copies another plan of the same structure into it: through one static pinned buffer
    on CUDA, without blocking. Every other leaf (decisions, flip indices, element indices) must
    equal the first plan's, since the device part may branch on them; noise seeds (the leaves
    named ``seed``) are copied into static host tensors and returned, for a graph's generators."""

    def __init__(self, plan, device: torch.device, dtype: torch.dtype):
        leaves, self._spec = pytree.tree_flatten_with_path(plan)
        self._floats = [i for i, (_, leaf) in enumerate(leaves)
                        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
        self._seeds = [i for i, (path, _) in enumerate(leaves) if getattr(path[-1], 'key', None) == 'seed']
        self._loaded = set(self._floats + self._seeds)
        self._fixed = [leaf for i, (_, leaf) in enumerate(leaves) if i not in self._loaded]
        sizes = [leaves[i][1].numel() for i in self._floats]
        cuda = device.type == 'cuda'
        self._host = torch.empty(sum(sizes), dtype=dtype, pin_memory=cuda)
        self._device = torch.empty(sum(sizes), dtype=dtype, device=device)
        self._copied = torch.cuda.Event() if cuda else None
        pieces = iter(zip(self._host.split(sizes), self._device.split(sizes)))
        self._pieces, static = [], [leaf for _, leaf in leaves]
        for i in self._floats:
            host, on_device = next(pieces)
            self._pieces.append(host.view(static[i].shape))
            static[i] = on_device.view(static[i].shape)
        for i in self._seeds:  # host tensors, read by the noise op outside a graph
            static[i] = static[i].clone()
        self._seed_leaves = [static[i] for i in self._seeds]
        self.plan = pytree.tree_unflatten(static, self._spec)

    def load(self, plan) -> list[int]:
        """Copy ``plan``'s parameters into the static buffers; returns its noise seeds."""
        leaves, spec = pytree.tree_flatten_with_path(plan)
        values = [leaf for _, leaf in leaves]
        fixed = [leaf for i, leaf in enumerate(values) if i not in self._loaded]
        if spec != self._spec or not all(_same(a, b) for a, b in zip(fixed, self._fixed)) or not all(
                isinstance(values[i], torch.Tensor) and values[i].shape == piece.shape
                for piece, i in zip(self._pieces, self._floats)):
            raise ValueError('this call plans differently from the captured one (another shape, pad form or '
                             'flip pattern): a CUDA graph replays one structure')
        if self._copied is not None:
            self._copied.synchronize()  # the previous call's copy has left the pinned buffer
        for piece, i in zip(self._pieces, self._floats):
            piece.copy_(values[i])
        self._device.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        for leaf, i in zip(self._seed_leaves, self._seeds):
            leaf.copy_(values[i])
        return [int(values[i][0]) for i in self._seeds]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and torch.equal(a, b)
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------------------------
# The shared machinery, called by the transforms above. First, argument parsing: TorchIO's forms
# (``_parse_range``, ``parse_params`` in torchio/transforms), with errors that name the parameter.

def _parse_probability(value, name: str) -> float:
    if not _is_number(value) or not 0 <= value <= 1:
        raise ValueError(f'{name} must be a probability in [0, 1], got {value!r}')
    return float(value)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _plain(value):
    """numpy arrays and tensors (as TorchIO accepts them) as Python numbers or tuples of them."""
    if isinstance(value, torch.Tensor) or type(value).__module__ == 'numpy':
        value = value.tolist()
        return tuple(value) if isinstance(value, list) else value
    return value


def _parse_range(value, name: str, min_constraint: float | None = None) -> tuple[float, float]:
    """TorchIO's ``_parse_range``: ``d >= 0`` -> ``(-d, d)`` or ``(min_constraint, d)``; ``(a, b)``, a <= b."""
    value = _plain(value)
    if _is_number(value):
        if value < 0:
            raise ValueError(f'{name} must be non-negative when a single number, got {value}')
        return (float(-value if min_constraint is None else min_constraint), float(value))
    if (isinstance(value, Sequence) and len(value) == 2 and all(map(_is_number, value))
            and value[0] <= value[1]):
        if min_constraint is not None and value[0] < min_constraint:
            raise ValueError(f'{name} must be at least {min_constraint}, got {tuple(value)}')
        return (float(value[0]), float(value[1]))
    raise ValueError(f'{name} must be a number or a (min, max) pair with min <= max, got {value!r}')


def _parse_params(value, around: float, name: str, min_constraint: float | None = None
                  ) -> list[tuple[float, float]]:
    """TorchIO's ``parse_params``: ``x``, ``(a, b)``, ``(x1, x2, x3)`` or six values -> three ranges."""
    value = _plain(value)
    values = (value,) if _is_number(value) else tuple(value) if isinstance(value, Sequence) else None
    if values is None or len(values) not in (1, 2, 3, 6) or not all(map(_is_number, values)):
        raise ValueError(f'{name} must be a number or a sequence of 2, 3 or 6 numbers, got {value!r}')
    if len(values) == 1:
        values *= 3
    if len(values) == 2:  # (a, b) is the range of every axis, not shifted by `around`
        ranges = [values] * 3
    elif len(values) == 3:
        ranges = [(around - x, around + x) for x in values]
    else:
        ranges = [values[0:2], values[2:4], values[4:6]]
    ranges = [(float(low), float(high)) for low, high in ranges]
    for low, high in ranges:
        if low > high:
            raise ValueError(f'{name} gives the range ({low}, {high}), whose minimum exceeds its maximum')
        if min_constraint is not None and low < min_constraint:
            raise ValueError(f'{name} gives the range ({low}, {high}), below the minimum {min_constraint}')
    return ranges


def _parse_spacing(spacing) -> tuple[float, float, float]:
    if spacing is None:
        return (1.0, 1.0, 1.0)
    if (isinstance(spacing, Sequence) and len(spacing) == 3 and all(map(_is_number, spacing))
            and all(s > 0 for s in spacing)):
        return tuple(float(s) for s in spacing)
    raise ValueError(f'spacing must be three positive voxel sizes in mm, got {spacing!r}')


def _parse_interpolation(value) -> str:
    if value not in ('linear', 'nearest'):
        raise ValueError(f"image_interpolation must be 'linear' or 'nearest', got {value!r}")
    return value


def _parse_pad(value, name: str, strings: tuple[str, ...] = ('minimum',)):
    """A pad value: one of ``strings``, a number, or an array of numbers of shape (N,) or (B, C)."""
    if isinstance(value, str):
        if value in strings:
            return value
        raise ValueError(f'{name} must be one of {strings}, a number or an array of numbers, got {value!r}')
    if _is_number(value):
        return float(value)
    try:
        tensor = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f'{name} must be one of {strings}, a number or an array of numbers, got {value!r}') from None
    if tensor.ndim > 2 or tensor.numel() == 0 or not bool(torch.isfinite(tensor).all()):
        raise ValueError(f'{name} must be finite numbers of shape (), (N,) or (B, C), got {value!r}')
    return tensor


def _pad_plan(value, batch: int, channels: int, name: str):
    """A parsed pad value as the string it is or a host (batch, channels) tensor. A 1-D array has
    one value per batch element (length B) or per channel (length C); B == C > 1 is ambiguous."""
    if isinstance(value, str):
        return value
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if tensor.ndim == 0:
        return tensor.expand(batch, channels)
    if tensor.ndim == 1:
        if len(tensor) == batch == channels and batch > 1:
            raise ValueError(f'{name} has {batch} values for a batch of {batch} with {channels} channels: '
                             'give a (B, C) array to say which is meant')
        if len(tensor) == batch:
            return tensor[:, None].expand(batch, channels)
        if len(tensor) == channels:
            return tensor[None].expand(batch, channels)
    elif tensor.shape[0] in (1, batch) and tensor.shape[1] in (1, channels):
        return tensor.expand(batch, channels)
    raise ValueError(f'{name} has shape {tuple(tensor.shape)}, which fits neither the batch of {batch} '
                     f'nor the {channels} channels')


def _parameter(value, tail: tuple[int, ...], name: str) -> torch.Tensor:
    """A deterministic parameter as a float64 tensor with a leading batch axis (1 = shared)."""
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if tensor.shape == tail:
        return tensor[None]
    if tensor.ndim == len(tail) + 1 and tensor.shape[1:] == tail and len(tensor) > 0:
        return tensor
    raise ValueError(f'{name} must have shape {tail} or (B, *{tail}), got {tuple(tensor.shape)}')


def _per_element(tensor: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """A host parameter with a leading batch axis of 1 or ``batch``, expanded to ``batch``."""
    if len(tensor) not in (1, batch):
        raise ValueError(f'{name} has {len(tensor)} sets of values for a batch of {batch}')
    return tensor.expand(batch, *tensor.shape[1:])


# ---------------------------------------------------------------------------------------------
# The host's side of a call: the generator, the chosen elements' parameters, the draws, dtypes
# and the host-to-device copy.

def _host_generator(generator) -> torch.Generator:
    if generator is None:
        return torch.default_generator
    if not isinstance(generator, torch.Generator) or generator.device.type != 'cpu':
        raise ValueError('generator must be a CPU torch.Generator (every parameter is drawn on the host, '
                         f'whatever the image device), got {generator!r}')
    return generator


def _take(params, index: torch.Tensor):
    """The parameters of the batch elements ``index``: every tensor in ``params`` has a leading
    batch axis; numbers, strings and generators are shared by the whole call."""
    if isinstance(params, torch.Tensor):
        return params[index]
    if isinstance(params, dict):
        return {key: _take(value, index) for key, value in params.items()}
    if isinstance(params, (list, tuple)):
        return type(params)(_take(value, index) for value in params)
    return params


def _uniform(low, high, shape, generator: torch.Generator) -> torch.Tensor:
    """Float64 host draws of ``shape``, uniform in ``[low, high)``; ``low`` and ``high`` are numbers
    or sequences broadcast against the last axis (one range per axis)."""
    low, high = (torch.as_tensor(bound, dtype=torch.float64) for bound in (low, high))
    return low + (high - low) * torch.rand(shape, dtype=torch.float64, generator=generator)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _upload(device: torch.device, dtype: torch.dtype, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host tensors on ``device`` as ``dtype``, in one copy: packed into one buffer, pinned and
    copied without blocking on CUDA, so that the host queues the call's kernels without waiting.
    Tensors already on ``device`` as ``dtype`` (the static buffers of a :class:`CUDAGraphCall`)
    are used as they are."""
    if all(tensor.device == device and tensor.dtype == dtype for tensor in tensors):
        return list(tensors)
    flat = torch.cat([tensor.reshape(-1).to(dtype) for tensor in tensors])
    if device.type == 'cuda':
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [piece.view(tensor.shape) for piece, tensor in zip(flat.split([t.numel() for t in tensors]), tensors)]


# ---------------------------------------------------------------------------------------------
# Geometry: world maps in voxel indices, and the sampling grids handed to grid_sample.

def _euler(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``Rz(z) @ Rx(x) @ Ry(y)`` (radians, right-handed, batched): ITK's Euler3D order."""
    one, zero = torch.ones_like(x), torch.zeros_like(x)

    def matrix(rows):
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    cx, sx, cy, sy, cz, sz = x.cos(), x.sin(), y.cos(), y.sin(), z.cos(), z.sin()
    rx = matrix([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    ry = matrix([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = matrix([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    return rz @ rx @ ry


def _to_voxels(matrix: torch.Tensor, spacing) -> torch.Tensor:
    """``S^-1 @ matrix @ S`` for S = diag(spacing): a world (mm) linear map in voxel indices."""
    ratio = torch.tensor([[sj / si for sj in spacing] for si in spacing], dtype=matrix.dtype)
    return matrix * ratio


@functools.lru_cache(maxsize=64)
def _normalisation(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Host float64 ``(a, b)`` per voxel axis (i, j, k) with ``g = a u + b``; an axis of one voxel
    keeps g = u (grid_sample reads its only voxel whatever g is)."""
    a = torch.tensor([2 / (n - 1) if n > 1 else 1.0 for n in shape], dtype=torch.float64)
    b = torch.tensor([-1.0 if n > 1 else 0.0 for n in shape], dtype=torch.float64)
    return a, b


def _theta(matrix: torch.Tensor, offset: torch.Tensor, shape) -> torch.Tensor:
    """Host float64: the voxel map ``u = matrix @ v + offset`` ((N, 3, 3), (N, 3)) as affine_grid's
    ``(N, 3, 4)`` matrix between normalised output and input coordinates, in (k, j, i) order."""
    a, b = _normalisation(tuple(shape))
    scaled = a[:, None] * matrix / a  # A M A^-1, A = diag(a)
    shift = a * offset + b - scaled @ b
    return torch.cat([scaled.flip(-1, -2), shift.flip(-1)[..., None]], -1)


def _half_up(shape) -> torch.Tensor:
    """Host float64, per grid component (k, j, i): the normalised shift of ``2^-21 max(shape)``
    voxels (a few float32 steps of the largest index) that makes grid_sample's nearest lookup,
    which rounds half to even, round an exact half voxel up as ITK does (``floor(u + 0.5)``),
    on labels and in the inside test. Interpolated images keep the unshifted grid."""
    a, _ = _normalisation(tuple(shape))
    return a.flip(0) * (max(shape) * 2.0 ** -21)


def _cpu_kernels(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is on the CPU, for which three forms below are written (the affine grid
    by broadcasting, the inside test by comparisons, grid_sample in slabs); a GPU, and the meta
    tensors on which device work is counted, take the one-kernel forms. One predicate, so that a
    test can run the GPU's forms on the CPU."""
    return tensor.device.type == 'cpu'


def _affine_grid(theta: torch.Tensor, batch: int, shape) -> torch.Tensor:
    """The sampling grid ``(batch, n * X, Y, Z, 3)`` of ``theta`` (batch * n, 3, 4) on the device:
    the n maps of an element are stacked along X, so one grid_sample pulls them all.

    On a GPU it is one ``affine_grid``. On the CPU, where affine_grid writes a (X, Y, Z, 4) base
    grid and multiplies it, the same sums are built, faster, by broadcasting, one
    addition writing the grid, component-major (``(3, N, X, Y, Z)`` storage, handed over as a
    permuted view, which grid_sample reads through its strides): a broadcast over a contiguous Z
    axis is vectorised, one over an inner axis of 3 is not, and the component planes are what
    the inside test compares (``_inside_by_bounds``)."""
    if not _cpu_kernels(theta):
        return F.affine_grid(theta, [len(theta), 1, *shape], align_corners=True).view(batch, -1, *shape[1:], 3)
    i, j, k = (torch.linspace(-1, 1, n, dtype=theta.dtype) if n > 1 else torch.zeros(1, dtype=theta.dtype)
               for n in shape)
    # (3, 4, N, 1, 1): component x=k, y=j, z=i; column. Contiguous, so that the sums below are
    # too (broadcasting lays its result out after its inputs).
    columns = theta.permute(1, 2, 0).contiguous()[..., None, None]
    along_ij = i.view(-1, 1) * columns[:, 2] + j * columns[:, 1]  # (3, N, X, Y)
    along_k = k * columns[:, 0, :, 0] + columns[:, 3, :, 0]  # (3, N, Z)
    planes = along_ij[..., None] + along_k[:, :, None, None]
    return planes.view(3, batch, -1, *shape[1:]).permute(1, 2, 3, 4, 0)


# ---------------------------------------------------------------------------------------------
# Resampling: ITK's ResampleImageFilter with LinearInterpolateImageFunction (or
# NearestNeighborInterpolateImageFunction), as TorchIO calls it through SimpleITK. An output
# voxel v pulls the input at a continuous index u; inside -0.5 <= u < n - 0.5 on every axis it
# interpolates with edge-clamped neighbours (grid_sample's 'border'), outside it takes the pad.
# Maps are handed to grid_sample as normalised grids (components in (k, j, i) order,
# align_corners=True: g = 2 u / (n - 1) - 1).

def _resample_pair(image, label, grids, image_pad, label_pad, interpolation):
    """Image and optional label through ``grids`` (2, N, X, Y, Z, 3): grids 0 for the image,
    grids 1, shifted by ``_half_up``, for the label and the inside test."""
    items = [(image, grids[0], image_pad, _mode(interpolation))]
    if label is not None:
        items.append((label, grids[1], label_pad, 'nearest'))
    out = _resample(items, grids[1])
    return out[0], None if label is None else out[1]


def _mode(interpolation: str) -> str:
    return 'bilinear' if interpolation == 'linear' else 'nearest'


def _resample(items, test_grid: torch.Tensor) -> list[torch.Tensor]:
    """Pull volumes (N, C, X, Y, Z) through grids with ITK's rule; ``items`` are
    ``(volume, grid, pad, mode)``, pad a (N | 1, C | 1, 1, 1, 1) tensor, mode 'bilinear' or
    'nearest'; the inside test is made on ``test_grid``.

    On a GPU (and on meta tensors) the inside test is one more grid_sample: a nearest lookup of
    ones with zero padding is 1 where the nearest voxel exists, i.e. inside, one kernel instead
    of a chain of comparisons over the stored grid; ``lerp`` then takes the pad where it is 0
    and the sample where it is 1, exactly. On the CPU, where the 3-D grid_sample is scalar code
    and comparisons are vectorised, the test compares the grid's component planes with the
    bounds ``-0.5`` and ``n - 0.5`` (normalised) instead; the two differ only at exact ties.
    Work is in the grid's dtype; every volume keeps its own.
    """
    shape = tuple(items[0][0].shape[2:])
    inside = (_inside_by_bounds if _cpu_kernels(test_grid) else _inside_by_lookup)(test_grid, shape)
    out = []
    for volume, grid, pad, mode in items:
        sampled = _grid_sample(volume.to(grid.dtype), grid, mode)
        select = torch.lerp(pad, sampled, inside, out=sampled) if inside.is_floating_point() \
            else torch.where(inside, sampled, pad, out=sampled)  # in place: no new volume
        out.append(select.to(volume.dtype))
    return out


def _grid_sample(x: torch.Tensor, grid: torch.Tensor, mode: str, padding: str = 'border') -> torch.Tensor:
    """``F.grid_sample``. On the CPU the 3-D kernel runs one thread per batch element, so a single
    volume is cut into as many slabs along X as there are threads."""
    options = dict(mode=mode, padding_mode=padding, align_corners=True)
    threads, size = _threads(), grid.shape[1]
    if not _cpu_kernels(x) or len(x) > 1 or threads == 1 or size < threads:
        return F.grid_sample(x, grid, **options)
    rows = size // threads * threads
    slabs = grid[:, :rows].reshape(threads, rows // threads, *grid.shape[2:])
    out = F.grid_sample(x.expand(threads, *x.shape[1:]), slabs, **options)
    out = out.transpose(0, 1).reshape(1, x.shape[1], rows, *grid.shape[2:4])
    if rows == size:
        return out
    return torch.cat([out, F.grid_sample(x, grid[:, rows:], **options)], 2)


@torch.compiler.assume_constant_result
def _threads() -> int:
    """torch's CPU thread count; a constant of the graph under torch.compile, which cannot trace
    the call (a changed count takes effect at the next compilation)."""
    return torch.get_num_threads()


def _inside_by_bounds(grid: torch.Tensor, shape) -> torch.Tensor:
    """(N, 1, ...) bool: ``-0.5 <= u < n - 0.5`` on every axis, compared in normalised units on
    each component plane (vectorised on a component-major grid)."""
    low, high = _bounds(tuple(shape))
    planes = [grid[..., component] for component in range(3)]

    def test(parts):
        tests = [(part >= low[c]).logical_and_(part < high[c]) for c, part in enumerate(parts)]
        return tests[0].logical_and_(tests[1]).logical_and_(tests[2])

    if torch.compiler.is_compiling():  # compiled, the comparisons fuse into one pass anyway
        return test(planes)[:, None]
    # Eager, in blocks of X-rows, so that a plane's second comparison reads it from cache rather
    # than from memory (a whole plane is 12 MB at 144^3).
    inside = torch.empty(planes[0].shape, dtype=torch.bool, device=grid.device)
    rows = max(1, _BLOCK_VOXELS // math.prod(planes[0].shape[2:]))
    for start in range(0, planes[0].shape[1], rows):
        inside[:, start:start + rows] = test([plane[:, start:start + rows] for plane in planes])
    return inside[:, None]


# The voxels of one block of the CPU's inside test: 1 MB of float32 per grid component.
_BLOCK_VOXELS = 1 << 18


@functools.lru_cache(maxsize=64)
def _bounds(shape: tuple[int, int, int]) -> tuple[list[float], list[float]]:
    """The inside bounds ``-0.5`` and ``n - 0.5`` in normalised units, (k, j, i) order: Python
    numbers, from ``_normalisation``'s a and b in the same float64 steps, so that the compiled
    graph holds them as constants and reads no tensor back."""
    ab = [(2 / (n - 1), -1.0) if n > 1 else (1.0, 0.0) for n in shape]
    low = [b - a / 2 for a, b in ab]
    high = [a * (n - 0.5) + b for (a, b), n in zip(ab, shape)]
    return low[::-1], high[::-1]


def _inside_by_lookup(grid: torch.Tensor, shape) -> torch.Tensor:
    """(N, 1, ...) float: 1 where ``grid`` points inside a volume of ``shape``, else 0; one
    nearest lookup of ones with zero padding (1 where the nearest voxel exists). An axis of one
    voxel has no inside test here: grid_sample reads its only voxel whatever the grid says."""
    unit = _unit(grid.device, grid.dtype).expand(len(grid), 1, *shape)
    return _grid_sample(unit, grid, 'nearest', 'zeros')


@functools.lru_cache(maxsize=16)
def _unit(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A single 1, expanded into the input volume of the inside test (no full-size memory)."""
    return torch.ones((1, 1, 1, 1, 1), device=device, dtype=dtype)


def _image_pad(image, pad, uploaded, dtype):
    """The image pad (B | 1, C | 1, 1, 1, 1): ``uploaded`` for a numeric pad, else each channel's
    minimum or (``'mean'``) the mean of the six faces, edges counted once per face (TorchIO)."""
    if isinstance(pad, torch.Tensor):
        return uploaded.view(*pad.shape, 1, 1, 1)
    if pad == 'minimum':
        return _min_pad(image, dtype)
    faces = [image.select(axis, end) for axis in (2, 3, 4) for end in (0, -1)]
    return torch.cat([face.flatten(2) for face in faces], 2).to(dtype).mean(2)[..., None, None, None]


def _min_pad(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.amin(dim=(2, 3, 4), keepdim=True).to(dtype)
