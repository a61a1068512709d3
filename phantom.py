"""Built-in synthetic longitudinal MS-lesion MRI, written in the ISBI 2015 training layout.

The paper's data (ISBI 2015: 5 subjects, 21 scans, FLAIR/MPRAGE/PD/T2, 181x217x181 at 1 mm,
two raters' masks; Carass et al., NeuroImage 148:77, 2017) cannot be downloaded by code, so
this module simulates a dataset with the same structure from MR physics, in the manner of the
BrainWeb simulator (Collins et al., IEEE TMI 17:463, 1998; Kwan, Evans & Pike, IEEE TMI
18:1085, 1999): partial-volume tissue fractions, each sequence's signal equation, blur, a bias
field and Rician noise. One story, top to bottom:

1. grid       MNI ICBM 1 mm field of view, any isotropic spacing
2. anatomy    per subject: cerebrum with a folded cortical ribbon, sulci and fissures, white
              matter, deep grey nuclei, ventricles, brainstem and cerebellum, all as
              partial-volume fractions of CSF / GM / deep GM / WM
3. lesions    per subject a plan of ovoid lesions (sizes, McDonald-like locations, orientation)
              that grow, shrink and appear over the time points
4. tissue     3 T T1 / T2 / PD per tissue; lesion tissue by fast-exchange mixing with WM
5. signal     FSE (T2w, PDw), inversion-recovery FSE (FLAIR), MPRAGE steady state
6. artefacts  slice-profile blur, smooth multiplicative bias field, Rician noise, scanner units,
              plus periventricular caps and rims bright on FLAIR that are *not* lesions
7. raters     two masks per scan that differ at borders and on small, faint lesions
8. writing    `generate`, `ensure_cached` (the cache repro.py uses), `preview`, the CLI

Coordinates are millimetres in a RAS-like frame: axis 0 = x (left -> right), axis 1 = y
(posterior -> anterior), axis 2 = z (inferior -> superior), origin (-90, -126, -72) mm.

Sources of the numbers: the grid, noise and bias-field conventions are BrainWeb's (Cocosco et
al., NeuroImage 5:S425, 1997, and its FAQ); 3 T relaxation times from Wansapura et al., JMRI
9:531, 1999 and Wright et al., MAGMA 21:121, 2008; the spin-echo and inversion-recovery signal
equations as in Bernstein, King & Zhou, Handbook of MRI Pulse Sequences, 2004 (FLAIR: Hajnal et
al., J Comput Assist Tomogr 16:841, 1992); MPRAGE's steady state after Deichmann et al.,
NeuroImage 12:112, 2000; lesion regions after the McDonald criteria (Thompson et al., Lancet
Neurol 17:162, 2018); acquisition (3 mm slices for T2w/PDw/FLAIR) from Carass et al. 2017.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch
from tqdm import tqdm

GENERATOR_VERSION = "2"   # bump whenever the output changes: it keys the cache
# The four contrasts, named by their ISBI 2015 file tag (trainingNN_TT_<tag>_pp.nii); every
# per-contrast table and dict in this module is keyed by the tag.
FILE_TAGS = ("flair", "mprage", "pd", "t2")
ISBI_TIMEPOINTS = (4, 4, 5, 4, 4)

# --------------------------------------------------------------------------------------------
# 1. Grid
# --------------------------------------------------------------------------------------------
ORIGIN_MM = np.array([-90.0, -126.0, -72.0])
EXTENT_MM = np.array([180.0, 216.0, 180.0])   # 181 x 217 x 181 voxel centres at 1 mm
SPACING_RANGE_MM = (0.7, 6.0)


def _check_spacing(spacing) -> float:
    try:
        spacing = float(spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a number of millimetres, got {spacing!r}") from None
    lo, hi = SPACING_RANGE_MM
    if not lo <= spacing <= hi:
        raise ValueError(f"spacing must lie in [{lo}, {hi}] mm, got {spacing}")
    return spacing


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def grid_shape(spacing: float = 1.0) -> tuple[int, int, int]:
    """Voxels per axis covering the MNI ICBM field of view at `spacing` mm (1 mm: 181x217x181)."""
    spacing = _check_spacing(spacing)
    return tuple(int(n) for n in np.floor(EXTENT_MM / spacing + 1e-6).astype(int) + 1)


def grid_affine(spacing: float = 1.0) -> np.ndarray:
    """Voxel -> mm affine: diagonal `spacing`, origin (-90, -126, -72) mm."""
    spacing = _check_spacing(spacing)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = ORIGIN_MM
    return affine


def _ramp(v, h):
    """Partial-volume fraction of a voxel of size `h` mm whose centre lies `v` mm inside a surface."""
    return np.clip(0.5 + v / h, 0.0, 1.0).astype(np.float32)


class _Box:
    """A sub-box of the grid (index slices) with its voxel-centre coordinates in mm."""

    def __init__(self, spacing, lo_mm, hi_mm, shape):
        lo = np.clip(np.floor((np.asarray(lo_mm) - ORIGIN_MM) / spacing).astype(int), 0, shape)
        hi = np.clip(np.ceil((np.asarray(hi_mm) - ORIGIN_MM) / spacing).astype(int) + 1, 0, shape)
        self.slices = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        self.shape = tuple(int(b - a) for a, b in zip(lo, hi))
        axes = [(ORIGIN_MM[i] + spacing * np.arange(lo[i], hi[i])).astype(np.float32) for i in range(3)]
        self.x = axes[0][:, None, None]
        self.y = axes[1][None, :, None]
        self.z = axes[2][None, None, :]

    def sub(self, spacing, lo_mm, hi_mm):
        """Index slices (into this box) and coordinates of the part of this box inside [lo, hi] mm."""
        lo = np.array([self.x[0, 0, 0], self.y[0, 0, 0], self.z[0, 0, 0]])
        a = np.clip(np.floor((np.asarray(lo_mm) - lo) / spacing).astype(int), 0, self.shape)
        b = np.clip(np.ceil((np.asarray(hi_mm) - lo) / spacing).astype(int) + 1, 0, self.shape)
        sl = tuple(slice(int(i), int(j)) for i, j in zip(a, b))
        return sl, (self.x[sl[0]], self.y[:, sl[1]], self.z[:, :, sl[2]])


class _Noise:
    """Smooth Gaussian random field (zero mean, unit variance) on a box, sampled trilinearly.

    `scale_mm` is the Gaussian smoothing length per axis: level sets are spaced a few scales apart.
    """

    def __init__(self, rng, lo_mm, hi_mm, scale_mm):
        scale = np.broadcast_to(np.asarray(scale_mm, float), (3,))
        lo = np.asarray(lo_mm, float)
        step = scale / 2.0
        n = np.ceil((np.asarray(hi_mm) - lo) / step).astype(int) + 1
        field = ndi.gaussian_filter(rng.standard_normal(n), 2.0, mode="wrap")
        self.field = torch.from_numpy((field / field.std()).astype(np.float32))[None, None]
        # mm -> grid_sample's [-1, 1]: c * gain + offset per axis
        self.gain = [float(2 / (st * (m - 1))) for st, m in zip(step, n)]
        self.offset = [float(-1 - l * g) for l, g in zip(lo, self.gain)]

    def __call__(self, x, y, z) -> np.ndarray:
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        grid = np.empty(shape + (3,), np.float32)
        for i, c in enumerate((x, y, z)):   # grid_sample wants (W, H, D) = axes (2, 1, 0)
            grid[..., 2 - i] = c * self.gain[i] + self.offset[i]
        out = torch.nn.functional.grid_sample(self.field, torch.from_numpy(grid.reshape(1, -1, 1, 1, 3)),
                                              mode="bilinear", padding_mode="border", align_corners=True)
        return out.numpy().reshape(shape)


# --------------------------------------------------------------------------------------------
# 2. Anatomy
# --------------------------------------------------------------------------------------------
TISSUES = ("csf", "gm", "deep", "wm")   # partial-volume compartments; background = 1 - sum
REF_CENTRE = np.array([0.0, -17.0, 13.0], np.float32)   # cerebrum centre of the reference brain, mm


def _ellipsoid_distance(x, y, z, centre, radii):
    """Signed radial distance (mm, negative inside) to an axis-aligned ellipsoid surface."""
    (cx, cy, cz), (rx, ry, rz) = (map(float, centre), map(float, radii))
    dx, dy, dz = x - cx, y - cy, z - cz
    r = np.sqrt(dx * dx + dy * dy + dz * dz)
    g = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2 + (dz / rz) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = r - r / g
    return np.where(g > 0, d, -min(radii)).astype(np.float32)


def _chain(points, n_per_segment=6):
    """Dense ellipsoids (centre, radii) along a polyline of control ellipsoids: tubes, horns."""
    blobs = []
    for (c0, r0), (c1, r1) in zip(points[:-1], points[1:]):
        for t in np.linspace(0, 1, n_per_segment, endpoint=False):
            blobs.append(((1 - t) * np.asarray(c0) + t * np.asarray(c1), (1 - t) * np.asarray(r0) + t * np.asarray(r1)))
    blobs.append((np.asarray(points[-1][0]), np.asarray(points[-1][1])))
    return blobs


def _union_distance(box, spacing, blobs, margin):
    """Signed distance to a union of ellipsoids on `box`; +margin beyond each blob's bounding box."""
    dist = np.full(box.shape, margin, np.float32)
    for c, r in blobs:
        sl, (x, y, z) = box.sub(spacing, c - r - margin, c + r + margin)
        if min(s.stop - s.start for s in sl) <= 0:
            continue
        np.minimum(dist[sl], _ellipsoid_distance(x, y, z, c, r), out=dist[sl])
    return dist


def _paint(frac, alpha, composition):
    """Lay a structure of coverage `alpha` and tissue `composition` over the fractions."""
    keep = 1.0 - alpha
    for k in TISSUES:
        frac[k] = frac[k] * keep + alpha * composition.get(k, 0.0)


def _cortex(depth, sulcus_dist, t_ext, w_sulcus, t_gm, h):
    """CSF / GM / WM fractions of a folded cortex.

    `depth` is the distance (mm) below the outer surface, `sulcus_dist` the distance to the
    nearest sulcal or fissural sheet. CSF fills the outer `t_ext` mm and `w_sulcus` mm on
    either side of a sheet; the next `t_gm` mm are cortex; deeper is white matter. Also returns
    delta - t_gm: how far a voxel lies inside the white matter (mm), for juxtacortical lesions.
    """
    delta = np.minimum(depth - t_ext, sulcus_dist - w_sulcus)
    csf = _ramp(-delta, h)
    wm = _ramp(delta - t_gm, h)
    return {"csf": csf, "gm": 1.0 - csf - wm, "wm": wm}, delta - t_gm


def _sheet_distance(n, spacing):
    """Distance (mm) to the zero level set of a smooth field n: |n| / |grad n|."""
    gx, gy, gz = np.gradient(n, spacing)
    return np.abs(n) / (np.sqrt(gx * gx + gy * gy + gz * gz) + 1e-4)


def _coarse(fn, box, spacing, step_mm=4.0):
    """fn(x, y, z) of a smooth field, evaluated every ~step_mm and interpolated to the box."""
    f = max(1, int(round(step_mm / spacing)))
    if f == 1:
        return np.broadcast_to(fn(box.x, box.y, box.z), box.shape).astype(np.float32)
    m = [(n - 1) // f + 2 for n in box.shape]
    c = [(v.ravel()[0] + f * spacing * np.arange(k)).astype(np.float32) for v, k in zip((box.x, box.y, box.z), m)]
    coarse = fn(c[0][:, None, None], c[1][None, :, None], c[2][None, None, :])
    fine = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(coarse))[None, None],
                                           size=[(k - 1) * f + 1 for k in m], mode="trilinear", align_corners=True)
    return np.ascontiguousarray(fine[0, 0, :box.shape[0], :box.shape[1], :box.shape[2]].numpy())


def _directions(x, y, z, centre):
    """Distance r (mm) from `centre` and unit direction u."""
    cx, cy, cz = map(float, centre)
    dx, dy, dz = x - cx, y - cy, z - cz
    r = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-3
    return r, (dx / r, dy / r, dz / r)


def _on_sphere(noise, centre, radius):
    """A field that depends on the direction from `centre` only: noise on a sphere, extended radially."""
    def fn(x, y, z):
        _, u = _directions(x, y, z, centre)
        return noise(radius * u[0], radius * u[1], radius * u[2])
    return fn


@dataclass
class Anatomy:
    """Lesion-free brain of one subject on a crop `box` of the grid (all maps float32, crop shape).

    frac:      partial-volume fractions per compartment of TISSUES (background = 1 - sum)
    cap:       share (0..1) of the WM fraction that is periventricular cap/rim tissue
    brain:     bool, the skull-stripped brain mask
    wm_depth:  mm inside the cerebral white matter below the cortex (negative outside)
    vent_dist: mm from the ventricle surface outside the ventricles, -spacing/2 inside, 99 far away
    infra:     bool, brainstem and cerebellum (infratentorial)
    cap_tip:   0..1, closeness to the frontal and occipital horn tips (where caps sit)
    """
    box: _Box
    frac: dict
    cap: np.ndarray
    brain: np.ndarray
    wm_depth: np.ndarray
    vent_dist: np.ndarray
    infra: np.ndarray
    cap_tip: np.ndarray


_SPHERE_MM = ([-70.0] * 3, [70.0] * 3)   # the box of the noise fields that live on directions


@dataclass
class _Proportions:
    """One subject's drawn proportions and the crop of the grid its brain is built on."""
    spacing: float
    size: np.ndarray      # scale per axis relative to the reference brain
    centre: np.ndarray    # cerebrum centre, mm
    vent: float           # ventricle width (atrophy)
    t_ext: float          # subarachnoid CSF, mm
    w_sulcus: float       # CSF half-width of a sulcus, mm
    t_gm: float           # cortical thickness, mm
    sulcus_depth: float   # typical depth of a sulcus below the surface, mm
    axes: np.ndarray      # cerebrum semi-axes, mm
    box: _Box

    def place(self, p):
        """Reference-brain mm -> this subject's mm."""
        return (self.centre + (np.asarray(p, np.float32) - REF_CENTRE) * self.size).astype(np.float32)

    @property
    def cerebellum(self):
        """Centre and semi-axes (mm) of the cerebellum's ellipsoid."""
        return self.place([0, -66, -38]), np.array([50.0, 28.0, 21.0], np.float32) * self.size

    def field_of_direction(self, rng, scale_mm):
        """A smooth random field on the crop that varies with the direction from the centre only."""
        return _coarse(_on_sphere(_Noise(rng, *_SPHERE_MM, scale_mm), self.centre, 60.0), self.box, self.spacing)


def make_anatomy(rng: np.random.Generator, spacing: float) -> Anatomy:
    """One subject's brain: shape, size, folding and ventricle width drawn from `rng`.

    Each structure is laid over the fractions of the ones before it: the cerebrum with its
    folded cortex, the deep grey nuclei, the ventricles, the cerebellum, the brainstem and the
    4th ventricle; then the brain mask and the periventricular caps. The order of the draws
    from `rng` is part of the output (GENERATOR_VERSION).
    """
    p = _draw_proportions(rng, spacing)
    cb_out = _ellipsoid_distance(p.box.x, p.box.y, p.box.z, *p.cerebellum)   # mm outside the cerebellum
    stem_dist, below_diencephalon = _brainstem_distance(p)
    frac, wm_depth = _cerebrum(rng, p, cb_out, stem_dist, below_diencephalon)
    _paint(frac, _ramp(-_union_distance(p.box, spacing, _deep_nuclei(p), 2.0), spacing), {"deep": 1.0})
    ventricles = _ventricles(p)
    vent_frac = _ramp(-_union_distance(p.box, spacing, ventricles, 2.0), spacing)
    _paint(frac, vent_frac, {"csf": 1.0})
    infra = _paint_cerebellum(rng, frac, p, cb_out)
    infra |= _paint_brainstem(frac, p, stem_dist, below_diencephalon)
    _paint_fourth_ventricle(frac, p)
    brain = sum(frac[k] for k in TISSUES) > 0.5
    for k in TISSUES:
        frac[k] *= brain
    vent_dist, cap_tip, cap = _periventricular_caps(p, ventricles, vent_frac)
    return Anatomy(box=p.box, frac=frac, cap=cap, brain=brain, wm_depth=wm_depth.astype(np.float32),
                   vent_dist=vent_dist, infra=infra, cap_tip=cap_tip)


def _draw_proportions(rng, spacing) -> _Proportions:
    """Size, position, ventricle width and cortical dimensions of one subject."""
    # float32 throughout: numpy would promote float32 maps combined with float64 scalars
    size = (rng.uniform(0.93, 1.05) * (1.0 + 0.025 * rng.standard_normal(3))).astype(np.float32)   # per axis
    centre = (REF_CENTRE + rng.normal(0.0, 1.5, 3)).astype(np.float32)
    vent = float(np.exp(rng.uniform(np.log(0.8), np.log(1.7))))
    t_ext, w_sulcus, t_gm = rng.uniform(0.9, 2.0), rng.uniform(0.4, 0.9), rng.uniform(2.4, 3.0)
    sulcus_depth = rng.uniform(15.0, 20.0)
    axes = np.array([68.0, 86.0, 60.0], np.float32) * size
    # the crop that holds the brain; the brainstem runs out of the field of view below
    box = _Box(spacing, [*(centre[:2] - axes[:2] * 1.08 - 3), ORIGIN_MM[2]], centre + axes * 1.08 + 3,
               grid_shape(spacing))
    return _Proportions(spacing, size, centre, vent, t_ext, w_sulcus, t_gm, sulcus_depth, axes, box)


# -- cerebrum ---------------------------------------------------------------------------------
def _cerebrum(rng, p, cb_out, stem_dist, below_diencephalon):
    """Fractions of the cerebrum (its cortex folded by sulci and fissures) and its wm_depth.

    The cerebral cortex wraps around the cerebellum and brainstem too, so their surfaces count
    as CSF boundaries for the cerebrum.
    """
    depth, u = _cerebrum_depth(rng, p)
    sulci = _sulci(rng, p, depth, u)
    stem_csf = np.where(below_diencephalon > 0, stem_dist - p.t_ext, 99.0)
    boundary = np.minimum.reduce([sulci, _interhemispheric_fissure(p), _sylvian_fissure(rng, p),
                                  cb_out + p.t_ext, stem_csf])
    frac, wm_depth = _cortex(depth, boundary, p.t_ext, p.w_sulcus, p.t_gm, p.spacing)
    frac["deep"] = np.zeros_like(frac["wm"])
    outer = _ramp(depth, p.spacing)
    for k in TISSUES:
        frac[k] *= outer
    return frac, wm_depth


def _cerebrum_depth(rng, p):
    """Depth (mm) below the cerebrum's outer surface, and the unit direction from its centre.

    An egg, narrower in front, flat below with a midline notch between the temporal lobes, the
    occipital lobes low over the cerebellum, lumpy on the scale of lobes.
    """
    r, u = _directions(p.box.x, p.box.y, p.box.z, p.centre)
    axes = p.axes
    below = 0.95 - 0.45 * np.exp(-(u[0] / 0.35) ** 2 - (u[1] / 0.55) ** 2) + 0.25 * np.maximum(-u[1], 0.0)
    a = (axes[0] * (1.0 - 0.10 * np.maximum(u[1], 0.0)), axes[1], np.where(u[2] > 0, axes[2], axes[2] * below))
    radius = 1.0 / np.sqrt((u[0] / a[0]) ** 2 + (u[1] / a[1]) ** 2 + (u[2] / a[2]) ** 2)
    lobes = p.field_of_direction(rng, 18.0)
    return radius * (1.0 + 0.035 * lobes) - r, u


def _sulci(rng, p, depth, u):
    """Distance (mm) to the nearest sulcus.

    Sulci are sheets where a smooth function of direction crosses zero, so they stand roughly
    perpendicular to the surface; a smooth drift with depth bends them; their depth varies.
    """
    fold = _Noise(rng, *_SPHERE_MM, 1.9)
    drift = [p.field_of_direction(rng, 10.0) for _ in range(3)]
    n = fold(*(60.0 * u[i] + 0.35 * depth * drift[i] for i in range(3)))
    depth_limit = np.clip(p.sulcus_depth * (1 + 0.3 * p.field_of_direction(rng, 8.0)), 5, 30)
    return np.hypot(_sheet_distance(n, p.spacing), np.maximum(depth - depth_limit, 0.0))


def _interhemispheric_fissure(p):
    """Distance (mm) to the midline fissure, which stops where the corpus callosum and the
    diencephalon join the hemispheres."""
    x, y, z = p.box.x, p.box.y, p.box.z
    core_c, core_r = p.place([0, -8, 6]), np.array([38.0, 24.0], np.float32) * p.size[1:]
    core = 1.0 - np.sqrt(((y - core_c[1]) / core_r[0]) ** 2 + ((z - core_c[2]) / core_r[1]) ** 2)
    return np.hypot(np.abs(x - p.centre[0]), np.maximum(core, 0.0) * core_r[1]) - 0.6


def _sylvian_fissure(rng, p):
    """Distance (mm) to the Sylvian fissure: rising backwards from the temporal pole, laterally
    down to the insula."""
    x, y, z, place = p.box.x, p.box.y, p.box.z, p.place
    syl_z = place([0, 0, -2])[2] - 0.4 * (y - place([0, 0, 0])[1]) + 3.0 * _Noise(rng, [-100] * 3, [100] * 3, 5.0)(x, y, 0.0)
    y_out = np.maximum(np.maximum(y - place([0, 18, 0])[1], place([0, -42, 0])[1] - y), 0.0)
    return np.sqrt((z - syl_z) ** 2 + np.maximum(35.0 * p.size[0] - np.abs(x), 0.0) ** 2 + y_out ** 2) - 0.5


# -- deep grey nuclei and ventricles ----------------------------------------------------------
def _deep_nuclei(p):
    """Ellipsoids of the deep grey nuclei, hugging the ventricles."""
    vx = 11.0 + 5.0 * p.vent
    nuclei = []
    for s in (-1, 1):
        nuclei += [
            (p.place([s * 11, -18, 6]), np.array([8.0, 14.0, 8.5]) * p.size),                  # thalamus
            (p.place([s * (vx + 4.5), 13, 10]), np.array([5.0, 10.0, 8.5]) * p.size),          # caudate head
            (p.place([s * (vx + 5.5), -8, 19]), np.array([3.5, 9.0, 4.0]) * p.size),           # caudate body
            (p.place([s * 26, 2, 1]), np.array([5.5, 14.0, 9.0]) * p.size),                    # putamen
            (p.place([s * 19.5, -3, -1]), np.array([3.5, 8.0, 5.5]) * p.size),                 # pallidum
        ]
    return nuclei


def _ventricles(p):
    """Ellipsoids of the C-shaped lateral ventricles and the slit-like third ventricle; width
    scales with atrophy."""
    return _lateral_ventricle(p, -1) + _lateral_ventricle(p, 1) + \
        [(p.place([0, -14, 2]), np.array([1.2 * p.vent, 13.0, 8.5]) * p.size)]


def _lateral_ventricle(p, s):
    """Frontal horn, body, trigone, occipital and temporal horns on side `s` (-1 left, 1 right)."""
    vent, size, place = p.vent, p.size, p.place
    # (x of the medial wall, y, z), radii; horns and bodies sit beside a thin septum
    w = np.array([vent, 1.0, 0.5 + 0.5 * vent])
    path = [([2.5, 34, 8], [3.5, 4, 5]), ([1.5, 22, 12], [6, 6, 7]), ([1.5, 4, 15], [8, 6, 6]),
            ([2, -14, 16], [8, 6, 5.5]), ([4, -30, 15], [8, 6, 6]), ([14, -42, 9], [8, 6, 8]),
            ([17, -57, 5], [4, 7, 3.5]), ([16, -70, 4], [1.5, 3, 1.5])]
    temporal = [([24, -42, 9], [7, 6, 7]), ([30, -30, -5], [3.5, 5, 3.5]), ([32, -15, -14], [2.5, 5, 2.5]),
                ([30, -3, -20], [1.5, 3, 1.5])]
    sides = [(place([s * (c[0] + r[0] * vent), c[1], c[2]]), np.array(r) * w * size) for c, r in path]
    temp = [(place([s * c[0], c[1], c[2]]), np.array(r) * w * size) for c, r in temporal]
    return _chain(sides) + _chain(temp)


# -- cerebellum, brainstem, 4th ventricle -----------------------------------------------------
def _brainstem_distance(p):
    """Signed distance (mm) to the brainstem, and where it lies below the diencephalon (0..1):
    the midbrain merges upwards into it."""
    stem = _chain([(p.place(c), np.array(r, np.float32) * p.size) for c, r in [
        ([0, -20, -4], [12, 11, 8]), ([0, -24, -18], [14, 13, 10]), ([0, -28, -32], [14, 12, 10]),
        ([0, -36, -48], [10, 10, 12]), ([0, -42, -66], [8, 8, 12]), ([0, -44, -84], [8, 8, 10])]])
    stem_dist = _union_distance(p.box, p.spacing, stem, 10.0)
    return stem_dist, _ramp(p.place([0, 0, -12])[2] - p.box.z, 4.0)


def _paint_cerebellum(rng, frac, p, cb_out):
    """Lay the cerebellum (folia: thin transverse sheets around a white-matter core) over
    `frac` on its own sub-box; returns where it is (bool, crop shape)."""
    h = p.spacing
    cb_centre, cb_axes = p.cerebellum
    sl, (xc, yc, zc) = p.box.sub(h, cb_centre - cb_axes - 2 * h, cb_centre + cb_axes + 2 * h)
    _, cb_u = _directions(xc, yc, zc, cb_centre)
    cb_depth = -cb_out[sl]
    folia = _Noise(rng, [-30] * 3, [30] * 3, [12.0, 1.5, 1.5])(*(25.0 * c for c in cb_u))
    cb_sulci = np.hypot(_sheet_distance(folia, h), np.maximum(cb_depth - 8.0, 0.0))
    cb_frac, _ = _cortex(cb_depth, cb_sulci, p.t_ext, 0.3, 1.4, h)
    cb_outer = _ramp(cb_depth, h)
    for k in TISSUES:
        frac[k][sl] = frac[k][sl] * (1.0 - cb_outer) + cb_outer * cb_frac.get(k, 0.0)
    infra = np.zeros(p.box.shape, bool)
    infra[sl] = cb_outer > 0.5
    return infra


def _paint_brainstem(frac, p, stem_dist, below_diencephalon):
    """Lay the brainstem (WM with some grey nuclei) and its CSF over `frac`; returns where it is."""
    stem_tissue = _ramp(-stem_dist, p.spacing)
    _paint(frac, _ramp(-(stem_dist - p.t_ext), p.spacing) * below_diencephalon, {"csf": 1.0})
    _paint(frac, stem_tissue, {"wm": 0.75, "deep": 0.25})
    return stem_tissue * below_diencephalon > 0.5


def _paint_fourth_ventricle(frac, p):
    fourth = _ellipsoid_distance(p.box.x, p.box.y, p.box.z, p.place([0, -46, -30]), np.array([5.0, 3.5, 7.0]) * p.size)
    _paint(frac, _ramp(-fourth, p.spacing), {"csf": 1.0})


# -- periventricular caps ---------------------------------------------------------------------
def _periventricular_caps(p, ventricles, vent_frac):
    """vent_dist, cap_tip and cap of `Anatomy`.

    The distance is computed near the ventricles only. Caps at the horn tips and a thin
    ependymal rim are bright on FLAIR in healthy brains too (not lesions).
    """
    box, h, vent, place = p.box, p.spacing, p.vent, p.place
    centres = np.array([c for c, _ in ventricles])
    sl, (xv, yv, zv) = box.sub(h, centres.min(0) - 30, centres.max(0) + 30)
    vent_dist = np.full(box.shape, 99.0, np.float32)
    vent_dist[sl] = ndi.distance_transform_edt(vent_frac[sl] < 0.5, sampling=h) - 0.5 * h
    tips = [place([s * (2.5 + 3.5 * vent), 33, 8]) for s in (-1, 1)] + \
           [place([s * (16 + 1.5 * vent), -69, 4]) for s in (-1, 1)]
    cap_tip = np.zeros(box.shape, np.float32)
    for t in tips:
        cap_tip[sl] = np.maximum(cap_tip[sl], np.exp(-((xv - t[0]) ** 2 + (yv - t[1]) ** 2 + (zv - t[2]) ** 2) / (2 * 8.0 ** 2)))
    outside = np.maximum(vent_dist, 0.0)
    cap = np.clip(np.exp(-outside / 1.5) + cap_tip * np.exp(-outside / 7.0), 0, 0.95)
    cap = (cap * (vent_dist > -0.5 * h)).astype(np.float32)
    return vent_dist, cap_tip, cap


# --------------------------------------------------------------------------------------------
# 3. Lesions
# --------------------------------------------------------------------------------------------
LESION_KINDS = {   # share per region: McDonald's (Thompson et al. 2018) + deep WM, some confluent
    "periventricular": 0.40, "deep": 0.25, "juxtacortical": 0.20, "infratentorial": 0.10, "confluent": 0.05}
LESION_DIAMETER_MM = (2.1, 20.0)   # equivalent diameter clip: 5 mm3 .. 4.2 ml
LESION_LOG_SD = 0.45               # log-normal spread of the equivalent diameter


@dataclass
class Lesion:
    """One lesion followed over a subject's time points.

    centre:   mm;   rot: 3x3, columns = principal directions;   axes: semi-axes (mm) at size 1
    shape:    3x3 symmetric, smooth bumps of the surface (radius x (1 + u.shape.u))
    size:     per time point, scale of the axes (0 = not there yet)
    severity: per time point, 0..1, how far the tissue has moved from WM to lesion parameters
    """
    kind: str
    centre: np.ndarray
    rot: np.ndarray
    axes: np.ndarray
    shape: np.ndarray
    size: np.ndarray
    severity: np.ndarray

    def volume_mm3(self, t: int) -> float:
        return float(4.0 / 3.0 * np.pi * np.prod(self.axes) * self.size[t] ** 3)


def _random_rotation(rng):
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _rotation_with_first_axis(v, rng):
    """A rotation whose first column is the unit vector v (twist about v at random)."""
    a = rng.standard_normal(3)
    b = a - v * (a @ v)
    b /= np.linalg.norm(b)
    return np.stack([v, b, np.cross(v, b)], axis=1)


def plan_lesions(rng: np.random.Generator, anatomy: Anatomy, spacing: float, n_timepoints: int) -> list[Lesion]:
    """Draw one subject's lesions: where, how big, which shape, and how they evolve."""
    a = anatomy
    wm = a.frac["wm"]
    cerebrum = ~a.infra
    pools = {
        "periventricular": (wm > 0.8) & (a.vent_dist > 0) & (a.vent_dist < max(4.0, spacing)) & cerebrum,
        "deep": (wm > 0.9) & (a.vent_dist > 8) & (a.wm_depth > 6) & cerebrum,
        "juxtacortical": (wm > 0.8) & (a.wm_depth > 0) & (a.wm_depth < max(3.0, spacing)) & (a.vent_dist > 8) & cerebrum,
        "infratentorial": (wm > 0.8) & a.infra,
    }
    pools["confluent"] = pools["periventricular"] & (a.cap_tip > 0.3)
    fallback = np.flatnonzero(wm > 0.5)
    pools = {k: (np.flatnonzero(v) if v.any() else fallback) for k, v in pools.items()}
    grad = np.gradient(a.vent_dist, spacing)

    median_d = rng.uniform(4.0, 6.0)   # subject's lesion load: mild .. moderate
    n_new = [int(rng.integers(15, 46))] + [int(rng.poisson(1.5)) for _ in range(n_timepoints - 1)]
    kinds, p = list(LESION_KINDS), np.array(list(LESION_KINDS.values()))
    lesions = []
    for t0, count in enumerate(n_new):
        for _ in range(count):
            kind = kinds[rng.choice(len(kinds), p=p)]
            i = np.unravel_index(rng.choice(pools[kind]), a.box.shape)
            seed_point = np.array([a.box.x[i[0], 0, 0], a.box.y[0, i[1], 0], a.box.z[0, 0, i[2]]], float)
            seed_point += rng.uniform(-spacing / 2, spacing / 2, 3)
            normal = np.array([g[i] for g in grad], float)
            normal = normal / np.linalg.norm(normal) if np.linalg.norm(normal) > 1e-6 else _random_rotation(rng)[:, 0]
            size, severity = _trajectory(rng, t0, n_timepoints)
            parts = int(rng.integers(3, 6)) if kind == "confluent" else 1
            for _ in range(parts):
                if kind == "confluent":
                    d = rng.uniform(6.0, 11.0)
                else:
                    d = float(np.clip(np.exp(rng.normal(np.log(median_d), LESION_LOG_SD)), *LESION_DIAMETER_MM))
                    d = min(d, {"juxtacortical": 9.0, "infratentorial": 12.0}.get(kind, d))
                if kind in ("periventricular", "confluent"):
                    # ovoids with the long axis perpendicular to the ventricle wall (Dawson's fingers)
                    elong = rng.uniform(1.5, 3.0)
                    rot = _rotation_with_first_axis(normal, rng)
                else:
                    elong = rng.uniform(1.0, 1.6)
                    rot = _random_rotation(rng)
                squash = rng.uniform(0.85, 1.15)
                axes = d / 2 * np.array([elong ** (2 / 3), elong ** (-1 / 3) * squash, elong ** (-1 / 3) / squash])
                centre = seed_point.copy()
                if kind in ("periventricular", "confluent"):   # touch the wall, extend outwards
                    centre += normal * (0.6 * axes[0] - a.vent_dist[i])
                if kind == "confluent":
                    centre += rot[:, 1:] @ rng.normal(0, 4.0, 2)
                g = rng.normal(0, 0.07, (3, 3))
                lesions.append(Lesion(kind, centre, rot, axes, (g + g.T) / 2, size, severity))
    return lesions


def _trajectory(rng, t0, n_timepoints):
    """Size and severity per time point: new lesions start small and acute; old ones drift."""
    size = np.zeros(n_timepoints)
    severity = np.zeros(n_timepoints)
    base = rng.uniform(0.55, 1.0)
    drift = rng.choice([0.0, 0.08, -0.10], p=[0.7, 0.15, 0.15])   # stable, growing, shrinking
    log_size = np.log(0.75) if t0 > 0 else 0.0
    for t in range(t0, n_timepoints):
        if t > t0:
            log_size = np.clip(log_size + drift + (0.1 if t0 > 0 else 0.0) + rng.normal(0, 0.05),
                               np.log(0.4), np.log(1.5))
        size[t] = np.exp(log_size)
        severity[t] = min(1.0, base + (0.15 * 0.5 ** (t - t0) if t0 > 0 else 0.0))
    return size, severity


def _lesion_surface(lesion, t, x, y, z):
    """Radial distance r and surface radius rho (mm) of `lesion` at time point t, and the direction."""
    rel = np.stack(np.broadcast_arrays(x - lesion.centre[0], y - lesion.centre[1], z - lesion.centre[2]))
    r = np.sqrt((rel * rel).sum(0)) + 1e-3
    u = rel / r
    q = np.einsum("ji,j...->i...", lesion.rot, u)
    rho = lesion.size[t] / np.sqrt(sum((q[i] / lesion.axes[i]) ** 2 for i in range(3)))
    rho *= 1.0 + np.einsum("i...,ij,j...->...", u, lesion.shape, u)
    return r, rho, u


# --------------------------------------------------------------------------------------------
# 4. Tissue parameters at 3 T: T1, T2 in ms, PD relative to CSF
# --------------------------------------------------------------------------------------------
# GM and WM lie between the 3 T measurements of Wansapura et al. 1999 (T1 1331 / 832 ms, T2
# 110 / 80 ms) and Wright et al. 2008 (T1 1607 / 838 ms). CSF: T1 about 4 s and a T2 far
# longer than BrainWeb's 1.5 T value of 329 ms. Lesions have no consensus value: T1 and T2 are
# raised over WM (a design choice).
TISSUE_PARAMS = {
    "csf": (4000.0, 1800.0, 1.00),
    "gm": (1450.0, 100.0, 0.82),
    "deep": (1250.0, 82.0, 0.78),     # thalamus / basal ganglia, between GM and WM (design choice)
    "wm": (850.0, 75.0, 0.70),
    "lesion": (1300.0, 160.0, 0.80),  # PD above WM, so lesions are bright on PDw
}
CAP_SEVERITY = 0.65  # periventricular caps/rims: extra interstitial water, part-way to a lesion


def lesion_params(wm, lesion, severity):
    """T1, T2, PD of WM turned into lesion tissue to `severity` (0..1).

    Water pools in fast exchange average their relaxation *rates* (Zimmerman & Brittin, J Phys
    Chem 61:1328, 1957), so 1/T1 and 1/T2 mix linearly; proton density mixes linearly.
    """
    mix = lambda a, b: (1 - severity) * a + severity * b
    return 1.0 / mix(1 / wm[0], 1 / lesion[0]), 1.0 / mix(1 / wm[1], 1 / lesion[1]), mix(wm[2], lesion[2])


# --------------------------------------------------------------------------------------------
# 5. Signal equations; E1 = exp(-TR/T1), E2 = exp(-TE/T2); times in ms
# --------------------------------------------------------------------------------------------
PROTOCOLS = {
    "flair": dict(TR=10000.0, TE=90.0, TI=2500.0),   # IR-FSE; CSF null: T1 ln(2/(1+E1)) = 2457 ms
    "mprage": dict(TR=2300.0, TI=900.0, flip_deg=9.0, echo_spacing=7.0, echoes=176),
    "pd": dict(TR=4500.0, TE=11.0),
    "t2": dict(TR=4500.0, TE=90.0),
}


def signal(channel: str, T1, T2, PD):
    """Magnitude signal of tissue (T1, T2 in ms; PD relative) under `channel`'s protocol."""
    p = PROTOCOLS[channel]
    if channel in ("pd", "t2"):     # fast spin echo
        return PD * (1 - np.exp(-p["TR"] / T1)) * np.exp(-p["TE"] / T2)
    if channel == "flair":          # inversion recovery FSE, magnitude
        return PD * np.abs(1 - 2 * np.exp(-p["TI"] / T1) + np.exp(-p["TR"] / T1)) * np.exp(-p["TE"] / T2)
    # MPRAGE (Deichmann et al. 2000): inversion, free recovery TA, a train of N small flips
    # (spacing tau) centred at TI, free recovery TD; steady state solved in closed form; signal
    # at the central echo
    n, tau = p["echoes"], p["echo_spacing"]
    ca, sa = np.cos(np.radians(p["flip_deg"])), np.sin(np.radians(p["flip_deg"]))
    e_tau = np.exp(-tau / T1)
    q = ca * e_tau
    m_inf = (1 - e_tau) / (1 - q)
    e_a = np.exp(-(p["TI"] - n * tau / 2) / T1)
    e_d = np.exp(-(p["TR"] - p["TI"] - n * tau / 2) / T1)
    qn = q ** n
    m_ss = (1 - e_d + e_d * m_inf * (1 - qn) + e_d * qn * (1 - e_a)) / (1 + e_d * e_a * qn)
    m_a = 1 - (1 + m_ss) * e_a
    return PD * sa * np.abs(m_inf + (m_a - m_inf) * q ** (n / 2))


# --------------------------------------------------------------------------------------------
# 6. Artefacts and scanner units
# --------------------------------------------------------------------------------------------
# Gaussian blur sigma (mm, per axis): T2/PD/FLAIR were acquired with 3 mm axial slices
# (Carass et al. 2017; FWHM 3 mm -> sigma 1.27 mm along z); MPRAGE is ~1 mm isotropic.
BLUR_MM = {"flair": (0.5, 0.5, 1.27), "mprage": (0.45, 0.45, 0.45), "pd": (0.5, 0.5, 1.27), "t2": (0.5, 0.5, 1.27)}
# Rician noise sigma as a fraction of a reference tissue's mean (BrainWeb: WM for T1-weighted,
# CSF for T2/PD); drawn per scan within +-25 %
NOISE = {"flair": ("wm", 0.03), "mprage": ("wm", 0.025), "pd": ("csf", 0.025), "t2": ("csf", 0.025)}
BIAS_LOG_SD = 0.045      # smooth multiplicative field ~0.9..1.1 over the brain (BrainWeb's INU 20 %)
WM_UNITS = {"flair": 700.0, "mprage": 1.8e5, "pd": 800.0, "t2": 250.0}   # arbitrary scanner units


def _blur(img, channel, spacing):
    for axis, s in enumerate(BLUR_MM[channel]):
        if s / spacing >= 0.25:
            ndi.gaussian_filter1d(img, s / spacing, axis=axis, truncate=3.0, output=img)
    return img


def _bias_field(coef, shape):
    """exp(sum of low-frequency cosines), separable, so cheap at any size."""
    basis = [np.cos(np.pi * np.arange(coef.shape[i])[None, :] * (np.arange(n)[:, None] + 0.5) / n).astype(np.float32)
             for i, n in enumerate(shape)]
    field = np.tensordot(basis[2], coef.astype(np.float32), axes=(1, 2))            # z, a, b
    field = np.tensordot(basis[1], field, axes=(1, 2))                              # y, z, a
    field = np.tensordot(basis[0], field, axes=(1, 2))                              # x, y, z
    return np.exp(field)


def _bias_coefficients(rng, order=3):
    k = np.add.outer(np.add.outer(np.arange(order + 1), np.arange(order + 1)), np.arange(order + 1))
    coef = rng.standard_normal(k.shape) / (1.0 + k) ** 1.5
    coef[0, 0, 0] = 0.0
    return coef * BIAS_LOG_SD / np.sqrt((coef ** 2).sum() / 8)   # cos^2 averages 1/2 per axis


def _rician(img, sigma, rng):
    real = img + rng.standard_normal(img.shape, dtype=np.float32) * sigma
    imag = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.sqrt(real * real + imag * imag)


# --------------------------------------------------------------------------------------------
# 7. Subjects, scans and the two raters
# --------------------------------------------------------------------------------------------
RATER_OFFSET_MM = (0.3, -0.3)    # rater 1 outlines generously, rater 2 tightly
RATER_JITTER = 0.12              # relative, smooth, per lesion and scan: borders differ


@dataclass
class Subject:
    """One simulated subject: anatomy, lesion plan and what stays fixed over its time points."""
    seed: int
    index: int
    spacing: float
    n_timepoints: int
    anatomy: Anatomy
    lesions: list
    tissue: dict        # tissue -> (T1, T2, PD), jittered per subject
    base: dict          # file tag -> blurred lesion-free signal on the crop
    bias: dict          # file tag -> subject's bias-field coefficients


@dataclass
class SyntheticScan:
    """One simulated time point on the full grid. images: file tag -> float32 (scanner units,
    0 outside the brain); masks: (rater 1, rater 2) uint8 {0, 1}; lesion: float32 fraction of
    lesion tissue; labels (with_labels only): uint8 index into TISSUE_CLASSES of each voxel's
    largest fraction."""
    images: dict
    masks: tuple
    lesion: np.ndarray
    labels: np.ndarray | None = None


# the classes of SyntheticScan.labels: TISSUES with the WM compartment split into plain WM,
# periventricular cap tissue and lesion
TISSUE_CLASSES = ("background", "csf", "gm", "deep", "wm", "cap", "lesion")


def make_subject(seed: int = 0, subject: int = 1, spacing: float = 1.0, timepoints: int = 4) -> Subject:
    """Anatomy and lesion plan of subject `subject` (1-based), deterministic in (seed, subject)."""
    seed, spacing = _check_seed(seed), _check_spacing(spacing)
    if int(timepoints) < 1:
        raise ValueError(f"timepoints must be >= 1, got {timepoints!r}")
    rng = np.random.default_rng([seed, int(subject)])
    anatomy = make_anatomy(rng, spacing)
    lesions = plan_lesions(rng, anatomy, spacing, int(timepoints))
    tissue = {k: tuple(v * (1 + 0.03 * rng.standard_normal(3))) for k, v in TISSUE_PARAMS.items()}
    tissue["cap"] = lesion_params(tissue["wm"], tissue["lesion"], CAP_SEVERITY)
    f, cap = anatomy.frac, anatomy.cap
    base, bias = {}, {}
    for ch in FILE_TAGS:
        s = {k: np.float32(signal(ch, *tissue[k])) for k in ("csf", "gm", "deep", "wm", "cap")}
        # cap/rim tissue is a share of the WM compartment
        img = s["csf"] * f["csf"] + s["gm"] * f["gm"] + s["deep"] * f["deep"] + f["wm"] * (s["wm"] + cap * (s["cap"] - s["wm"]))
        base[ch] = _blur(img, ch, spacing)   # blur is linear: lesions are added already blurred
        bias[ch] = _bias_coefficients(rng)
    return Subject(seed, int(subject), spacing, int(timepoints), anatomy, lesions, tissue, base, bias)


def make_scan(subj: Subject, timepoint: int, with_labels: bool = False) -> SyntheticScan:
    """Time point `timepoint` (1-based) of a subject on the full grid (see `SyntheticScan`)."""
    images, masks, lesion = _simulate(subj, timepoint)
    box, h = subj.anatomy.box, subj.spacing
    labels = None
    if with_labels:
        f, cap = subj.anatomy.frac, subj.anatomy.cap
        fr = [1.0 - sum(f.values()), f["csf"], f["gm"], f["deep"],
              (f["wm"] - lesion) * (1 - cap), (f["wm"] - lesion) * cap, lesion]
        labels = _to_grid(np.argmax(np.stack(fr), axis=0).astype(np.uint8), box, h)
    return SyntheticScan({ch: _to_grid(v, box, h) for ch, v in images.items()},
                         tuple(_to_grid(m.astype(np.uint8), box, h) for m in masks), _to_grid(lesion, box, h),
                         labels)


def _simulate(subj: Subject, timepoint: int):
    """One time point on the subject's crop: images (file tag -> float32), the two raters'
    masks (bool) and the lesion-tissue fraction (float32)."""
    if not isinstance(timepoint, (int, np.integer)) or not 1 <= timepoint <= subj.n_timepoints:
        raise ValueError(f"timepoint must be in 1..{subj.n_timepoints}, got {timepoint!r}")
    t = timepoint - 1
    rng = np.random.default_rng([subj.seed, subj.index, int(timepoint)])
    a, h = subj.anatomy, subj.spacing
    shape = a.box.shape

    # lesions: distance to the nearest lesion surface (truth and each rater's outline)
    dist = np.full(shape, 99.0, np.float32)
    severity = np.zeros(shape, np.float32)
    rater_dist = [np.full(shape, 99.0, np.float32) for _ in RATER_OFFSET_MM]
    for les in subj.lesions:
        if les.size[t] == 0:
            continue
        # raters overlook small and faint lesions more often
        p_miss = 0.4 * np.exp(-les.volume_mm3(t) / 25.0) + 0.1 * (1 - les.severity[t])
        seen = rng.random(2) >= p_miss
        jitter = [rng.normal(0, RATER_JITTER, (3, 3)) for _ in RATER_OFFSET_MM]
        reach = les.axes.max() * les.size[t] * 1.6 + 2 * h + 1.0
        sl, (x, y, z) = a.box.sub(h, les.centre - reach, les.centre + reach)
        if min(s.stop - s.start for s in sl) <= 0:
            continue
        r, rho, u = _lesion_surface(les, t, x, y, z)
        d = r - rho
        nearer = d < dist[sl]
        dist[sl] = np.where(nearer, d, dist[sl])
        # the core is more abnormal than the rim
        core = np.clip(-d / (0.6 * rho), 0.0, 1.0)
        severity[sl] = np.where(nearer, les.severity[t] * (0.4 + 0.6 * core), severity[sl])
        for k, (offset, b) in enumerate(zip(RATER_OFFSET_MM, jitter)):
            if seen[k]:
                rho_k = rho * (1 + np.einsum("i...,ij,j...->...", u, (b + b.T) / 2, u)) + offset
                np.minimum(rater_dist[k][sl], r - rho_k, out=rater_dist[k][sl])

    # the lesion replaces its share of the WM compartment (plain WM and cap tissue alike)
    share = _ramp(-dist, h)
    idx = np.nonzero(share)
    share_wm = share[idx] * a.frac["wm"][idx]
    cap = a.cap[idx]
    les_t1, les_t2, les_pd = lesion_params(subj.tissue["wm"], subj.tissue["lesion"], severity[idx])

    images = {}
    for ch in FILE_TAGS:
        s_les = signal(ch, les_t1, les_t2, les_pd).astype(np.float32)
        s_wm, s_cap = (np.float32(signal(ch, *subj.tissue[k])) for k in ("wm", "cap"))
        delta = np.zeros(shape, np.float32)
        delta[idx] = share_wm * ((1 - cap) * (s_les - s_wm) + cap * (s_les - s_cap))
        img = subj.base[ch] + _blur_region(delta, idx, ch, h)
        img *= _bias_field(subj.bias[ch] + 0.3 * _bias_coefficients(rng), shape)
        ref, level = NOISE[ch]
        sigma = level * rng.uniform(0.8, 1.25) * float(signal(ch, *subj.tissue[ref]))
        out = np.zeros(shape, np.float32)
        out[a.brain] = _rician(img[a.brain], sigma, rng)
        out *= WM_UNITS[ch] * rng.uniform(0.8, 1.25) / float(signal(ch, *subj.tissue["wm"]))
        images[ch] = out

    # raters outline lesion tissue they can see: not CSF, not cortex
    visible = (a.frac["wm"] > 0.3) & a.brain
    masks = tuple((d < 0) & visible for d in rater_dist)
    lesion = np.zeros(shape, np.float32)
    lesion[idx] = share_wm
    return images, masks, lesion


def _blur_region(delta, idx, channel, spacing):
    """Blur `delta`, which is zero away from the voxels `idx`, on their bounding box only."""
    if len(idx[0]) == 0:
        return delta
    pad = int(np.ceil(3 * max(BLUR_MM[channel]) / spacing)) + 1
    sl = tuple(slice(max(int(i.min()) - pad, 0), int(i.max()) + pad + 1) for i in idx)
    delta[sl] = _blur(np.ascontiguousarray(delta[sl]), channel, spacing)
    return delta


def _to_grid(crop, box, spacing):
    full = np.zeros(grid_shape(spacing), crop.dtype)
    full[box.slices] = crop
    return full


# --------------------------------------------------------------------------------------------
# 8. Writing: the ISBI 2015 layout, the cache, a preview, the CLI
# --------------------------------------------------------------------------------------------
def preview(path, seed: int = 0, spacing: float = 1.0, subject: int = 1, timepoint: int = 1) -> Path:
    """Save axial and coronal slices of the four contrasts of one scan, raters' masks outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subj = make_subject(seed, subject, spacing, timepoints=max(timepoint, 1))
    scan = make_scan(subj, timepoint)
    m1, m2 = scan.masks
    lo, hi = ORIGIN_MM, ORIGIN_MM + EXTENT_MM
    # the axial (z 0..40 mm) and coronal (y -40..10 mm) slices through the most lesion voxels
    def busiest(counts, lo_mm, hi_mm, axis):
        mm = ORIGIN_MM[axis] + spacing * np.arange(len(counts))
        return int(np.argmax(np.where((mm >= lo_mm) & (mm <= hi_mm), counts + 1, 0)))
    k_ax = busiest(m1.sum((0, 1)), 0, 40, 2)
    k_co = busiest(m1.sum((0, 2)), -40, 10, 1)
    views = [("axial", lambda v: v[:, :, k_ax], (lo[0], hi[0], lo[1], hi[1]), f"z = {lo[2] + k_ax * spacing:.0f} mm"),
             ("coronal", lambda v: v[:, k_co, :], (lo[0], hi[0], lo[2], hi[2]), f"y = {lo[1] + k_co * spacing:.0f} mm")]
    fig, axs = plt.subplots(2, 4, figsize=(16, 8.6), facecolor="black")
    for row, (name, cut, extent, where) in enumerate(views):
        for col, ch in enumerate(FILE_TAGS):
            ax = axs[row, col]
            img = scan.images[ch]
            vmax = np.percentile(img[img > 0], 99.7)
            ax.imshow(cut(img).T, origin="lower", cmap="gray", vmin=0, vmax=vmax, extent=extent)
            for m, colour in ((m1, "#ff3030"), (m2, "#30d0ff")):
                if cut(m).any():
                    ax.contour(cut(m).T, [0.5], colors=colour, linewidths=0.6, origin="lower", extent=extent)
            ax.set_title(f"{ch.upper()}  {name} {where}", color="white", fontsize=10)
            ax.axis("off")
    fig.suptitle(f"phantom v{GENERATOR_VERSION}: seed {seed}, subject {subject}, time point {timepoint}, "
                 f"{spacing:g} mm; rater 1 red, rater 2 blue (neurological view: left is left)",
                 color="white", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, facecolor="black")
    plt.close(fig)
    return path


def _check_timepoints(subjects, timepoints):
    if isinstance(subjects, bool) or not isinstance(subjects, (int, np.integer)) or not 1 <= subjects <= 99:
        raise ValueError(f"subjects must be an integer in 1..99, got {subjects!r}")
    if isinstance(timepoints, (int, np.integer)):
        timepoints = (int(timepoints),) * subjects
    timepoints = tuple(timepoints)
    if len(timepoints) < subjects:
        raise ValueError(f"timepoints needs one entry per subject ({subjects}), got {timepoints!r}")
    timepoints = timepoints[:subjects]
    if not all(isinstance(t, (int, np.integer)) and 1 <= t <= 99 for t in timepoints):
        raise ValueError(f"timepoints must be integers in 1..99, got {timepoints!r}")
    return tuple(int(t) for t in timepoints)


def _save(array, path, affine, slope=None):
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    nib.save(img, path)


def _quantise(img):
    """int16 with a float slope: what ISBI stores as float32, at half the size and compressible."""
    slope = float(img.max()) / 32000.0 or 1.0
    return np.rint(img / np.float32(slope)).astype(np.int16), slope


def generate(out_dir, seed: int = 0, spacing: float = 1.0, subjects: int = 5,
             timepoints=ISBI_TIMEPOINTS, compress: bool = False, progress: bool = True) -> Path:
    """Write `subjects` x `timepoints` scans in the ISBI 2015 training layout under `out_dir`.

    Files: training/trainingNN/preprocessed/trainingNN_TT_{flair,mprage,pd,t2}_pp.nii and
    training/trainingNN/masks/trainingNN_TT_mask{1,2}.nii (+ .gz with `compress`). Images are
    int16 with a float scale slope (scanner-like units, zeros outside the brain); masks uint8.
    `timepoints` is an int or one count per subject (the first `subjects` entries are used).
    Returns `out_dir`, the folder that holds `training/`.
    """
    seed, spacing = _check_seed(seed), _check_spacing(spacing)
    timepoints = _check_timepoints(subjects, timepoints)
    out_dir = Path(out_dir)
    affine = grid_affine(spacing)
    ext = ".nii.gz" if compress else ".nii"
    bar = tqdm(total=sum(timepoints), desc="synthetic MS scans", unit="scan", disable=not progress)
    # numpy and zlib release the GIL: write one scan while the next is simulated
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for s, n_tp in enumerate(timepoints, start=1):
            subj = make_subject(seed, s, spacing, n_tp)
            folder = out_dir / "training" / f"training{s:02d}"
            (folder / "preprocessed").mkdir(parents=True, exist_ok=True)
            (folder / "masks").mkdir(parents=True, exist_ok=True)
            for t in range(1, n_tp + 1):
                images, masks, _ = _simulate(subj, t)
                for f in pending:
                    f.result()
                stem = f"training{s:02d}_{t:02d}"
                pending = []
                for ch in FILE_TAGS:
                    data, slope = _quantise(images[ch])
                    pending.append(pool.submit(_save, _to_grid(data, subj.anatomy.box, spacing),
                                               folder / "preprocessed" / f"{stem}_{ch}_pp{ext}", affine, slope))
                for k, m in enumerate(masks, start=1):
                    pending.append(pool.submit(_save, _to_grid(m.astype(np.uint8), subj.anatomy.box, spacing),
                                               folder / "masks" / f"{stem}_mask{k}{ext}", affine))
                bar.update(1)
        for f in pending:
            f.result()
    bar.close()
    # Marks the folder as synthetic, so that results on it are never reported as ISBI 2015's.
    info = dict(generator="phantom.py", version=GENERATOR_VERSION, seed=seed, spacing_mm=spacing,
                subjects=subjects, timepoints=list(timepoints))
    (out_dir / "phantom.json").write_text(json.dumps(info, indent=1) + "\n")
    return out_dir


def default_cache_root() -> Path:
    """$RESUNET_CACHE if set, else ~/.cache/resunet3d-ms."""
    return Path(os.environ.get("RESUNET_CACHE") or Path.home() / ".cache" / "resunet3d-ms")


_CACHE_STEM = "isbi2015-synthetic"


def _partial_mark() -> str:
    """Infix of this host's temporary cache folders: <final name>.partial-<host>-<pid>-<random>.

    The host is part of the name because a cache folder may be shared between machines, and a
    pid only says something on the machine that owns it."""
    return f".partial-{socket.gethostname()}-"


def _remove_dead_partials(root: Path) -> None:
    """Remove the temporary folders in `root` of generations that died without cleaning up
    (SIGKILL, out of memory, power loss): those made on this host by a process that is gone.

    A concurrent generator's folder stays, and so does one whose pid has been reused since
    (taken as alive). Only POSIX can ask whether a pid lives without touching the process
    (on Windows os.kill terminates it), so elsewhere nothing is removed.
    """
    if os.name != "posix":
        return
    mark = _partial_mark()
    for path in root.glob(f"{_CACHE_STEM}-*.partial-*"):
        _, found, rest = path.name.partition(mark)
        pid = rest.partition("-")[0]
        if found and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)   # ignore: a concurrent call may remove it first


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)   # signal 0 delivers nothing: it only asks whether the pid exists
    except ProcessLookupError:
        return False
    except PermissionError:   # it exists, owned by another user
        return True
    return True


def ensure_cached(cache_dir=None, seed: int = 0, spacing: float = 1.0, progress: bool = True) -> Path:
    """The built-in dataset (21 scans, ISBI 2015 layout, .nii.gz): generated once, then reused.

    Lives in `cache_dir` (default `default_cache_root()`) under a folder keyed by seed, spacing
    and GENERATOR_VERSION. It is generated into a temporary sibling and renamed into place at
    the end, so an interrupted run never leaves a folder that looks complete; the temporary
    folders of killed runs are removed by the next call. Returns the folder that holds
    `training/`.
    """
    seed, spacing = _check_seed(seed), _check_spacing(spacing)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / f"{_CACHE_STEM}-v{GENERATOR_VERSION}-seed{seed}-{spacing:g}mm"
    _remove_dead_partials(root)
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    n = sum(ISBI_TIMEPOINTS)
    print(f"Generating the built-in synthetic MS dataset ({n} scans, {spacing:g} mm) into {final} once; "
          f"later runs reuse it", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}{_partial_mark()}{os.getpid()}-", dir=root))
    try:
        generate(tmp, seed=seed, spacing=spacing, compress=True, progress=progress)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():   # a concurrent run finished first: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def parser() -> argparse.ArgumentParser:
    """The command line of ``python phantom.py`` (tests/test_docs.py checks the documents' flags against it)."""
    p = argparse.ArgumentParser(description="Synthetic longitudinal MS-lesion MRI in the ISBI 2015 training layout.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", metavar="DIR", help="write the dataset under DIR/training/")
    what.add_argument("--preview", metavar="PNG", help="save axial and coronal slices of one scan")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--spacing", type=float, default=1.0, metavar="MM",
                   help=f"isotropic voxel size in mm, {SPACING_RANGE_MM[0]}..{SPACING_RANGE_MM[1]} (default 1)")
    p.add_argument("--subjects", type=int, default=len(ISBI_TIMEPOINTS),
                   help="number of subjects (default 5, with ISBI's 4,4,5,4,4 time points; beyond 5: 4 each)")
    p.add_argument("--compress", action="store_true", help="write .nii.gz instead of .nii")
    return p


def main(argv=None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    try:
        if args.preview:
            path = preview(args.preview, seed=args.seed, spacing=args.spacing)
        else:
            timepoints = ISBI_TIMEPOINTS if args.subjects <= len(ISBI_TIMEPOINTS) else 4
            path = generate(args.out, seed=args.seed, spacing=args.spacing, subjects=args.subjects,
                            timepoints=timepoints, compress=args.compress)
    except ValueError as err:
        cli.error(str(err))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
