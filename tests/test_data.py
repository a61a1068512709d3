"""data.py on tiny volumes written to a temporary folder in each layout."""

import os

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch

import data
from data import (DataError, PatchSampler, Scan, find_scans, load_dataset, paste, read_image, read_scan,
                  split_scans)

SHAPE = (28, 32, 24)
AFFINE = np.array([[1.0, 0, 0, -14], [0, 1, 0, -18], [0, 0, 1, -10], [0, 0, 0, 1]])
ISBI_TAGS = ("flair", "mprage", "pd", "t2")


def brain(seed):
    """A skull-stripped head: positive intensities in an off-centre ellipsoid, zeros around."""
    rng = np.random.default_rng(seed)
    x, y, z = np.indices(SHAPE)
    inside = ((x - 13) / 9) ** 2 + ((y - 17) / 11) ** 2 + ((z - 12) / 8) ** 2 <= 1
    return np.where(inside, rng.uniform(50, 150, SHAPE), 0).astype(np.float32)


def lesion(corner, size=3):
    mask = np.zeros(SHAPE, np.uint8)
    mask[tuple(slice(c, c + size) for c in corner)] = 1
    return mask


MASK1 = lesion((10, 14, 10))
MASK2 = lesion((11, 15, 10))


def save_nii(path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


@pytest.fixture
def isbi(tmp_path):
    """ISBI 2015 layout: 2 subjects x 2 time points, 4 channels, 2 raters; one subject gzipped."""
    for subject, ext in (("training01", ".nii"), ("training02", ".nii.gz")):
        for tp in (1, 2):
            sid = f"{subject}_{tp:02d}"
            base = tmp_path / "training" / subject
            for i, tag in enumerate(ISBI_TAGS):
                save_nii(base / "preprocessed" / f"{sid}_{tag}_pp{ext}", brain(10 * tp + i) * (i + 1))
            save_nii(base / "masks" / f"{sid}_mask1{ext}", MASK1)
            save_nii(base / "masks" / f"{sid}_mask2{ext}", MASK2)
            save_nii(base / "orig" / f"{sid}_flair.nii.gz", brain(0))  # native space: must be ignored
    return tmp_path


def save_nrrd(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(path), np.asarray(array), {
        "space": "left-posterior-superior", "space directions": np.diag([0.5, 0.5, 0.5]),
        "space origin": [10.0, 20.0, 30.0], "encoding": "raw"})
    return path


@pytest.fixture
def miccai(tmp_path):
    """MICCAI 2008 layout: a CHB case (one rater) and a UNC case (two), in Part/Case folders."""
    for site in ("CHB", "UNC"):
        case = f"{site}_train_Case01"
        folder = tmp_path / f"{site}_train_Part1" / case
        for i, tag in enumerate(("FLAIR", "T1", "T2")):
            save_nrrd(folder / f"{case}_{tag}.nhdr", brain(i).astype(np.int16))
        save_nrrd(folder / f"{case}_lesion.nhdr", MASK1)
        if site == "UNC":
            save_nrrd(folder / f"{case}_lesion_byCHB.nhdr", MASK2)
    return tmp_path


def write_manifest(tmp_path, split=True):
    rows = ["subject,timepoint,FLAIR,GADO,mask" + (",split" if split else "")]
    for s, subject in enumerate(("pat01", "pat02", "pat03")):
        for tp in (1, 2):
            folder = tmp_path / "scans" / subject / f"T{tp}"
            save_nii(folder / "flair.nii.gz", brain(s + tp))
            save_nii(folder / "gado.nii.gz", brain(s + tp + 7))
            save_nii(folder / "mask.nii.gz", MASK1)
            cells = [subject, str(tp), f"scans/{subject}/T{tp}/flair.nii.gz",
                     f"scans/{subject}/T{tp}/gado.nii.gz", f"scans/{subject}/T{tp}/mask.nii.gz"]
            rows.append(",".join(cells + ([("train", "val", "test")[s]] if split else [])))
    csv = tmp_path / "manifest.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def full(scan, array):
    """A prepared volume of ``scan`` back in its file's grid."""
    return scan.geometry.restore(array)


# ---------------------------------------------------------------------------------------------
# Readers

def test_channel_names_and_aliases():
    assert data.ISBI_TAGS == {"FLAIR": "flair", "MPRAGE": "mprage", "PDW": "pd", "T2W": "t2"}
    assert data.CHANNELS == ("FLAIR", "MPRAGE", "T2W", "PDW")  # Table 2's order
    assert data.MICCAI2008_TAGS == {"FLAIR": "FLAIR", "T1": "T1", "T2W": "T2"}
    assert data.LABEL_CHOICES == ("mask1", "mask2", "union", "intersection")
    for name, expected in [("flair", "FLAIR"), ("Mprage", "MPRAGE"), ("pd", "PDW"), ("PDW", "PDW"),
                           ("t2", "T2W"), ("t2w", "T2W"), ("T1", "T1"), ("dwi", None)]:
        assert data.channel_name(name) == expected


def test_isbi_reader_finds_every_scan_and_channel(isbi):
    for path in (isbi, isbi / "training"):
        layout, found = find_scans(path)
        assert layout == "ISBI 2015"
        assert sorted(found) == ["training01_01", "training01_02", "training02_01", "training02_02"]
        for entry in found.values():
            assert set(entry.files) == {"FLAIR", "MPRAGE", "PDW", "T2W", "mask1", "mask2"}
            assert all("preprocessed" in str(p) or "masks" in str(p) for p in entry.files.values())
    scans = load_dataset(isbi, "pd")
    assert [(s.id, s.subject, s.timepoint) for s in scans] == [
        ("training01_01", "training01", 1), ("training01_02", "training01", 2),
        ("training02_01", "training02", 1), ("training02_02", "training02", 2)]
    s = scans[3]
    assert s.paths["image"].endswith("training02_02_pd_pp.nii.gz")
    assert s.paths["mask1"].endswith("training02_02_mask1.nii.gz") and "mask2" not in s.paths
    assert s.full_shape == SHAPE and np.allclose(s.affine, AFFINE)
    assert isinstance(s.header, nib.Nifti1Header) and s.split is None
    assert s.image.dtype == torch.float32 and s.mask.dtype == torch.uint8
    assert s.image.shape[1:] == s.mask.shape and s.image.shape[0] == 1 and s.channels == ("PDW",)
    # pd is the PDW channel: the same voxels that brain(10 * tp + 2) made non-zero
    assert np.array_equal(full(s, s.image[0].numpy()) != 0, brain(22) != 0)


@pytest.mark.parametrize("label, expected", [
    ("mask1", MASK1), ("mask2", MASK2),
    ("union", np.maximum(MASK1, MASK2)), ("intersection", np.minimum(MASK1, MASK2))])
def test_isbi_labels(isbi, label, expected):
    scans = load_dataset(isbi, "FLAIR", label=label)
    assert all(np.array_equal(full(s, s.mask.numpy()), expected) for s in scans)
    raters = {"mask1": {"mask1"}, "mask2": {"mask2"}}.get(label, {"mask1", "mask2"})
    assert set(scans[0].paths) == {"image", "FLAIR"} | raters


def test_miccai2008_reader(miccai):
    layout, found = find_scans(miccai)
    assert layout == "MICCAI 2008" and sorted(found) == ["CHB_train_Case01", "UNC_train_Case01"]
    assert set(found["UNC_train_Case01"].files) == {"FLAIR", "T1", "T2W", "lesion", "lesion_byCHB"}
    scans = load_dataset(miccai, "t2")
    assert [s.id for s in scans] == ["CHB_train_Case01", "UNC_train_Case01"]
    assert scans[0].paths["image"].endswith("CHB_train_Case01_T2.nhdr") and scans[0].header is None
    assert np.array_equal(full(scans[0], scans[0].mask.numpy()), MASK1)
    # LPS 0.5 mm, origin (10, 20, 30) mm -> RAS: x and y flip sign
    assert np.allclose(scans[0].affine, [[-0.5, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 0.5, 30], [0, 0, 0, 1]])
    assert load_dataset(miccai, "T1")[1].paths["image"].endswith("UNC_train_Case01_T1.nhdr")
    (unc,) = [s for s in load_dataset(miccai / "UNC_train_Part1", "FLAIR", label="mask2")]
    assert np.array_equal(full(unc, unc.mask.numpy()), MASK2)
    assert unc.paths["lesion_byCHB"].endswith("UNC_train_Case01_lesion_byCHB.nhdr")


def test_miccai2008_has_no_mprage_or_pd(miccai):
    for channel in ("MPRAGE", "PDW", "pd"):
        with pytest.raises(DataError, match="FLAIR, T1, T2W") as e:
            load_dataset(miccai, channel)
        assert str(miccai) in str(e.value) and repr(channel) in str(e.value)


def test_miccai2008_second_rater_only_where_present(miccai):
    with pytest.raises(DataError, match="CHB_train_Case01_lesion_byCHB.nhdr.*label='mask1'"):
        load_dataset(miccai, "FLAIR", label="union")


def test_manifest_reader(tmp_path):
    csv = write_manifest(tmp_path)
    layout, found = find_scans(csv)
    assert layout == "manifest" and len(found) == 6
    scans = load_dataset(csv, "flair")
    assert [s.id for s in scans] == ["pat01_01", "pat01_02", "pat02_01", "pat02_02", "pat03_01", "pat03_02"]
    assert scans[2].subject == "pat02" and scans[2].timepoint == 1 and scans[2].split == "val"
    assert scans[2].paths["image"] == str(tmp_path / "scans/pat02/T1/flair.nii.gz")
    assert np.array_equal(full(scans[2], scans[2].mask.numpy()), MASK1)
    assert load_dataset(csv, "gado")[0].paths["image"].endswith("gado.nii.gz")  # a column we have no alias for
    assert load_dataset(csv, "gado,flair")[0].channels == ("GADO", "FLAIR")  # channel names, not column spellings
    with pytest.raises(DataError, match="label must be 'mask1'"):
        load_dataset(csv, "FLAIR", label="union")


def test_parse_channels():
    assert data.parse_channels("FLAIR,T2W") == ("FLAIR", "T2W")
    assert data.parse_channels(" t2 , flair ") == ("T2W", "FLAIR")  # tags, any case, order kept
    assert data.parse_channels(["pd"]) == ("PDW",) and data.parse_channels("all") == data.CHANNELS
    assert data.parse_channels("gado,flair", available=("FLAIR", "GADO")) == ("GADO", "FLAIR")
    assert data.parse_channels("all", available=("FLAIR", "GADO")) == ("FLAIR", "GADO")
    for text, named in [("FLAIR,DWI", "'DWI'"), ("FLAIR,flair", "'flair' is repeated"), ("FLAIR,,T2W", "empty"),
                        ("all,FLAIR", "'all' cannot be combined")]:
        with pytest.raises(DataError, match=named):
            data.parse_channels(text)


def test_multi_channel_scans_stack_channels_each_normalised_on_its_own(isbi):
    two = load_dataset(isbi, "FLAIR,t2")
    flair, t2 = load_dataset(isbi, "FLAIR"), load_dataset(isbi, ["T2W"])
    for s, f, t in zip(two, flair, t2):
        assert s.image.shape == (2, *s.mask.shape) and s.channels == ("FLAIR", "T2W")
        assert torch.equal(s.image[0], f.image[0]) and torch.equal(s.image[1], t.image[0])
        assert s.paths["FLAIR"].endswith("flair_pp.nii") or s.paths["FLAIR"].endswith("flair_pp.nii.gz")
        assert s.paths["T2W"] != s.paths["FLAIR"] and s.background == (0.0, 0.0) and s.spacing == (1.0, 1.0, 1.0)
        for c in range(2):
            inside = s.image[c][s.image[c] != 0].double()
            assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1) < 1e-5
    assert load_dataset(isbi, "all")[0].channels == ("FLAIR", "MPRAGE", "T2W", "PDW")
    with pytest.raises(DataError, match="'FLAIR' is repeated"):
        load_dataset(isbi, "FLAIR,FLAIR")


def test_channels_on_different_grids_are_refused(tmp_path):
    a = save_nii(tmp_path / "flair.nii.gz", brain(0))
    b = save_nii(tmp_path / "t2.nii.gz", brain(1), AFFINE @ np.diag([1.0, 1, 2, 1]))
    c = save_nii(tmp_path / "pd.nii.gz", brain(1)[:, :, :-2])
    for bad, what in [(b, "affines"), (c, "shape")]:
        with pytest.raises(DataError, match=what) as e:
            read_scan([a, bad])
        assert str(bad) in str(e.value) and str(a) in str(e.value)


def test_raters_hold_every_available_isbi_rater(isbi):
    s = load_dataset(isbi, "FLAIR")[0]  # label mask1, yet both raters are there for the ISBI score
    assert set(s.raters) == {"mask1", "mask2"} and torch.equal(s.raters["mask1"], s.mask)
    assert all(r.dtype == torch.uint8 and r.shape == s.mask.shape for r in s.raters.values())
    assert np.array_equal(full(s, s.raters["mask2"]), MASK2)


def test_raters_of_miccai2008(miccai):
    chb, unc = load_dataset(miccai, "FLAIR")
    assert set(chb.raters) == {"mask1"} and set(unc.raters) == {"mask1", "mask2"}
    assert np.array_equal(full(unc, unc.raters["mask2"]), MASK2)


def test_read_scan_is_what_load_dataset_serves(isbi):
    s = load_dataset(isbi, "FLAIR,PDW", norm="crop")[1]
    image, geometry, background = read_scan([s.paths["FLAIR"], s.paths["PDW"]], norm="crop")
    assert torch.equal(image, s.image) and background == s.background and geometry.box == s.geometry.box
    assert np.allclose(geometry.affine, AFFINE) and isinstance(geometry.header, nib.Nifti1Header)
    assert geometry.shape == SHAPE and all(b < 0 for b in background) and background[0] != background[1]


# ---------------------------------------------------------------------------------------------
# Crop, paste, normalise

def prepared(tmp_path, image, name="scan.nii.gz", affine=AFFINE, **kw):
    """``read_scan`` of one channel saved as NIfTI."""
    return read_scan([save_nii(tmp_path / name, image, affine)], **kw)


def test_crop_and_paste_round_trip(tmp_path):
    image = brain(3)
    mask = MASK1.copy()
    img_t, geometry, background = prepared(tmp_path, image)
    box = geometry.box
    region = np.argwhere(image != 0)  # the box is the image's foreground alone, never the mask's
    assert box == tuple(zip(region.min(0).tolist(), (region.max(0) + 1).tolist()))
    assert img_t.shape[1:] == tuple(b - a for a, b in box) != SHAPE and background == (0.0,)
    mask_t = torch.from_numpy(geometry.apply(mask, order=0))
    assert mask_t.shape == img_t.shape[1:]
    assert np.array_equal(paste(mask_t, box, SHAPE).numpy(), mask)
    assert np.array_equal(paste(mask_t.numpy(), box, SHAPE), mask)
    assert np.array_equal(geometry.restore(mask_t), mask) and geometry.restore(mask_t).dtype == np.uint8
    back = paste(img_t[0], box, SHAPE, fill=-7.0)
    outside_box = paste(torch.zeros(img_t.shape[1:], dtype=torch.bool), box, SHAPE, fill=True)
    assert back.dtype == torch.float32 and (back[outside_box] == -7).all()
    assert np.array_equal(geometry.restore(img_t[0], fill=-7.0), back.numpy())
    brain_in, brain_out = image[image != 0], back.numpy()[image != 0]  # undo the normalisation
    assert np.allclose(brain_out * brain_in.std(ddof=1) + brain_in.mean(), brain_in, rtol=1e-5)
    assert (back[~outside_box & torch.from_numpy(image == 0)] == data.BACKGROUND).all()
    with pytest.raises(ValueError, match="does not match box"):
        paste(img_t[0, 1:], box, SHAPE)


def test_z_normalisation_inside_the_brain(tmp_path):
    image = brain(4) * 1e3 + 5e4  # arbitrary scanner units, far from 0
    image[brain(4) == 0] = 0
    img_t, geometry, _ = prepared(tmp_path, image)
    crop = image[tuple(slice(a, b) for a, b in geometry.box)]
    brain_voxels = img_t[0][torch.from_numpy(crop != 0)].double()
    assert abs(brain_voxels.mean().item()) < 1e-6 and abs(brain_voxels.std().item() - 1) < 1e-6
    assert (img_t[0][torch.from_numpy(crop == 0)] == data.BACKGROUND).all()


def test_z_normalisation_against_torchio(tmp_path):
    """Brain voxels equal TorchIO's ZNormalization with a non-zero mask; the background does not."""
    tio = pytest.importorskip("torchio")
    img_t, geometry, _ = prepared(tmp_path, brain(5))
    img_t = img_t[0]
    crop = torch.from_numpy(brain(5)[tuple(slice(a, b) for a, b in geometry.box)])
    theirs = tio.ZNormalization(masking_method=lambda x: x > 0)(crop[None])[0]
    inside = crop > 0
    assert torch.allclose(img_t[inside], theirs[inside], atol=1e-5)
    assert (theirs[~inside] < img_t[inside].min()).all() and (img_t[~inside] == 0).all()
    default = tio.ZNormalization()(crop[None])[0][inside].double()  # the paper's call: stats over the whole box
    assert default.mean() > 0.1 and default.std() < 0.9


def test_norm_crop_is_torchios_default_znormalization(tmp_path):
    tio = pytest.importorskip("torchio")
    img_t, geometry, background = prepared(tmp_path, brain(5), norm="crop")
    crop = torch.from_numpy(brain(5)[tuple(slice(a, b) for a, b in geometry.box)])
    theirs = tio.ZNormalization()(crop[None])[0]
    assert torch.allclose(img_t[0], theirs, atol=1e-5)
    values = crop.double()
    assert background[0] == pytest.approx(-(values.mean() / values.std()).item(), rel=1e-6)
    assert (img_t[0][crop == 0] == background[0]).all() and background[0] < 0


# ---------------------------------------------------------------------------------------------
# Orientation, voxel size, the crop

def reoriented(image, affine, codes):
    """The same voxels stored in orientation ``codes`` (e.g. "LAS"), world positions unchanged."""
    from nibabel.orientations import axcodes2ornt, ornt_transform
    img = nib.Nifti1Image(np.asarray(image), affine)
    start = axcodes2ornt(nib.aff2axcodes(affine))
    return img.as_reoriented(ornt_transform(start, axcodes2ornt(codes)))


@pytest.mark.parametrize("codes", ["LAS", "LPS", "PIL", "SRA"])
def test_every_orientation_gives_the_same_prepared_scan(tmp_path, codes):
    """RAS, LAS, LPS and axis-permuted copies of one scan: one network input, one mask in world space."""
    ras_image, ras_geometry, _ = prepared(tmp_path, brain(6), "ras.nii.gz")
    assert nib.aff2axcodes(ras_geometry.prepared_affine) == ("R", "A", "S")
    copy, copy_mask = reoriented(brain(6), AFFINE, codes), reoriented(MASK1, AFFINE, codes)
    assert nib.aff2axcodes(copy.affine) == tuple(codes)
    image, geometry, _ = prepared(tmp_path, copy.get_fdata(dtype=np.float32), "copy.nii.gz", copy.affine)
    assert torch.equal(image, ras_image) and np.allclose(geometry.prepared_affine, ras_geometry.prepared_affine)
    mask = geometry.apply(np.asarray(copy_mask.dataobj), order=0)
    assert np.array_equal(mask, ras_geometry.apply(MASK1, order=0))
    back = geometry.restore(mask)  # written back in the copy's own grid
    assert back.shape == copy.shape and np.array_equal(back, np.asarray(copy_mask.dataobj))
    assert np.allclose(geometry.affine, copy.affine)


def oblique_affine(zooms=(1.0, 1.0, 3.0)):
    """Voxel -> mm: axes permuted and flipped (PSR), rotated 17 degrees about z, anisotropic."""
    angle = np.deg2rad(17)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    permute = np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permute @ np.diag(zooms)
    affine[:3, 3] = [5.0, -7.0, 11.0]
    return affine


def oblique_scan(tmp_path):
    """A small ellipsoid head (12 x 32 x 28 voxels, 3 mm along axis 0) and a lesion in it."""
    shape = (12, 32, 28)
    x, y, z = np.indices(shape)
    inside = ((x - 6) / 5) ** 2 + ((y - 15) / 13) ** 2 + ((z - 14) / 11) ** 2 <= 1
    image = np.where(inside, np.random.default_rng(0).uniform(50, 150, shape), 0).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[5:7, 12:16, 10:13] = 1
    mask[8, 20, 15] = 1
    affine = oblique_affine((3.0, 1.0, 1.0))
    return save_nii(tmp_path / "oblique.nii.gz", image, affine), save_nii(tmp_path / "mask.nii.gz", mask, affine), \
        image, mask, affine


@pytest.mark.parametrize("spacing", [None, 1.0, (1.0, 0.5, 1.0)])
def test_oblique_anisotropic_permuted_round_trip(tmp_path, spacing):
    image_path, _, image, mask, affine = oblique_scan(tmp_path)
    prepared_image, geometry, _ = read_scan([image_path], spacing=spacing)
    canonical_zooms = (1.0, 3.0, 1.0)  # the 3 mm file axis 0 points posterior: canonical axis 1
    assert np.allclose(geometry.spacing, canonical_zooms if spacing is None else np.broadcast_to(spacing, 3))
    assert np.allclose(np.linalg.norm(geometry.prepared_affine[:3, :3], axis=0), geometry.spacing)
    cut = geometry.apply(mask, order=0)
    assert cut.shape == prepared_image.shape[1:] and cut.sum() >= mask.sum()
    back = geometry.restore(torch.from_numpy(cut))
    assert back.dtype == np.uint8 and np.array_equal(back, mask)  # exact, in the file's own grid
    # every lesion voxel of the prepared grid lies, in world mm, inside a lesion voxel of the file
    world = geometry.prepared_affine @ np.c_[np.argwhere(cut), np.ones(int(cut.sum()))].T
    voxel = np.rint(np.linalg.solve(affine, world)[:3]).astype(int)
    assert mask[tuple(voxel)].all()
    logits = geometry.restore(torch.from_numpy(np.where(cut > 0, 5.0, -5.0).astype(np.float32)), fill=-1e4)
    assert logits.dtype == np.float32 and np.array_equal(logits > 0, mask.astype(bool))
    restored = geometry.restore(prepared_image[0])  # linear back: the brain's voxels keep their rank
    if spacing is None:
        assert np.array_equal(restored != 0, image != 0)


def test_spacing_none_resamples_mixed_spacings_to_the_median(tmp_path):
    rows = ["subject,timepoint,FLAIR,mask"]
    for i, zoom in enumerate((1.0, 1.0, 2.0)):  # z spacing 1, 1, 2 mm: median 1
        affine = AFFINE @ np.diag([1.0, 1.0, zoom, 1.0])
        save_nii(tmp_path / f"f{i}.nii.gz", brain(i), affine)
        save_nii(tmp_path / f"m{i}.nii.gz", MASK1, affine)
        rows.append(f"s{i},1,f{i}.nii.gz,m{i}.nii.gz")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    scans = load_dataset(tmp_path / "m.csv", "FLAIR")
    assert [s.spacing for s in scans] == [(1.0, 1.0, 1.0)] * 3
    assert scans[0].geometry.resampled_shape == SHAPE and scans[2].geometry.resampled_shape == (28, 32, 48)
    assert np.array_equal(full(scans[2], scans[2].mask), MASK1)  # upsampled by 2, back exactly
    coarse = load_dataset(tmp_path / "m.csv", "FLAIR", spacing=2.0)
    assert [s.spacing for s in coarse] == [(2.0, 2.0, 2.0)] * 3
    assert coarse[0].geometry.resampled_shape == (14, 16, 12) and coarse[2].geometry.resampled_shape == (14, 16, 24)


def test_crop_box_comes_from_the_image_not_the_mask(isbi):
    mask = MASK1.copy()
    mask[5, 7, 5] = 1  # inside the box (a corner), on a zero voxel of the image: kept
    assert all(brain(s)[5, 7, 5] == 0 for s in (0, 10, 20))
    for path in isbi.glob("training/*/masks/*_mask1.nii*"):
        save_nii(path, mask)
    scans = load_dataset(isbi, "FLAIR")
    region = np.argwhere(brain(10) != 0)
    assert scans[0].geometry.box == tuple(zip(region.min(0).tolist(), (region.max(0) + 1).tolist()))
    assert all(np.array_equal(full(s, s.mask), mask) for s in scans)
    mask[1, 2, 3] = 1  # outside the image's box: refused, it would be lost
    bad = isbi / MASKS / "training01_02_mask1.nii"
    save_nii(bad, mask)
    with pytest.raises(DataError, match="1 lesion voxel.*outside the crop box") as e:
        load_dataset(isbi, "FLAIR")
    assert str(bad) in str(e.value) and "training01_02_flair_pp.nii" in str(e.value)


def test_manifest_brainmask_crops_and_normalises_inside_the_brain(tmp_path):
    """MICCAI-2008-like: a head with skull around the brain; the brain mask strips it."""
    head = brain(1) + 0
    x, y, z = np.indices(SHAPE)
    head[head == 0] = 500.0 * ((np.abs(x - 13) < 13) & (np.abs(y - 16) < 15) & (np.abs(z - 12) < 11))[head == 0]
    brainmask = (brain(1) != 0).astype(np.uint8)
    save_nii(tmp_path / "flair.nii.gz", head)
    save_nii(tmp_path / "brain.nii.gz", brainmask)
    save_nii(tmp_path / "mask.nii.gz", MASK1)
    (tmp_path / "m.csv").write_text("subject,timepoint,FLAIR,mask,BrainMask\np1,1,flair.nii.gz,mask.nii.gz,brain.nii.gz\n")
    (scan,) = load_dataset(tmp_path / "m.csv", "FLAIR")
    assert scan.paths["brainmask"].endswith("brain.nii.gz") and scan.channels == ("FLAIR",)
    region = np.argwhere(brainmask)
    assert scan.geometry.box == tuple(zip(region.min(0).tolist(), (region.max(0) + 1).tolist()))
    restored = full(scan, scan.image[0])
    assert (restored[brainmask == 0] == 0).all()  # the skull is gone
    inside = restored[brainmask != 0].astype(np.float64)
    assert abs(inside.mean()) < 1e-5 and abs(inside.std(ddof=1) - 1) < 1e-5
    (plain,) = load_dataset(write_one(tmp_path), "FLAIR")  # without it, the whole head is the foreground
    assert plain.image.shape[1:] != scan.image.shape[1:]


def write_one(tmp_path):
    (tmp_path / "plain.csv").write_text("subject,timepoint,FLAIR,mask\np1,1,flair.nii.gz,mask.nii.gz\n")
    return tmp_path / "plain.csv"


# ---------------------------------------------------------------------------------------------
# Patch sampler

def make_scan(image, mask, sid="s_01", subject="s", timepoint=1, split=None, background=None):
    """A Scan from a (X, Y, Z) or (C, X, Y, Z) image, as prepared (identity geometry)."""
    image = torch.as_tensor(image, dtype=torch.float32)
    return Scan(sid, subject, timepoint, image if image.ndim == 4 else image[None],
                torch.as_tensor(mask, dtype=torch.uint8), split=split, background=background)


def counting_scan(shape, lesion_at, sid="s_01", offset=0):
    """Each voxel holds offset + its flat index, so a patch tells where it was cut from."""
    mask = np.zeros(shape, np.uint8)
    for corner in lesion_at:
        mask[tuple(slice(c, c + 2) for c in corner)] = 1
    return make_scan(offset + np.arange(np.prod(shape), dtype=np.float32).reshape(shape), mask, sid)


def assert_cut_from(scan, offset, image, label):
    """The patch is the block of ``scan`` starting at the voxel its first value names."""
    start = np.unravel_index(int(image[0, 0, 0, 0, 0]) - offset, scan.mask.shape)
    cut = tuple(slice(s, s + p) for s, p in zip(start, image.shape[2:]))
    assert torch.equal(image[0], scan.image[(slice(None), *cut)])
    assert torch.equal(label[0, 0], scan.mask[cut].float())


@pytest.mark.parametrize("size", [12, (16, 10, 14)])
def test_patches_have_the_asked_size_and_hold_lesion(size):
    scans = [counting_scan((30, 26, 22), [(0, 0, 0)], "a_01"),
             counting_scan((24, 28, 20), [(22, 3, 18), (10, 10, 10)], "b_01", offset=10**5)]
    sampler = PatchSampler(scans, patch_size=size, patches_per_scan=7, generator=torch.Generator().manual_seed(0))
    p = (size,) * 3 if isinstance(size, int) else size
    patches = list(sampler)
    assert len(sampler) == len(patches) == 14
    sources = []
    for image, label, s in patches:
        assert image.shape == label.shape == (1, 1, *p)
        assert image.dtype == label.dtype == torch.float32 and image.device.type == "cpu"
        assert label.sum() > 0
        source = int(image[0, 0, 0, 0, 0] >= 10**5)
        assert s == source  # the sampler names the scan it cut from
        assert_cut_from(scans[source], source * 10**5, image, label)
        sources.append(source)
    assert sorted(sources) == [0] * 7 + [1] * 7 and sources != sorted(sources)  # 7 each, shuffled
    # both lesions of scan b are drawn as centres, each patch centred on its lesion voxel where it fits
    starts_b = {int(im[0, 0, 0, 0, 0]) for im, _, _ in patches if im[0, 0, 0, 0, 0] >= 10**5}
    assert len(starts_b) > 1


def test_sampler_is_seeded():
    scans = [counting_scan((30, 26, 22), [(3, 4, 5), (20, 18, 15), (12, 2, 9)])]
    def firsts(seed):
        g = torch.Generator().manual_seed(seed)
        return [int(im[0, 0, 0, 0, 0]) for im, _, _ in PatchSampler(scans, 8, 10, generator=g)]
    assert firsts(1) == firsts(1) and firsts(1) != firsts(2)
    sampler = PatchSampler(scans, 8, 10, generator=torch.Generator().manual_seed(1))
    assert [int(im[0, 0, 0, 0, 0]) for im, _, _ in sampler] != [int(im[0, 0, 0, 0, 0]) for im, _, _ in sampler]


def test_small_scan_is_padded_with_background():
    scan = counting_scan((10, 12, 8), [(4, 5, 3)], offset=1)  # offset 1: no scan voxel equals BACKGROUND
    (image, label, _), = PatchSampler([scan], patch_size=(16, 12, 10), patches_per_scan=1)
    inner = image[0, 0, 3:13, :, 1:9]  # padded centred: (16-10)//2 = 3, 0, (10-8)//2 = 1
    assert torch.equal(inner, scan.image[0]) and label[0, 0, 3:13, :, 1:9].sum() == scan.mask.sum() == 8
    assert (image == data.BACKGROUND).sum() == 16 * 12 * 10 - 10 * 12 * 8


def test_multi_channel_patches_pad_with_each_channels_background():
    shape = (10, 12, 8)
    image = np.stack([np.full(shape, 5.0), np.full(shape, 7.0)])
    mask = np.zeros(shape, np.uint8)
    mask[4, 5, 3] = 1
    scan = make_scan(image, mask, background=(-1.5, -2.5))
    (patch, label, _), = PatchSampler([scan], patch_size=(16, 12, 10), patches_per_scan=1,
                                   generator=torch.Generator().manual_seed(0))
    assert patch.shape == (1, 2, 16, 12, 10) and label.shape == (1, 1, 16, 12, 10)
    inside = torch.zeros(16, 12, 10, dtype=torch.bool)
    inside[3:13, :, 1:9] = True
    assert (patch[0, 0][inside] == 5).all() and (patch[0, 1][inside] == 7).all()
    assert (patch[0, 0][~inside] == -1.5).all() and (patch[0, 1][~inside] == -2.5).all()
    assert label.sum() == 1 and not hasattr(PatchSampler([scan], 4), "ids")


def test_scan_without_lesion_falls_back_to_uniform_centres():
    scan = counting_scan((30, 26, 22), [])
    patches = list(PatchSampler([scan], patch_size=8, patches_per_scan=20, generator=torch.Generator().manual_seed(0)))
    for image, label, _ in patches:
        assert image.shape == (1, 1, 8, 8, 8) and label.sum() == 0
        assert_cut_from(scan, 0, image, label)
    assert len({int(im[0, 0, 0, 0, 0]) for im, _, _ in patches}) > 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_sampler_on_cuda(generator_device):
    scan = counting_scan((30, 26, 22), [(3, 4, 5), (20, 18, 15)])
    g = torch.Generator(device=generator_device).manual_seed(0)
    sampler = PatchSampler([scan], patch_size=12, patches_per_scan=5, device="cuda", generator=g)
    for image, label, _ in sampler:
        assert image.device.type == label.device.type == "cuda" and label.sum() > 0
        assert_cut_from(scan, 0, image.cpu(), label.cpu())


# ---------------------------------------------------------------------------------------------
# Splits

def isbi_like_scans():
    """21 scans of 5 subjects with 4, 4, 5, 4, 4 time points, as the ISBI 2015 training set."""
    tiny = np.ones((2, 2, 2), np.float32)
    return [make_scan(tiny, tiny, f"training{s:02d}_{t:02d}", f"training{s:02d}", t)
            for s, n in zip(range(1, 6), (4, 4, 5, 4, 4)) for t in range(1, n + 1)]


def assert_partition(split, scans):
    ids = [i for part in ("train", "val", "test") for i in split[part]]
    assert sorted(ids) == sorted(s.id for s in scans)  # complete and disjoint


def test_scan_level_split_is_the_papers_17_2_2():
    scans = isbi_like_scans()
    split = split_scans(scans, seed=0)
    assert_partition(split, scans)
    assert [len(split[k]) for k in ("train", "val", "test")] == [17, 2, 2]
    assert split == split_scans(scans, "scan", (0.8, 0.1, 0.1), seed=0) == split_scans(scans, by="scan", seed=0)
    assert split != split_scans(scans, seed=1)


def test_subject_level_split_keeps_subjects_together():
    scans = isbi_like_scans()
    subject = {s.id: s.subject for s in scans}
    for seed in range(5):
        split = split_scans(scans, by="subject", seed=seed)
        assert_partition(split, scans)
        subjects = [{subject[i] for i in split[k]} for k in ("train", "val", "test")]
        assert [len(x) for x in subjects] == [3, 1, 1]
        assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    assert split_scans(scans, "subject", seed=0) == split_scans(scans, "subject", seed=0)
    assert len({tuple(split_scans(scans, "subject", seed=s)["test"]) for s in range(5)}) > 1


def test_manifest_split_column_overrides(tmp_path):
    scans = load_dataset(write_manifest(tmp_path), "FLAIR")
    expected = {"train": ["pat01_01", "pat01_02"], "val": ["pat02_01", "pat02_02"], "test": ["pat03_01", "pat03_02"]}
    assert split_scans(scans) == split_scans(scans, by="subject", seed=3) == expected


def test_split_rounding_is_half_up_with_at_least_one():
    tiny = np.ones((2, 2, 2), np.float32)
    scans = [make_scan(tiny, tiny, f"s{i:02d}_01", f"s{i:02d}") for i in range(25)]
    sizes = lambda split: [len(split[k]) for k in ("train", "val", "test")]
    assert sizes(split_scans(scans)) == [19, 3, 3]  # 2.5 -> 3 each, train the rest
    assert sizes(split_scans(scans[:8], ratios=(0.9, 0.05, 0.05))) == [6, 1, 1]  # 0.4 -> at least 1
    assert sizes(split_scans(scans[:8], ratios=(0.9, 0.1, 0.0))) == [7, 1, 0]


def test_too_few_scans_to_split():
    with pytest.raises(DataError, match="too few"):
        split_scans(isbi_like_scans()[:2])


# ---------------------------------------------------------------------------------------------
# Bad input: one DataError naming the file and what to do

PRE = "training/training01/preprocessed"
MASKS = "training/training01/masks"


def break_isbi(root, case):
    """Damage one file of the ISBI fixture; return the path(s) the message must name."""
    flair = root / PRE / "training01_02_flair_pp.nii"
    mask = root / MASKS / "training01_02_mask1.nii"
    if case == "missing channel":
        flair.unlink()
        return ["training01_02", "training01_02_flair_pp.nii", str(flair.parent)]
    if case == "missing mask":
        mask.unlink()
        return ["training01_02", "training01_02_mask1.nii"]
    if case == "shape mismatch":
        save_nii(mask, MASK1[:-1])
        return [str(mask), str(flair), "shape"]
    if case == "affine mismatch":
        save_nii(mask, MASK1, AFFINE @ np.diag([1.0, 1, 2, 1]))
        return [str(mask), str(flair), "affine"]
    if case in ("NaN voxels", "inf voxels"):
        image = brain(0)
        image[5, 5, 5] = np.nan if case == "NaN voxels" else np.inf
        save_nii(flair, image)
        return [str(flair), "NaN or inf"]
    if case == "mask not binary":
        save_nii(mask, MASK1 * 2)
        return [str(mask), "binary"]
    if case == "4D image":
        save_nii(flair, np.stack([brain(0), brain(1)], -1))
        return [str(flair), "3D"]
    if case == "corrupt file":
        flair.write_bytes(b"not a nifti file" * 30)
        return [str(flair), "corrupt"]
    if case == "truncated gzip":
        gz = root / "training/training02/preprocessed/training02_01_flair_pp.nii.gz"
        gz.write_bytes(gz.read_bytes()[:400])
        return [str(gz), "corrupt"]
    if case == "unknown channel":
        return [str(root), "'DWI'", "FLAIR, MPRAGE, PDW, T2W"]
    if case == "duplicate file":
        save_nii(root / "copy" / "training01_02_flair_pp.nii.gz", brain(0))
        return [str(flair), str(root / "copy" / "training01_02_flair_pp.nii.gz")]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing channel", "missing mask", "shape mismatch", "affine mismatch",
                                  "NaN voxels", "inf voxels", "mask not binary", "4D image", "corrupt file",
                                  "truncated gzip", "unknown channel", "duplicate file"])
def test_bad_isbi_input(isbi, case):
    named = break_isbi(isbi, case)
    with pytest.raises(DataError) as e:
        load_dataset(isbi, "DWI" if case == "unknown channel" else "FLAIR")
    for text in named:
        assert text in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder") as e:
        load_dataset(tmp_path / "nowhere", "FLAIR")
    assert str(tmp_path / "nowhere") in str(e.value)


def test_empty_dataset(tmp_path):
    (tmp_path / "training").mkdir()
    save_nii(tmp_path / "training" / "notes.nii", brain(0))  # no recognised name
    with pytest.raises(DataError, match="empty dataset") as e:
        load_dataset(tmp_path, "FLAIR")
    assert str(tmp_path) in str(e.value)
    csv = tmp_path / "empty.csv"
    csv.write_text("subject,timepoint,FLAIR,mask\n")
    with pytest.raises(DataError, match="empty dataset") as e:
        load_dataset(csv, "FLAIR")
    assert str(csv) in str(e.value)


def test_corrupt_nrrd(miccai):
    raw = miccai / "CHB_train_Part1/CHB_train_Case01/CHB_train_Case01_FLAIR.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt") as e:
        load_dataset(miccai, "FLAIR")
    assert "CHB_train_Case01_FLAIR.nhdr" in str(e.value)


@pytest.mark.parametrize("case", ["missing file", "missing cell", "missing column", "bad timepoint", "bad split",
                                  "same channel twice"])
def test_bad_manifest(tmp_path, case):
    csv = write_manifest(tmp_path)
    text = csv.read_text()
    named = [str(csv)]
    if case == "missing file":
        (tmp_path / "scans/pat02/T1/flair.nii.gz").unlink()
        named = [str(tmp_path / "scans/pat02/T1/flair.nii.gz"), str(csv)]
    elif case == "missing cell":
        csv.write_text(text.replace("scans/pat02/T1/mask.nii.gz", ""))
        named += ["pat02_01 is missing its mask", "column 'mask'"]
    elif case == "missing column":
        csv.write_text(text.replace(",mask,", ",lesion,"))
        named += ["lacks column(s) mask", "subject,timepoint,FLAIR,GADO,lesion,split"]
    elif case == "bad timepoint":
        csv.write_text(text.replace("pat02,1,", "pat02,T1,"))
        named += ["'T1'"]
    elif case == "bad split":
        csv.write_text(text.replace(",val\n", ",validate\n"))
        named += ["'validate'"]
    elif case == "same channel twice":
        csv.write_text(text.replace(",GADO,", ",flair,"))
        named += ["FLAIR, flair"]
    with pytest.raises(DataError) as e:
        load_dataset(csv, "FLAIR")
    for text in named:
        assert text in str(e.value)


def test_read_image_for_prediction(tmp_path):
    path = save_nii(tmp_path / "new_flair.nii.gz", brain(1)[..., None])  # trailing axis of 1 is dropped
    (tmp_path / "x.mha").write_bytes(b"MHA")
    image, affine, header = read_image(path)
    assert image.shape == SHAPE and image.dtype == np.float32 and np.allclose(affine, AFFINE)
    assert isinstance(header, nib.Nifti1Header)
    for bad, message in [(tmp_path / "absent.nii", "no such file"), (tmp_path / "x.mha", "unsupported")]:
        with pytest.raises(DataError, match=message) as e:
            read_image(bad)
        assert str(bad) in str(e.value)
    zeros = save_nii(tmp_path / "zeros.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(DataError, match="every voxel is 0") as e:
        read_scan([zeros])
    assert str(zeros) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Hardening: datasets

def test_manifest_split_leaving_a_part_empty_is_refused_at_load(tmp_path):
    csv = write_manifest(tmp_path)
    csv.write_text(csv.read_text().replace(",val\n", ",train\n"))
    with pytest.raises(DataError, match="leaves val empty") as e:
        load_dataset(csv, "FLAIR")
    assert str(csv) in str(e.value)
    scans = [make_scan(np.ones((2, 2, 2)), np.ones((2, 2, 2)), f"s{i}_01", split=("train", "test")[i]) for i in (0, 1)]
    with pytest.raises(DataError, match="leaves val empty"):
        split_scans(scans)


def test_manifest_with_a_utf8_bom_is_read(tmp_path):
    csv = write_manifest(tmp_path)
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())  # as Excel writes it
    assert len(load_dataset(csv, "FLAIR")) == 6


@pytest.mark.parametrize("how", ["same path", "symlink"])
def test_the_same_image_under_two_scan_ids_is_refused(tmp_path, how):
    csv = write_manifest(tmp_path)
    twin = "scans/pat01/T1/flair.nii.gz"
    if how == "symlink":
        (tmp_path / "link.nii.gz").symlink_to(tmp_path / twin)
        twin = "link.nii.gz"
    csv.write_text(csv.read_text().replace("scans/pat02/T1/flair.nii.gz", twin))
    with pytest.raises(DataError, match="same image file is listed for scans pat01_01.* and pat02_01") as e:
        load_dataset(csv, "FLAIR")
    assert str(tmp_path / twin) in str(e.value)


def test_unreadable_folder_is_permission_denied_not_skipped(isbi, monkeypatch):
    """Tests run as root, who can read everything: the refusal is simulated at os.scandir."""
    locked = isbi / "training" / "training02"
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match="permission denied") as e:
        find_scans(isbi)
    assert str(locked) in str(e.value)


def test_unreadable_file_is_permission_denied_not_corrupt(isbi, monkeypatch):
    locked = isbi / PRE / "training01_02_flair_pp.nii"
    real_load = nib.load

    def load(path, *args, **kw):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_load(path, *args, **kw)
    monkeypatch.setattr(nib, "load", load)
    with pytest.raises(DataError, match="permission denied") as e:
        load_dataset(isbi, "FLAIR")
    assert str(locked) in str(e.value) and "corrupt" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_for_real(isbi):
    locked = isbi / PRE / "training01_02_flair_pp.nii"
    locked.chmod(0)
    try:
        with pytest.raises(DataError, match="permission denied") as e:
            load_dataset(isbi, "FLAIR")
        assert str(locked) in str(e.value)
    finally:
        locked.chmod(0o644)


def test_dangling_symlink_is_named_as_such(isbi, tmp_path):
    flair = isbi / PRE / "training01_02_flair_pp.nii"
    flair.unlink()
    flair.symlink_to(isbi / "gone.nii")
    with pytest.raises(DataError, match="dangling symlink") as e:
        load_dataset(isbi, "FLAIR")
    assert str(flair) in str(e.value) and "gone.nii" in str(e.value)


def test_dangling_symlink_in_a_manifest(tmp_path):
    csv = write_manifest(tmp_path)
    flair = tmp_path / "scans/pat02/T1/flair.nii.gz"
    flair.unlink()
    flair.symlink_to(tmp_path / "elsewhere.nii.gz")
    with pytest.raises(DataError, match="dangling symlink") as e:
        load_dataset(csv, "FLAIR")
    assert str(flair) in str(e.value) and str(csv) in str(e.value)


def test_a_dataset_whose_masks_are_all_empty_is_refused(isbi):
    for path in isbi.glob("training/*/masks/*_mask1.nii*"):
        save_nii(path, np.zeros(SHAPE, np.uint8))
    with pytest.raises(DataError, match="every lesion mask \\(mask1\\) is empty in all 4 scans") as e:
        load_dataset(isbi, "FLAIR")
    assert str(isbi) in str(e.value)
    assert len(load_dataset(isbi, "FLAIR", label="mask2")) == 4  # the other rater still has lesions


def test_a_complex_valued_image_is_refused(isbi):
    flair = isbi / PRE / "training01_02_flair_pp.nii"
    save_nii(flair, brain(0).astype(np.complex64))
    with pytest.raises(DataError, match="complex-valued") as e:
        load_dataset(isbi, "FLAIR")
    assert str(flair) in str(e.value)


def test_check_scan_sizes_names_the_smallest_scan(tmp_path):
    scans = [make_scan(np.ones((1, 20, 20, 20)), np.zeros((20, 20, 20)), "big_01"),
             make_scan(np.ones((1, 8, 12, 9)), np.zeros((8, 12, 9)), "small_01"),
             make_scan(np.ones((1, 12, 12, 12)), np.zeros((12, 12, 12)), "mid_01")]
    data.check_scan_sizes(scans, 8)
    with pytest.raises(DataError, match="^scan small_01: \\(8, 12, 9\\) voxels.*minimum of 13.*2 scan"):
        data.check_scan_sizes(scans, 13)
    image, _, _ = prepared(tmp_path, brain(0))
    data.check_scan_sizes([("new.nii.gz", image)], 8)
    with pytest.raises(DataError, match="new.nii.gz"):
        data.check_scan_sizes([("new.nii.gz", image)], 64)


def test_dataset_fingerprint(isbi, monkeypatch):
    fp = data.dataset_fingerprint(isbi)
    assert len(fp) == 16 and fp == data.dataset_fingerprint(str(isbi) + "/") == data.dataset_fingerprint(isbi / "training")
    monkeypatch.chdir(isbi.parent)
    assert data.dataset_fingerprint(isbi.name) == fp
    save_nii(isbi / PRE / "training01_02_flair_pp.nii", brain(0)[:, :, :-1])  # another size
    assert data.dataset_fingerprint(isbi) != fp


def test_dataset_fingerprint_covers_the_voxels(isbi):
    fp = data.dataset_fingerprint(isbi)
    flair = isbi / PRE / "training01_02_flair_pp.nii"
    content = bytearray(flair.read_bytes())
    content[-1] ^= 1  # one voxel edited in place: same name, same size
    flair.write_bytes(bytes(content))
    assert data.dataset_fingerprint(isbi) != fp


def test_dataset_fingerprint_covers_the_data_file_of_an_nrrd_header(miccai):
    fp = data.dataset_fingerprint(miccai)
    raw = miccai / "CHB_train_Part1/CHB_train_Case01/CHB_train_Case01_T1.raw"  # the data of an .nhdr
    content = bytearray(raw.read_bytes())
    content[0] ^= 1
    raw.write_bytes(bytes(content))
    assert data.dataset_fingerprint(miccai) != fp


def test_only_regular_files_are_opened(tmp_path, miccai):
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.nii"
    folder.mkdir()
    (tmp_path / "link.nii").symlink_to(tmp_path / "gone.nii")
    for path, says in [(fifo, "is a FIFO"), (folder, "is a folder, expected a file"),
                       (tmp_path / "link.nii", "dangling symlink"), (tmp_path / "absent.nii", "no such file")]:
        with pytest.raises(DataError, match=says) as e:
            read_image(path)
        assert str(path) in str(e.value)
    header = miccai / "CHB_train_Part1/CHB_train_Case01/CHB_train_Case01_FLAIR.nhdr"
    raw = header.with_suffix(".raw")
    raw.unlink()
    os.mkfifo(raw)  # the data file an .nhdr names
    with pytest.raises(DataError, match="is a FIFO.*the data file of") as e:
        read_image(header)
    assert str(raw) in str(e.value)


def test_unsafe_names():
    for name in ["pat01", "sub-01", "Case 7", "über"]:
        assert data.unsafe_name(name) is None
    for name, reason in [("", "empty"), ("..", "'..'"), ("a/b", "separator"), ("a\\b", "separator"),
                         ("a\nb", "control"), ("a\u202eb", "formatting"), ("x" * 201, "longer")]:
        assert reason in data.unsafe_name(name)


def test_statistics_do_not_overflow_float32():
    values = np.array([3e30, -3e30, 1e30, -1e30], np.float32)  # float32 squares overflow beyond 1.8e19
    mean, std = data._mean_std(values)
    assert mean == 0 and np.isclose(std, np.std(values.astype(np.float64), ddof=1), rtol=1e-6)
