"""Properties of augment.py, and parity with TorchIO 1.2.1's deterministic transforms.

Volumes are small (8 to 48 voxels a side). Spatial tests use cubes of 17 (n - 1 a power of two)
where exactness is asserted: there grid_sample's normalised coordinates are exact in binary, so
a map that lands on voxels reproduces them bit for bit; elsewhere results agree to float32
rounding. Parity tolerances (float32 data in [0, 1)): max |ours - TorchIO| <= 1e-5 and mean
<= 1e-6 for Affine, ElasticDeformation, Motion and BiasField (relative for BiasField, whose gain
reaches e^±10); labels and Flip exact; Noise in distribution.
"""

import shutil
import warnings

import numpy as np
import pytest
import torch

import augment as A

ATOL, MEAN_ATOL = 1e-5, 1e-6

# TorchIO's default 7.5 mm elastic displacement may fold the grid of these small volumes, and
# says so, as ours does (tested below); the warning is expected here.
pytestmark = pytest.mark.filterwarnings('ignore:The maximum displacement is larger:RuntimeWarning')


def generator(seed=0, device='cpu'):
    return torch.Generator(device=device).manual_seed(seed)


def volume(*shape, seed=0):
    return torch.rand(*shape, generator=generator(seed))


def binary(*shape, seed=1):
    return (volume(*shape, seed=seed) > 0.7).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Properties

@pytest.mark.parametrize('transform, exact', [
    (A.Flip(axes=()), True),
    (A.BiasField([0.0] * 20, order=3), True),
    (A.Noise(mean=0.0, std=0.0), True),
    (A.Affine(scales=1, degrees=0, translation=0), True),
    (A.Motion(degrees=np.zeros((2, 3)), translation=np.zeros((2, 3)), times=[0.3, 0.62]), False),
    (A.ElasticDeformation(np.zeros((7, 7, 7, 3))), False),
])
def test_identity_parameters_give_the_input_back(transform, exact):
    x = volume(2, 1, 17, 17, 17)
    out, _ = transform(x)
    if exact:
        assert torch.equal(out, x)
    else:  # FFT round trip / spline partition of unity: float32 rounding
        torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_flip_twice_is_the_identity():
    x, y = volume(2, 2, 9, 8, 7), binary(2, 1, 9, 8, 7)
    flip = A.Flip(axes=(0, 1, 2))
    once = flip(x, y)
    assert not torch.equal(once[0], x)
    twice = flip(*once)
    assert torch.equal(twice[0], x) and torch.equal(twice[1], y) and twice[1].dtype == torch.uint8


@pytest.mark.parametrize('degrees, dims', [((90, 0, 0), (2, 3)), ((0, 90, 0), (3, 1)), ((0, 0, 90), (1, 2))])
def test_affine_right_angle_equals_rot90_exactly(degrees, dims):
    x = volume(1, 17, 17, 17)
    assert torch.equal(A.Affine(scales=1, degrees=degrees, translation=0)(x)[0], torch.rot90(x, 1, dims))


@pytest.mark.parametrize('inside_test', ['bounds', 'lookup'])
@pytest.mark.parametrize('axis', [0, 2])
def test_half_voxel_shift_keeps_the_rim_and_rounds_labels_half_up(axis, inside_test, monkeypatch):
    """ITK at exact ties: a shift of +1/2 voxel leaves the first voxel inside (the half-voxel rim,
    edge-clamped) and the labels in place (nearest rounds half up); one of -1/2 moves the labels
    by one voxel and sends the last voxel outside (the half-open bound). On both inside tests
    (the CPU's comparisons, the GPU's lookup, here on the CPU), on a cube of 17 where the ties
    are exact in float32."""
    if inside_test == 'lookup':
        monkeypatch.setattr(A, '_inside_by_bounds', A._inside_by_lookup)
    x, y = volume(1, 17, 17, 17), binary(1, 17, 17, 17).float()
    moved = lambda t, i: t.narrow(1 + axis, i, 16)
    translation = [0, 0, 0]
    translation[axis] = 0.5
    out, out_label = A.Affine(scales=1, degrees=0, translation=translation)(x, y)
    torch.testing.assert_close(moved(out, 1), (moved(x, 0) + moved(x, 1)) / 2, atol=1e-6, rtol=0)
    assert torch.equal(out.select(1 + axis, 0), x.select(1 + axis, 0))
    assert torch.equal(out_label, y)
    translation[axis] = -0.5
    out, out_label = A.Affine(scales=1, degrees=0, translation=translation)(x, y)
    assert torch.all(out.select(1 + axis, -1) == x.min())
    assert torch.equal(moved(out_label, 0), moved(y, 1)) and torch.all(out_label.select(1 + axis, -1) == 0)


@pytest.mark.parametrize('component, shift', [(0, (1, 0, 0)), (1, (0, 1, 0)), (2, (0, 0, -1))])
def test_elastic_constant_displacement_is_a_shift(component, shift):
    x = volume(1, 17, 17, 17)
    control_points = np.zeros((7, 7, 7, 3))
    control_points[..., component] = 1.0  # 1 mm in TorchIO's LPS convention, everywhere
    out = A.ElasticDeformation(control_points)(x)[0]
    expected = torch.roll(x, shift, dims=(1, 2, 3))
    axis = 1 + shift.index(next(s for s in shift if s))
    edge = 0 if sum(shift) > 0 else -1  # the slab that came from outside gets the minimum
    inner = [slice(None)] * 4
    inner[axis] = slice(1, None) if edge == 0 else slice(None, -1)
    torch.testing.assert_close(out[tuple(inner)], expected[tuple(inner)], atol=1e-5, rtol=0)
    assert torch.all(out.select(axis, edge) == x.min())


def test_noise_has_the_asked_mean_and_std():
    n = 48 ** 3
    out, _ = A.Noise(mean=0.3, std=0.5)(torch.zeros(1, 1, 48, 48, 48), generator=generator())
    # within 4 standard errors: 0.5 / sqrt(n) for the mean, 0.5 / sqrt(2 n) for the std
    assert abs(out.mean().item() - 0.3) < 4 * 0.5 / n ** 0.5
    assert abs(out.std().item() - 0.5) < 4 * 0.5 / (2 * n) ** 0.5


def test_bias_field_is_exp_of_the_polynomial_in_spec_order():
    order_in_spec = '000 001 002 003 010 011 012 020 021 030 100 101 102 110 111 120 200 201 210 300'
    coefficients = torch.linspace(-0.5, 0.5, 20, dtype=torch.float64)
    x = torch.ones(1, 9, 8, 7)
    axes = torch.meshgrid(*(torch.linspace(-1, 1, n, dtype=torch.float64) for n in x.shape[1:]), indexing='ij')
    log_field = sum(c * axes[0] ** int(e[0]) * axes[1] ** int(e[1]) * axes[2] ** int(e[2])
                    for c, e in zip(coefficients, order_in_spec.split()))
    out = A.BiasField(coefficients.tolist(), order=3)(x)[0]
    torch.testing.assert_close(out[0].double(), log_field.exp(), rtol=1e-6, atol=0)


def test_motion_with_no_motion_is_the_identity():
    x = volume(1, 16, 12, 10)
    out = A.Motion(degrees=np.zeros((3, 3)), translation=np.zeros((3, 3)), times=[0.2, 0.5, 0.7])(x)[0]
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    # and any motion before time 0 leaves only the original spectrum (spec M2)
    moved = A.Motion(degrees=[[5, -3, 8]], translation=[[1, -2, 0.5]], times=[0.0])(x)[0]
    torch.testing.assert_close(moved, x, atol=1e-5, rtol=0)


def test_labels_stay_binary_and_aligned_after_spatial_transforms():
    label = binary(3, 1, 17, 17, 17)
    image = label.float()  # the image is the label: nearest interpolation must move both alike
    spatial = A.Compose([A.RandomFlip(axes=(0, 1, 2)),
                         A.RandomAffine(degrees=20, translation=2, image_interpolation='nearest'),
                         A.RandomElasticDeformation(image_interpolation='nearest')])
    out_image, out_label = spatial(image, label, generator=generator())
    assert out_label.dtype == torch.uint8 and set(out_label.unique().tolist()) <= {0, 1}
    assert not torch.equal(out_label, label)
    assert torch.equal(out_image, out_label.float())


def test_batch_elements_get_different_parameters():
    x = volume(1, 1, 16, 16, 16).expand(4, 1, 16, 16, 16)
    for transform in (A.RandomMotion(), A.RandomBiasField(), A.RandomNoise(), A.RandomAffine(),
                      A.RandomElasticDeformation()):
        out, _ = transform(x, generator=generator())
        assert all(not torch.allclose(out[0], out[i]) for i in range(1, 4)), type(transform).__name__


def test_probability_is_drawn_per_batch_element():
    x = volume(64, 1, 8, 8, 8)
    out, _ = A.RandomNoise(std=(0.1, 0.2), p=0.5)(x, generator=generator())
    unchanged = (out == x).flatten(1).all(1)
    assert 16 < unchanged.sum() < 48


def test_same_seed_same_output():
    x, y = volume(2, 1, 16, 16, 16), binary(2, 1, 16, 16, 16)
    pipeline = A.paper_augmentation(p=0.7)
    first, second, other = (pipeline(x, y, generator=generator(seed)) for seed in (3, 3, 4))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_generator_must_be_a_cpu_generator():
    with pytest.raises(ValueError, match='generator'):
        A.RandomNoise()(torch.zeros(1, 8, 8, 8), generator=np.random.default_rng(0))


@pytest.mark.parametrize('p', [0.2, 0.9])
def test_a_call_takes_the_same_numbers_from_the_generator_whatever_it_decides(p):
    """Every element's parameters are drawn whatever its decision, so the stream after a call
    depends on the batch size only, not on p (below 1) or on which elements were transformed."""
    x, y = volume(4, 2, 12, 12, 12), binary(4, 1, 12, 12, 12)
    g, reference = generator(7), generator(7)
    A.paper_augmentation(p=p)(x, y, generator=g)
    A.paper_augmentation(p=0.5).plan(4, 2, (12, 12, 12), reference)
    assert torch.equal(g.get_state(), reference.get_state())


def test_skipped_elements_change_nothing_for_the_others():
    """Real skipping: an element goes through the same arithmetic whether its neighbours in the
    batch were chosen or not, and an element not chosen comes back as it was."""
    x, y = volume(3, 2, 16, 16, 16), binary(3, 1, 16, 16, 16)
    pipeline = A.paper_augmentation(p=0.5)
    chosen, params = pipeline.plan(3, 2, (16, 16, 16), generator(11))
    everything = pipeline.run(x, y, (torch.ones(3, dtype=torch.bool), params))
    some = pipeline.run(x, y, (torch.tensor([True, False, True]), params))
    for element in (0, 2):
        torch.testing.assert_close(some[0][element], everything[0][element], atol=1e-6, rtol=0)
        assert torch.equal(some[1][element], everything[1][element])
    assert torch.equal(some[0][1], x[1]) and torch.equal(some[1][1], y[1])


def test_below_p_one_the_caller_tensors_stay_and_steps_write_back_into_their_own():
    """Compose writes a step's chosen elements back in place into what earlier steps wrote, never
    into the caller's tensors: the result is that of the steps called one by one, each into a
    copy, and the inputs are unchanged. An intensity transform gives the label back as it came."""
    x, y = volume(4, 2, 12, 12, 12), binary(4, 1, 12, 12, 12)
    x_before, y_before = x.clone(), y.clone()
    pipeline = A.paper_augmentation(p=0.5)
    plan = pipeline.plan(4, 2, (12, 12, 12), generator(5))
    together = pipeline.run(x, y, plan)
    image, label = x, y
    for transform, step in zip(pipeline.transforms, plan[1]):
        image, label = transform.run(image, label, step)
    assert torch.equal(together[0], image) and torch.equal(together[1], label)
    # the noise writes a new image but leaves the caller's label, which the affine must not write into
    A.Compose([A.RandomNoise(), A.RandomAffine(p=0.5)])(x, y, generator=generator(1))
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    chosen = torch.tensor([True, False, True, False])
    for intensity in (A.RandomMotion(), A.RandomBiasField(), A.RandomNoise(), A.ZNormalization()):
        out, out_label = intensity.run(x, y, (chosen, intensity.plan(4, 2, (12, 12, 12), generator())[1]))
        assert out_label is y and torch.equal(out[1], x[1]) and not torch.equal(out[0], x[0])


def test_znormalization_per_element_mask_follows_its_element_below_p_one():
    x = volume(4, 1, 8, 8, 8)
    mask = volume(4, 1, 8, 8, 8, seed=3) > 0.3
    every = A.ZNormalization(masking_method=mask)(x)[0]
    out = A.ZNormalization(masking_method=mask, p=0.5)(x, generator=generator(4))[0]
    chosen = (out != x).flatten(1).any(1)
    assert 0 < chosen.sum() < 4
    assert torch.equal(out[chosen], every[chosen]) and torch.equal(out[~chosen], x[~chosen])
    with pytest.raises(ValueError, match='masking_method has 4 batch elements, the image 3'):
        A.ZNormalization(masking_method=mask)(x[:3])


@pytest.mark.parametrize('transform', [
    A.RandomFlip(flip_probability=1.0), A.RandomMotion(), A.RandomBiasField(), A.RandomNoise(),
    A.RandomAffine(), A.RandomElasticDeformation()], ids=lambda t: type(t).__name__)
def test_channels_share_one_draw(transform):
    """TorchIO applies one parameter draw to all channels of an image: identical channels stay
    identical (noise aside, independent per voxel and channel), and a two-channel call equals
    each channel transformed alone with the same draw."""
    x, y = volume(2, 1, 16, 16, 16), binary(2, 1, 16, 16, 16)
    other = volume(2, 1, 16, 16, 16, seed=5) * 3 - 1
    both = transform(torch.cat([x, x], 1), y, generator=generator(2))
    if isinstance(transform, A.RandomNoise):
        residual = both[0] - torch.cat([x, x], 1)
        assert not torch.equal(residual[:, 0], residual[:, 1])
        torch.testing.assert_close(residual[:, 0].std((1, 2, 3)), residual[:, 1].std((1, 2, 3)), atol=0.01, rtol=0)
        return
    assert torch.equal(both[0][:, 0], both[0][:, 1])
    pair = transform(torch.cat([x, other], 1), y, generator=generator(2))
    for channel, alone in enumerate((x, other)):
        single = transform(alone, y, generator=generator(2))
        torch.testing.assert_close(pair[0][:, channel:channel + 1], single[0], atol=1e-5, rtol=0)
        assert torch.equal(pair[1], single[1])


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_kept(dtype):
    x, y = volume(1, 1, 16, 16, 16).to(dtype), binary(1, 1, 16, 16, 16).bool()
    out, out_label = A.paper_augmentation(p=1.0)(x, y, generator=generator())
    assert out.dtype == dtype and out_label.dtype == torch.bool and torch.isfinite(out.float()).all()


def test_compose_with_p_zero_is_the_identity():
    x = volume(2, 1, 8, 8, 8)
    out, _ = A.Compose([A.RandomNoise(), A.RandomAffine()], p=0.0)(x, generator=generator())
    assert out is x


def test_paper_augmentation_is_the_six_transforms_in_order():
    pipeline = A.paper_augmentation()
    assert [type(t) for t in pipeline.transforms] == [
        A.RandomFlip, A.RandomMotion, A.RandomBiasField, A.RandomNoise, A.RandomAffine,
        A.RandomElasticDeformation]
    assert all(t.p == 0.5 for t in pipeline.transforms)


def test_znormalization_per_element_and_masked():
    x = volume(2, 2, 8, 8, 8) * torch.tensor([1.0, 10.0]).view(2, 1, 1, 1, 1)
    out, _ = A.ZNormalization()(x)
    torch.testing.assert_close(out.flatten(1).mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.flatten(1).std(1), torch.ones(2), atol=1e-6, rtol=0)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[2:6] = True
    masked, _ = A.ZNormalization(masking_method=mask)(x)
    inside = masked[:, :, 2:6].flatten(1)
    torch.testing.assert_close(inside.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(inside.std(1), torch.ones(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize('call, name', [
    (lambda: A.RandomNoise()(torch.zeros(8, 8, 8)), 'image'),
    (lambda: A.RandomNoise()(torch.zeros(1, 8, 8, 8, dtype=torch.int64)), 'image'),
    (lambda: A.RandomAffine()(torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 8, 7)), 'label'),
    (lambda: A.Noise(mean=0, std=-1), 'std'),
    (lambda: A.RandomNoise(std=(-0.1, 0.2)), 'std'),
    (lambda: A.RandomMotion(degrees=(5, -5)), 'degrees'),
    (lambda: A.RandomAffine(scales=(1, 2, 3, 4)), 'scales'),
    (lambda: A.RandomAffine(scales=(0.5, 0.5, 0.5), isotropic=True), 'scales'),
    (lambda: A.Affine(scales=0, degrees=0, translation=0), 'scales'),
    (lambda: A.RandomElasticDeformation(num_control_points=3), 'num_control_points'),
    (lambda: A.RandomElasticDeformation(num_control_points=4, locked_borders=2), 'locked_borders'),
    (lambda: A.RandomFlip(axes=3), 'axes'),
    (lambda: A.RandomBiasField(p=1.5), 'p'),
    (lambda: A.BiasField([0.0] * 19, order=3), 'coefficients'),
    (lambda: A.Motion(degrees=np.zeros((2, 3)), translation=np.zeros((3, 3)), times=[0.3, 0.6]), 'translation'),
    (lambda: A.RandomAffine(spacing=(1, 0, 1)), 'spacing'),
])
def test_bad_input_raises_a_value_error_naming_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cpu_and_cuda_agree():
    x, y = volume(2, 1, 17, 16, 15), binary(2, 1, 17, 16, 15)
    cp = np.random.default_rng(0).uniform(-2, 2, (2, 7, 7, 7, 3))
    for transform in (A.Flip(axes=(0, 2)), A.BiasField(np.linspace(-0.5, 0.5, 20).tolist()),
                      A.Affine(scales=(0.9, 1.1, 1.05), degrees=(10, -5, 7), translation=(1, -2, 0.5)),
                      A.ElasticDeformation(cp, spacing=(1, 1.2, 0.8)),
                      A.Motion(degrees=[[5, -3, 8], [0, 2, -4]], translation=[[1, -2, .5], [.3, 0, -1]],
                               times=[0.3, 0.62]),
                      A.ZNormalization()):
        cpu = transform(x, y)
        cuda = transform(x.cuda(), y.cuda())
        torch.testing.assert_close(cuda[0].cpu(), cpu[0], atol=1e-5, rtol=0)
        assert (cuda[1].cpu() != cpu[1]).float().mean() < 1e-3  # nearest may differ at ties
    pipeline = A.paper_augmentation(p=0.5)
    first = pipeline(x.cuda(), y.cuda(), generator=generator(5))  # a CPU generator, whatever the device
    second = pipeline(x.cuda(), y.cuda(), generator=generator(5))
    assert first[0].is_cuda and torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # Parameters come from the host: without noise (drawn on the device), CPU and CUDA agree.
    spatial = A.Compose([t for t in pipeline.transforms if not isinstance(t, A.RandomNoise)])
    cpu, cuda = spatial(x, y, generator=generator(6)), spatial(x.cuda(), y.cuda(), generator=generator(6))
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Parity with TorchIO 1.2.1 (deterministic classes, same parameters)

def assert_parity(ours, theirs, atol=ATOL, mean_atol=MEAN_ATOL):
    difference = (ours.double() - theirs.double()).abs()
    assert difference.max() <= atol and difference.mean() <= mean_atol, (difference.max(), difference.mean())


@pytest.fixture
def tio():
    return pytest.importorskip('torchio')


def subject(tio, image, label=None, spacing=(1, 1, 1), origin=(0, 0, 0)):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    images = {'image': tio.ScalarImage(tensor=image, affine=affine)}
    if label is not None:
        images['label'] = tio.LabelMap(tensor=label, affine=affine)
    return tio.Subject(**images)


@pytest.mark.parametrize('value', [0.2, (0.7, 1.3), (0.1, 0.2, 0.3), (0.8, 1.2, 0.9, 1.1, 1.0, 1.5)])
def test_range_forms_match_torchio(tio, value):
    flat = lambda ranges: tuple(bound for pair in ranges for bound in pair)
    assert flat(A.RandomAffine(scales=value).scales) == pytest.approx(tio.RandomAffine(scales=value).scales)
    assert flat(A.RandomAffine(degrees=value).degrees) == pytest.approx(tio.RandomAffine(degrees=value).degrees)
    assert flat(A.RandomAffine(translation=value).translation) == pytest.approx(
        tio.RandomAffine(translation=value).translation)
    if len(np.atleast_1d(value)) <= 2:
        assert A.RandomMotion(degrees=value).degrees_range == tio.RandomMotion(degrees=value).degrees_range
        assert A.RandomNoise(std=value).std_range == tio.RandomNoise(std=value).std_range
        assert A.RandomNoise(mean=value).mean_range == tio.RandomNoise(mean=value).mean_range
        assert (A.RandomBiasField(coefficients=value).coefficients_range
                == tio.RandomBiasField(coefficients=value).coefficients_range)


def test_flip_matches_torchio(tio):
    x, y = volume(2, 9, 8, 7), binary(1, 9, 8, 7)
    theirs = tio.Flip(axes=(0, 2))(subject(tio, x, y))
    ours = A.Flip(axes=(0, 2))(x, y)
    assert torch.equal(ours[0], theirs.image.data) and torch.equal(ours[1], theirs.label.data)


@pytest.mark.parametrize('spacing', [(1, 1, 1), (2, 1.5, 3)])
@pytest.mark.parametrize('scales, degrees, translation', [
    ((1.1, 1, 0.9), (10, 0, 0), (3, 0, 0)),
    ((0.83, 1.17, 1.06), (5.3, -7.1, 20.2), (1.3, 2.2, -0.7)),
])
def test_affine_matches_torchio(tio, spacing, scales, degrees, translation):
    x, y = volume(2, 14, 12, 10), binary(1, 14, 12, 10)
    theirs = tio.Affine(scales=scales, degrees=degrees, translation=translation)(subject(tio, x, y, spacing))
    ours = A.Affine(scales, degrees, translation, spacing=spacing)(x, y)
    assert_parity(ours[0], theirs.image.data)
    assert torch.equal(ours[1].float(), theirs.label.data)


@pytest.mark.parametrize('translation', [(0.5, 0, 0), (0, -0.5, 0), (0, 0, 1.5)])
def test_affine_half_voxel_ties_match_torchio(tio, translation):
    """On a cube of 17 the ties are exact in float32 too: image and label bit for bit."""
    x, y = volume(1, 17, 17, 17), binary(1, 17, 17, 17)
    theirs = tio.Affine(scales=1, degrees=0, translation=translation)(subject(tio, x, y))
    ours = A.Affine(scales=1, degrees=0, translation=translation)(x, y)
    assert torch.equal(ours[0], theirs.image.data) and torch.equal(ours[1].float(), theirs.label.data)


@pytest.mark.parametrize('pad', ['minimum', 'mean', -0.25])
def test_affine_pad_values_match_torchio(tio, pad):
    x = volume(2, 14, 12, 10)
    theirs = tio.Affine(scales=0.8, degrees=(0, 0, 30), translation=0, default_pad_value=pad)(x)
    ours = A.Affine(scales=0.8, degrees=(0, 0, 30), translation=0, default_pad_value=pad)(x)[0]
    assert_parity(ours, theirs)


@pytest.mark.parametrize('spacing', [(1, 1, 1), (2, 1.5, 3)])
def test_elastic_deformation_matches_torchio(tio, spacing):
    x, y = volume(2, 14, 12, 10), binary(1, 14, 12, 10)
    control_points = np.random.default_rng(1).uniform(-1, 1, (7, 6, 5, 3)) * np.array([3, 2, 4])
    elastic = tio.ElasticDeformation(control_points=control_points, max_displacement=(3, 2, 4),
                                     image_interpolation='linear', label_interpolation='nearest')
    with warnings.catch_warnings():  # TorchIO warns that 4 mm may fold a 2.5-voxel grid
        warnings.simplefilter('ignore', RuntimeWarning)
        theirs = elastic(subject(tio, x, y, spacing))
    ours = A.ElasticDeformation(control_points, spacing=spacing)(x, y)
    assert_parity(ours[0], theirs.image.data)
    assert torch.equal(ours[1].float(), theirs.label.data)


def test_bias_field_matches_torchio(tio):
    x = volume(2, 14, 12, 10)
    coefficients = np.random.default_rng(2).uniform(-0.5, 0.5, 20).tolist()
    theirs = tio.BiasField(coefficients=coefficients, order=3)(x)
    ours = A.BiasField(coefficients, order=3)(x)[0]
    assert_parity(ours / theirs, torch.ones_like(theirs))


@pytest.mark.parametrize('spacing', [(1, 1, 1), (2, 1.5, 3)])
def test_motion_matches_torchio_with_the_pivot_at_the_centre(tio, spacing):
    """TorchIO pivots about world (0, 0, 0); putting that at the image centre (origin = minus
    the centre's position) makes its motions the ones ours make about the centre."""
    x = volume(1, 16, 12, 10)
    degrees, translation = np.array([[5., -3, 8], [0, 2, -4]]), np.array([[1, -2, .5], [.3, 0, -1]])
    times = np.array([0.3, 0.62])
    centre = np.array(spacing) * (np.array(x.shape[1:]) - 1) / 2
    theirs = tio.Motion(degrees=degrees, translation=translation, times=times, image_interpolation='linear')(
        subject(tio, x, spacing=spacing, origin=-centre)).image.data
    ours = A.Motion(degrees, translation, times, spacing=spacing)(x)[0]
    assert_parity(ours, theirs)
    corner = tio.Motion(degrees=degrees, translation=translation, times=times, image_interpolation='linear')(x)
    assert (ours - corner).abs().max() > 0.01  # TorchIO's own pivot differs, as documented


def test_noise_matches_torchio_in_distribution(tio):
    from scipy.stats import ks_2samp
    x = torch.zeros(1, 24, 24, 24)
    theirs = tio.Noise(mean=0.1, std=0.5, seed=42)(x).flatten()
    ours = A.Noise(mean=0.1, std=0.5)(x, generator=generator())[0].flatten()
    assert not torch.equal(ours, theirs)
    assert ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 0.01


def test_znormalization_matches_torchio(tio):
    x = volume(2, 9, 8, 7)
    for ours, theirs in ((A.ZNormalization(), tio.ZNormalization()),
                         (A.ZNormalization(A.ZNormalization.mean),
                          tio.ZNormalization(masking_method=tio.ZNormalization.mean))):
        assert_parity(ours(x)[0], theirs(x))


# ---------------------------------------------------------------------------------------------
# Device work (counted on meta tensors: one dispatched op is one kernel on a GPU)

def test_op_count_does_not_grow_with_the_batch():
    import bench
    pipeline = A.paper_augmentation(p=1.0)
    single, batch = (bench.device_ops(pipeline, b, (24, 24, 24)) for b in (1, 8))
    assert single.ops == batch.ops and 0 < single.ops <= 50


def test_below_p_one_a_batch_moves_fewer_bytes():
    """Real skipping at B = 8: only the chosen elements are transformed, and an element's label
    is gathered and written back only by the spatial transforms, in place after the first step;
    before that, p = 0.5 moved 98% of the bytes of p = 1 (now about 80%)."""
    import bench
    full = bench.device_ops(A.paper_augmentation(p=1.0), 8, (24, 24, 24)).bytes
    half = np.mean([bench.device_ops(A.paper_augmentation(p=0.5), 8, (24, 24, 24), seed).bytes for seed in range(8)])
    assert half < 0.85 * full


@pytest.mark.parametrize('make', [
    lambda p: A.RandomFlip(flip_probability=1.0, p=p), lambda p: A.RandomMotion(p=p),
    lambda p: A.RandomBiasField(p=p), lambda p: A.RandomNoise(p=p), lambda p: A.RandomAffine(p=p),
    lambda p: A.RandomElasticDeformation(p=p), lambda p: A.paper_augmentation(p=p)],
    ids=['Flip', 'Motion', 'BiasField', 'Noise', 'Affine', 'Elastic', 'pipeline'])
def test_at_p_zero_no_full_volume_op_runs(make):
    import bench
    assert bench.device_ops(make(0.0), 2, (24, 24, 24)).largest < 24 ** 3
    # the counter does see full-volume ops when there are some
    assert bench.device_ops(make(1.0), 2, (24, 24, 24)).largest >= 2 * 24 ** 3


# ---------------------------------------------------------------------------------------------
# Pad values, TorchIO's argument forms

@pytest.mark.parametrize('make', [
    lambda pad: A.Motion(degrees=[[5, -3, 8], [0, 2, -4]], translation=[[1, -2, .5], [.3, 0, -1]],
                         times=[0.3, 0.62], default_pad_value=pad),
    lambda pad: A.ElasticDeformation(np.random.default_rng(3).uniform(-3, 3, (7, 6, 5, 3)), default_pad_value=pad),
    lambda pad: A.Affine(scales=0.8, degrees=(0, 0, 30), translation=0, default_pad_value=pad),
], ids=['Motion', 'ElasticDeformation', 'Affine'])
def test_a_numeric_pad_equal_to_the_minimum_gives_the_default(make):
    x = volume(1, 2, 14, 12, 10)
    minimum = x.amin((2, 3, 4))  # (B, C): one value per channel
    torch.testing.assert_close(make(minimum)(x)[0], make('minimum')(x)[0], atol=1e-6, rtol=0)
    assert (make(minimum.numpy()[0])(x)[0] - make(-3.0)(x)[0]).abs().max() > 0.5  # (C,) form; the pad matters


@pytest.mark.parametrize('transform', [A.RandomMotion, A.RandomAffine, A.RandomElasticDeformation])
def test_numeric_pad_parity_with_torchio(tio, transform):
    """TorchIO pads with each channel's minimum: an image whose minimum is the pad value we ask
    for must come out the same. Deterministic classes, TorchIO's parameters."""
    x = volume(1, 14, 12, 10) + 0.5
    x[0, 3, 4, 5] = -0.75  # the minimum, inside the volume
    if transform is A.RandomMotion:
        degrees, translation, times = np.array([[5., -3, 8], [0, 2, -4]]), np.array([[1, -2, .5], [.3, 0, -1]]), [.3, .62]
        centre = (np.array(x.shape[1:]) - 1) / 2
        theirs = tio.Motion(degrees=degrees, translation=translation, times=np.array(times),
                            image_interpolation='linear')(subject(tio, x, origin=-centre)).image.data
        ours = A.Motion(degrees, translation, times, default_pad_value=-0.75)(x)[0]
    elif transform is A.RandomAffine:
        theirs = tio.Affine(scales=0.8, degrees=(0, 0, 30), translation=0)(x)
        ours = A.Affine(scales=0.8, degrees=(0, 0, 30), translation=0, default_pad_value=-0.75)(x)[0]
    else:
        control_points = np.random.default_rng(1).uniform(-1, 1, (7, 6, 5, 3)) * np.array([3, 2, 4])
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)
            theirs = tio.ElasticDeformation(control_points=control_points, max_displacement=(3, 2, 4))(x)
        ours = A.ElasticDeformation(control_points, default_pad_value=-0.75)(x)[0]
    assert_parity(ours, theirs)


def test_background_per_element_and_channel_frames_a_rotated_patch():
    x = torch.ones(2, 2, 17, 17, 17)
    background = torch.tensor([[0.0, -1.0], [-2.0, -3.0]])
    pipeline = A.Compose([A.RandomAffine(scales=0, degrees=(0, 0, 0, 0, 45, 45), default_pad_value=background)])
    out, _ = pipeline(x, generator=generator())
    corners = out[:, :, 0, 0, :]  # rotated 45 degrees about Z: the corner column comes from outside
    assert torch.equal(corners, background[:, :, None].expand(2, 2, 17))
    augmentation = A.paper_augmentation(p=1.0, background=[0.0, -1.0])  # per channel: C = 2, B = 1
    assert augmentation(x[:1], generator=generator())[0].shape == (1, 2, 17, 17, 17)
    with pytest.raises(ValueError, match='ambiguous|give a'):
        A.paper_augmentation(p=1.0, background=[0.0, -1.0])(x, generator=generator())  # B == C == 2
    with pytest.raises(ValueError, match='background'):
        A.paper_augmentation(background='otsu')


def test_elastic_takes_torchio_max_displacement():
    x = volume(1, 1, 12, 12, 12)
    control_points = np.random.default_rng(0).uniform(-1, 1, (7, 7, 7, 3))
    assert A.ElasticDeformation(control_points, max_displacement=0)(x)[0] is x  # TorchIO's early return
    with pytest.warns(RuntimeWarning, match='folding'):  # 12.25 mm / 4 = 3.06 mm grid: 2 mm > 1.53 mm
        A.ElasticDeformation(control_points, max_displacement=2)(x)
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        A.ElasticDeformation(control_points, max_displacement=1)(x)


def test_range_arguments_accept_numpy_arrays_and_tensors():
    assert A.RandomAffine(degrees=np.array([5, 10, 15])).degrees == A.RandomAffine(degrees=(5, 10, 15)).degrees
    assert A.RandomMotion(translation=torch.tensor([1.0, 2.0])).translation_range == (1.0, 2.0)
    assert A.RandomNoise(std=np.float64(0.1)).std_range == (0.0, 0.1)
    assert A.RandomElasticDeformation(max_displacement=np.array([1.0, 2.0, 3.0])).max_displacement == (1, 2, 3)


@pytest.mark.parametrize('single_resampling', [False, True])
def test_the_gpu_forms_run_on_the_cpu_give_the_cpu_result(single_resampling, monkeypatch):
    """What a GPU runs (affine_grid, the inside lookup, one grid_sample per volume), forced here on
    CPU tensors, gives the CPU forms' result: the check test_cpu_and_cuda_agree makes on CUDA,
    without one (and without the noise, which differs between the devices' generators)."""
    x, y = volume(2, 2, 20, 18, 16), binary(2, 1, 20, 18, 16)
    pipeline = A.paper_augmentation(p=1.0, single_resampling=single_resampling)
    plan = pipeline.plan(2, 2, (20, 18, 16), generator(3))
    cpu = pipeline.run(x, y, plan)
    monkeypatch.setattr(A, '_cpu_kernels', lambda tensor: False)
    gpu = pipeline.run(x, y, plan)
    torch.testing.assert_close(gpu[0], cpu[0], atol=1e-5, rtol=0)
    assert (gpu[1] != cpu[1]).float().mean() < 1e-4


@pytest.mark.parametrize('block', [A._BLOCK_VOXELS, 250])  # 250: blocks of 2 X-rows, the last one short
def test_both_inside_tests_agree(block, monkeypatch):
    """The GPU's inside test (a nearest lookup of ones) and the CPU's (comparisons with the
    bounds, made block by block) agree on a rotated, scaled grid, whose voxels are never at an
    exact tie."""
    monkeypatch.setattr(A, '_BLOCK_VOXELS', block)
    shape = (15, 12, 10)
    matrix, offset = A._affine_maps(torch.tensor([[0.83, 1.17, 1.06]], dtype=torch.float64),
                                    torch.tensor([[5.3, -7.1, 20.2]], dtype=torch.float64),
                                    torch.tensor([[1.3, 2.2, -0.7]], dtype=torch.float64), (1, 1, 1), shape, 'image')
    grid = A._affine_grid(A._theta(matrix, offset, shape).float(), 1, shape)
    lookup, bounds = A._inside_by_lookup(grid, shape), A._inside_by_bounds(grid, shape)
    assert 0 < bounds.float().mean() < 1 and torch.equal(lookup.bool(), bounds)


# ---------------------------------------------------------------------------------------------
# torch.compile and CUDA graphs

# Our lru_caches hold pure functions of their arguments, so dynamo's tracing through them is exact.
@pytest.mark.filterwarnings('ignore:Dynamo detected a call to a `functools.lru_cache`:UserWarning')
def test_run_compiles_in_one_graph_without_recompiling():
    """At p = 1 the device part of a call, ``run`` given a plan, is one graph: no graph break (a
    generator, a read-back or a branch on a tensor would make one), and new parameters (a new
    noise seed, new matrices) reuse it, with the eager result."""
    from torch._dynamo.testing import CompileCounter
    x, y = volume(2, 2, 16, 14, 12), binary(2, 1, 16, 14, 12)
    pipeline = A.paper_augmentation(p=1.0, background=[[0.0, -1.0]])  # (B, C): one pad per channel
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(pipeline.run)(x, y, pipeline.plan(2, 2, (16, 14, 12), generator(0)))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    counter = CompileCounter()
    compiled = torch.compile(pipeline.run, backend=counter)
    for seed in (1, 2):
        plan = pipeline.plan(2, 2, (16, 14, 12), generator(seed))
        ours, eager = compiled(x, y, plan), pipeline.run(x, y, plan)
        assert torch.equal(ours[0], eager[0]) and torch.equal(ours[1], eager[1])
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.skipif(shutil.which('c++') is None and shutil.which('g++') is None,
                    reason="inductor's CPU code needs a C++ compiler")
@pytest.mark.filterwarnings('ignore::UserWarning')  # inductor: no code generation for complex ops (the FFT)
def test_run_compiled_by_inductor_gives_the_eager_result():
    """Inductor compiles the device part of a call (which a backend that only counts graphs does
    not check: layouts, views of its results) and gives the eager result."""
    x, y = volume(2, 1, 16, 14, 12), binary(2, 1, 16, 14, 12)
    pipeline = A.paper_augmentation(p=1.0, background=0.0)
    torch._dynamo.reset()
    compiled = torch.compile(pipeline.run)
    plan = pipeline.plan(2, 1, (16, 14, 12), generator(3))
    ours, eager = compiled(x, y, plan), pipeline.run(x, y, plan)
    torch.testing.assert_close(ours[0], eager[0], atol=1e-5, rtol=0)
    assert (ours[1] != eager[1]).float().mean() < 1e-3
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Affine and elastic deformation in one resampling

AFFINE = dict(scales=(1.05, 0.95, 1.0), degrees=(5, -7, 9), translation=(1, 0, -1))


def test_affine_elastic_reduces_to_each_step_alone():
    x, y = volume(1, 1, 20, 18, 16), binary(1, 1, 20, 18, 16)
    control_points = np.random.default_rng(0).uniform(-2, 2, (7, 7, 7, 3))
    pads = dict(default_pad_value='mean', default_pad_label=2)  # Affine's pad forms pass through
    both = A.AffineElasticDeformation(**AFFINE, control_points=np.zeros((7, 7, 7, 3)), **pads)(x, y)
    affine = A.Affine(**AFFINE, **pads)(x, y)
    assert (affine[1] == 2).any()
    torch.testing.assert_close(both[0], affine[0], atol=1e-5, rtol=0)
    assert (both[1] != affine[1]).float().mean() < 1e-3  # one grid from the coefficients, one from affine_grid: ties
    both = A.AffineElasticDeformation(1, 0, 0, control_points=control_points)(x, y)
    elastic = A.ElasticDeformation(control_points)(x, y)
    assert torch.equal(both[0], elastic[0]) and torch.equal(both[1], elastic[1])


def test_affine_elastic_equals_the_two_steps_on_a_linear_image():
    """Trilinear interpolation reproduces a linear image, so resampling once or twice differs
    only near the edges (edge clamping, pads): the composed map is the two steps' map."""
    shape = (24, 22, 20)
    i, j, k = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing='ij')
    ramp = ((i + 2 * j + 3 * k) / 50)[None, None]
    control_points = np.random.default_rng(1).uniform(-1, 1, (7, 7, 7, 3))
    one = A.AffineElasticDeformation(**AFFINE, control_points=control_points)(ramp)[0]
    two = A.ElasticDeformation(control_points)(A.Affine(**AFFINE)(ramp)[0])[0]
    core = (slice(None), slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    torch.testing.assert_close(one[core], two[core], atol=1e-5, rtol=0)
    reverse = A.Affine(**AFFINE)(A.ElasticDeformation(control_points)(ramp)[0])[0]
    assert (one[core] - reverse[core]).abs().max() > 0.01  # the order matters, and it is Affine first


def test_random_affine_elastic_draws_what_the_two_steps_draw():
    x, y = volume(2, 1, 16, 16, 16), binary(2, 1, 16, 16, 16)
    g, reference = generator(3), generator(3)
    one = A.RandomAffineElasticDeformation()
    one(x, y, generator=g)
    A.Compose([A.RandomAffine(), A.RandomElasticDeformation()]).plan(2, 1, (16, 16, 16), reference)
    assert torch.equal(g.get_state(), reference.get_state())
    two = A.Compose([A.RandomAffine(), A.RandomElasticDeformation()])(x, y, generator=generator(3))
    single = one(x, y, generator=generator(3))
    assert not torch.equal(single[0], two[0]) and (single[0] - two[0]).abs().mean() < 0.2
    assert [type(t) for t in A.paper_augmentation().transforms][-2:] == [A.RandomAffine, A.RandomElasticDeformation]
    single = A.paper_augmentation(p=1.0, background=0.0, single_resampling=True)
    assert [type(t) for t in single.transforms][-2:] == [A.RandomNoise, A.RandomAffineElasticDeformation]
    pipelines = (A.paper_augmentation(p=1.0, background=0.0), single)
    first, second = (pipeline(x, y, generator=generator(4)) for pipeline in pipelines)
    assert 0 < (first[0] - second[0]).abs().mean() < 0.2  # at p = 1 the same draws: close, not equal


def test_static_buffers_replay_any_plan_of_the_same_structure():
    """The CUDA graph's parameter path, on the CPU: a plan's floating-point tensors copied into
    static buffers give the plan's own result, and another structure is refused."""
    x, y = volume(2, 2, 16, 14, 12), binary(2, 1, 16, 14, 12)
    pipeline = A.paper_augmentation(p=1.0, background=[[0.0, -1.0]])
    static = A._StaticPlan(pipeline.plan(2, 2, (16, 14, 12), generator(0)), torch.device('cpu'), torch.float32)
    for seed in (1, 2):
        plan = pipeline.plan(2, 2, (16, 14, 12), generator(seed))
        seeds = static.load(plan)
        replayed, eager = pipeline.run(x, y, static.plan), pipeline.run(x, y, plan)
        assert len(seeds) == 1 and seeds[0] == int(plan[1][3][1]['seed'][0])
        torch.testing.assert_close(replayed[0], eager[0], atol=1e-6, rtol=0)
        assert torch.equal(replayed[1], eager[1])
    with pytest.raises(ValueError, match='plans differently'):
        static.load(A.paper_augmentation(p=1.0).plan(2, 2, (16, 14, 12), generator(3)))  # 'minimum' pads


def test_cuda_graph_call_checks_its_transform_and_device():
    x = volume(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match='p = 1'):
        A.CUDAGraphCall(A.paper_augmentation(p=0.5), x)
    with pytest.raises(ValueError, match='p = 1'):
        A.CUDAGraphCall(A.Compose([A.RandomNoise(), lambda image, label, generator: (image, label)]), x)
    with pytest.raises(ValueError, match='CUDA'):
        A.CUDAGraphCall(A.paper_augmentation(p=1.0), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_graph_replays_the_eager_call():
    """Captured after one warm-up call, the graph gives the eager result for new inputs and new
    draws, noise included (its generators are registered with the graph and seeded per call)."""
    shape = (2, 2, 24, 22, 20)
    x, y = volume(*shape).cuda(), binary(2, 1, *shape[2:]).cuda()
    pipeline = A.paper_augmentation(p=1.0, background=[[0.0, -1.0]])
    captured = A.CUDAGraphCall(pipeline, x, y, generator(0))
    for seed in (1, 2):
        image = volume(*shape, seed=seed).cuda()
        ours = [t.clone() for t in captured(image, y, generator(seed))]
        eager = pipeline(image, y, generator=generator(seed))
        torch.testing.assert_close(ours[0], eager[0], atol=1e-6, rtol=0)
        assert torch.equal(ours[1], eager[1])
    with pytest.raises(ValueError, match='layout'):
        captured(x[:1], y[:1], generator(3))
