"""Tests for bnviz.stimuli: synthetic stimuli, bundled photos, image files, spec strings."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bnviz import stimuli
from bnviz.errors import StimulusError
from bnviz.stimuli import (
    COMPOSITIONS,
    PHOTOS,
    STIMULUS_KINDS,
    describe_stimulus,
    load_image,
    make_stimulus,
    make_stimulus_from_spec,
    parse_stimulus_spec,
)

SIZE = 32  # small: keeps the whole file fast
SYNTHETIC = ("uniform", "noise", "grating", "checkerboard", "image")


def _png(path, mode="RGB", size=(40, 30), fmt="PNG", **save_kw):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    im = Image.fromarray(arr, "RGBA")
    if mode == "P":
        im = im.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        im = im.convert(mode)
    im.save(path, format=fmt, **save_kw)
    return path


@pytest.fixture
def png_file(tmp_path):
    return _png(tmp_path / "picture.png")


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("kind", STIMULUS_KINDS)
def test_shape_dtype_range(kind, composition, png_file):
    params = {"path": str(png_file)} if kind == "file" else {}
    x = make_stimulus(kind, SIZE, 3, composition=composition, **params)
    assert x.shape == (3, 3, SIZE, SIZE)
    assert x.dtype == torch.float32
    assert x.device.type == "cpu"
    assert x.is_contiguous()
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_default_call_is_one_224_image(kind):
    assert make_stimulus(kind).shape == (1, 3, 224, 224)


@pytest.mark.parametrize("kind", STIMULUS_KINDS)
@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_first_image_is_the_requested_one(kind, composition, png_file):
    params = {"path": str(png_file)} if kind == "file" else {}
    single = make_stimulus(kind, SIZE, 1, seed=5, **params)
    batch = make_stimulus(kind, SIZE, 4, composition=composition, seed=5, **params)
    assert torch.equal(batch[0], single[0])


# ------------------------------------------------------------------------------ kinds


def test_uniform_value_exact():
    assert torch.equal(make_stimulus("uniform", SIZE), torch.ones(1, 3, SIZE, SIZE))
    x = make_stimulus("uniform", SIZE, 2, value=0.3)
    assert torch.all(x == torch.tensor(0.3, dtype=torch.float32))
    assert torch.all(make_stimulus("uniform", SIZE, value=0) == 0)


def test_noise_deterministic_per_seed():
    a = make_stimulus("noise", SIZE, 2, seed=3)
    b = make_stimulus("noise", SIZE, 2, seed=3)
    c = make_stimulus("noise", SIZE, 2, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    x = make_stimulus("noise", 128, mean=0.5, std=0.1)
    assert abs(float(x.mean()) - 0.5) < 0.01
    assert abs(float(x.std()) - 0.1) < 0.01
    # channels are independent noise, not one gray plane
    assert not torch.equal(x[0, 0], x[0, 1])


def test_grating_orientation_rotates():
    g0 = make_stimulus("grating", SIZE, orientation=0, frequency=4)[0, 0]
    g90 = make_stimulus("grating", SIZE, orientation=90, frequency=4)[0, 0]
    # 0°: every row identical (varies along x only), and it does vary along x
    assert torch.equal(g0, g0[:1].expand_as(g0))
    assert float(g0[0].max() - g0[0].min()) > 0.9
    # 90°: every column identical (varies along y only)
    assert torch.equal(g90, g90[:, :1].expand_as(g90))
    assert float(g90[:, 0].max() - g90[:, 0].min()) > 0.9
    assert torch.allclose(g90, g0.T, atol=1e-6)
    g45 = make_stimulus("grating", SIZE, orientation=45, frequency=4)[0, 0]
    assert not torch.equal(g45, g45[:1].expand_as(g45))
    assert not torch.equal(g45, g45[:, :1].expand_as(g45))


def test_grating_formula_phase_contrast_gray():
    size, f = 64, 4
    x = make_stimulus("grating", size, orientation=0, frequency=f, phase=90, contrast=0.5)[0]
    cols = np.arange(size)
    expected = 0.5 + 0.25 * np.sin(2 * np.pi * f * cols / size + np.pi / 2)
    np.testing.assert_allclose(x[0, 0].numpy(), expected, atol=1e-6)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    flat = make_stimulus("grating", size, contrast=0)
    assert torch.all(flat == 0.5)


def test_checkerboard():
    x = make_stimulus("checkerboard", SIZE, squares=4)[0, 0]
    cell = SIZE // 4
    assert float(x[0, 0]) == 1.0
    assert float(x[0, cell]) == 0.0
    assert float(x[cell, 0]) == 0.0
    assert float(x[cell, cell]) == 1.0
    assert float(x.mean()) == 0.5
    low = make_stimulus("checkerboard", SIZE, squares=4, contrast=0.5)
    assert set(low.unique().tolist()) == {0.25, 0.75}


def test_photos_load_and_differ():
    imgs = [make_stimulus("image", SIZE, name=name)[0] for name in PHOTOS]
    for name, img in zip(PHOTOS, imgs):
        assert img.shape == (3, SIZE, SIZE), name
        assert float(img.std()) > 0.02, name
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert not torch.allclose(imgs[i], imgs[j], atol=1e-3), (PHOTOS[i], PHOTOS[j])
    for required in ("chelsea", "coffee", "astronaut", "rocket"):
        assert required in PHOTOS
    # grayscale photos become RGB with equal channels; colour ones do not
    cam = imgs[PHOTOS.index("camera")]
    assert torch.equal(cam[0], cam[1])
    chelsea = imgs[PHOTOS.index("chelsea")]
    assert not torch.equal(chelsea[0], chelsea[2])


@pytest.mark.parametrize("name", PHOTOS)
def test_photos_are_the_pixels_scikit_image_gives(name):
    """bnviz reads the bundled files with Pillow (skipping the slow import of skimage.io);
    the arrays must be exactly what ``skimage.data`` returns, and each photo must come from
    that fast path (a renamed file would silently fall back to the slow one)."""
    import skimage.data

    ours = stimuli.photos._load_photo_array(name)
    theirs = (skimage.data.stereo_motorcycle()[0] if name == "motorcycle"
              else getattr(skimage.data, name)())
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    photo_file = stimuli.photos._PHOTO_FILES[name]
    assert os.path.isfile(os.path.join(skimage.data.data_dir, photo_file))


def test_photo_cache_is_not_aliased():
    a = make_stimulus("image", SIZE)
    a.zero_()
    assert float(make_stimulus("image", SIZE).max()) > 0


# ------------------------------------------------------------------------ compositions


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_copies_identical(kind):
    x = make_stimulus(kind, SIZE, 4, composition="copies")
    for i in range(1, 4):
        assert torch.equal(x[i], x[0])


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_different_all_distinct(kind):
    x = make_stimulus(kind, SIZE, 4, composition="different")
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(x[i], x[j]), (kind, i, j)


def test_different_details():
    u = make_stimulus("uniform", SIZE, 4, composition="different", value=1.0)
    assert u[:, 0, 0, 0].tolist() == [1.0, 0.75, 0.5, 0.25]
    u0 = make_stimulus("uniform", SIZE, 4, composition="different", value=0.0)
    assert sorted(u0[:, 0, 0, 0].tolist()) == [0.0, 0.25, 0.5, 0.75]

    g = make_stimulus("grating", SIZE, 2, composition="different", orientation=0)
    assert torch.allclose(g[1, 0], g[0, 0].T, atol=1e-6)  # 0° then 90°

    n = make_stimulus("noise", SIZE, 3, composition="different", seed=7)
    for i in range(3):
        assert torch.equal(n[i], make_stimulus("noise", SIZE, seed=7 + i)[0])

    photos = make_stimulus("image", SIZE, len(PHOTOS) + 1, composition="different",
                           name=PHOTOS[-1])
    assert torch.equal(photos[1], make_stimulus("image", SIZE, name=PHOTOS[0])[0])  # cycles

    c = make_stimulus("checkerboard", SIZE, 3, composition="different", squares=4)
    assert torch.equal(c[1], make_stimulus("checkerboard", SIZE, squares=8)[0])


def test_file_different_falls_back_to_jitter(png_file):
    a = make_stimulus("file", SIZE, 4, composition="different", path=png_file)
    b = make_stimulus("file", SIZE, 4, composition="jitter", path=png_file)
    assert torch.equal(a, b)


def test_jitter_deterministic_and_varied():
    a = make_stimulus("image", SIZE, 5, composition="jitter", seed=1)
    b = make_stimulus("image", SIZE, 5, composition="jitter", seed=1)
    c = make_stimulus("image", SIZE, 5, composition="jitter", seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[0], make_stimulus("image", SIZE)[0])
    for i in range(1, 5):
        assert not torch.equal(a[i], a[0])


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kind": "gratin"}, "grating"),
        ({"kind": "nonsense"}, "nonsense"),
        ({"kind": "uniform", "composition": "copy"}, "copies"),
        ({"kind": "uniform", "size": 8}, "size"),
        ({"kind": "uniform", "size": 2048}, "size"),
        ({"kind": "uniform", "size": 32.5}, "size"),
        ({"kind": "uniform", "batch_size": 0}, "Batch size"),
        ({"kind": "uniform", "batch_size": 257}, "Batch size"),
        ({"kind": "noise", "seed": -1}, "Seed"),
        ({"kind": "uniform", "value": 1.5}, "'value'"),
        ({"kind": "uniform", "value": "bright"}, "'value'"),
        ({"kind": "uniform", "value": True}, "'value'"),
        ({"kind": "uniform", "value": float("nan")}, "'value'"),
        ({"kind": "uniform", "valu": 1}, "'valu'"),
        ({"kind": "noise", "std": -0.1}, "'std'"),
        ({"kind": "grating", "orientaton": 45}, "orientation"),
        ({"kind": "grating", "contrast": 2}, "'contrast'"),
        ({"kind": "grating", "frequency": 100, "size": 64}, "'frequency'"),
        ({"kind": "checkerboard", "squares": 2.5}, "'squares'"),
        ({"kind": "checkerboard", "squares": 0}, "'squares'"),
        ({"kind": "image", "name": "chelse"}, "chelsea"),
        ({"kind": "image", "name": 3}, "'name'"),
        ({"kind": "file"}, "'path'"),
    ],
)
def test_bad_arguments(kwargs, needle):
    kwargs = {"size": SIZE, **kwargs}
    kind = kwargs.pop("kind")
    with pytest.raises(StimulusError) as info:
        make_stimulus(kind, **kwargs)
    assert needle in str(info.value)
    assert info.value.fix  # every error says how to fix it


def test_bad_kind_lists_kinds_and_suggests():
    with pytest.raises(StimulusError) as info:
        make_stimulus("checkerbord")
    msg = str(info.value)
    assert "'checkerbord'" in msg and "did you mean 'checkerboard'" in msg
    assert all(k in msg for k in STIMULUS_KINDS)


def test_integral_float_accepted_for_int_params():
    a = make_stimulus("checkerboard", SIZE, 2.0, squares=4.0)
    assert torch.equal(a, make_stimulus("checkerboard", SIZE, 2, squares=4))


# ------------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("uniform", ("uniform", {})),
        ("  Uniform  ", ("uniform", {})),
        ("uniform:value=0.5", ("uniform", {"value": 0.5})),
        ("image:chelsea", ("image", {"name": "chelsea"})),
        ("image:name=coffee", ("image", {"name": "coffee"})),
        ("grating:orientation=45,frequency=4", ("grating", {"orientation": 45, "frequency": 4})),
        ("grating: orientation = 45 , phase=1.5,", ("grating", {"orientation": 45, "phase": 1.5})),
        ("noise:seed=3", ("noise", {"seed": 3})),
        ("noise:mean=0.4,std=1e-1", ("noise", {"mean": 0.4, "std": 0.1})),
        ("checkerboard:squares=4", ("checkerboard", {"squares": 4})),
        ("file:/path/x.png", ("file", {"path": "/path/x.png"})),
        ("file:path=/a,b/x.png", ("file", {"path": "/a,b/x.png"})),
        ("missing/photo.JPG", ("file", {"path": "missing/photo.JPG"})),
        ("shot.webp", ("file", {"path": "shot.webp"})),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_stimulus_spec(spec) == expected


def test_parse_spec_value_types():
    _, params = parse_stimulus_spec("grating:orientation=45,frequency=4.5")
    assert type(params["orientation"]) is int and type(params["frequency"]) is float


def test_parse_spec_existing_path_without_extension(tmp_path):
    path = _png(tmp_path / "noext")
    assert parse_stimulus_spec(str(path)) == ("file", {"path": str(path)})
    x = make_stimulus_from_spec(str(path), SIZE)
    assert x.shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "Empty"),
        ("gratng", "did you mean 'grating'"),
        ("grating:45", "'45'"),
        ("grating:orientation=", "'orientation='"),
        ("grating:=4", "'=4'"),
        ("grating:orientation=1,orientation=2", "twice"),
        ("grating:orientation=abc", "'orientation'"),
        ("grating:freq=4", "'freq'"),
        ("uniform:value=2", "'value'"),
        ("uniform:", "nothing after"),
        ("image:kitten", "'kitten'"),
        ("noise:seed=-2", "Seed"),
        ("noise:seed=1.5", "Seed"),
        ("file:", "no file"),
    ],
)
def test_parse_spec_errors(spec, needle):
    with pytest.raises(StimulusError) as info:
        parse_stimulus_spec(spec)
    assert needle in str(info.value)
    assert info.value.fix


def test_make_from_spec():
    x = make_stimulus_from_spec("uniform:value=0.25", SIZE, 2)
    assert x.shape == (2, 3, SIZE, SIZE) and torch.all(x == 0.25)
    a = make_stimulus_from_spec("noise:seed=3", SIZE)
    assert torch.equal(a, make_stimulus("noise", SIZE, seed=3))
    assert torch.equal(make_stimulus_from_spec("noise", SIZE, seed=3), a)
    g = make_stimulus_from_spec("grating:orientation=90", SIZE, 3, composition="different")
    assert g.shape == (3, 3, SIZE, SIZE)


def test_make_from_spec_missing_file():
    with pytest.raises(StimulusError) as info:
        make_stimulus_from_spec("no/such/dir/cat.png", SIZE)
    assert "cat.png" in str(info.value) and "does not exist" in str(info.value)


def test_describe():
    assert describe_stimulus("grating", orientation=45, frequency=4) == (
        "grating (orientation 45°, 4 cycles/image, phase 0°, contrast 1)"
    )
    assert describe_stimulus("uniform") == "uniform (value 1)"
    assert "seed 3" in describe_stimulus("noise", seed=3)
    assert describe_stimulus("checkerboard", squares=4) == "checkerboard (4×4 squares, contrast 1)"
    assert describe_stimulus("image", name="coffee") == "image (coffee)"
    assert describe_stimulus("file", path="/a/b/pic.png") == "file (pic.png)"
    with pytest.raises(StimulusError, match="'colour'"):
        describe_stimulus("uniform", colour=1)


# -------------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    ("mode", "fmt", "suffix"),
    [
        ("RGB", "PNG", ".png"),
        ("RGB", "JPEG", ".jpg"),
        ("RGBA", "PNG", ".png"),
        ("L", "PNG", ".png"),
        ("LA", "PNG", ".png"),
        ("P", "PNG", ".png"),
        ("P", "GIF", ".gif"),
        ("1", "BMP", ".bmp"),
        ("CMYK", "JPEG", ".jpg"),
        ("RGB", "TIFF", ".tiff"),
        ("RGB", "WEBP", ".webp"),
    ],
)
def test_load_image_modes(tmp_path, mode, fmt, suffix):
    path = _png(tmp_path / f"img_{mode}{suffix}", mode=mode, fmt=fmt)
    x = load_image(path, SIZE)
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x.std()) > 0.01
    if mode in ("L", "LA", "1"):
        assert torch.equal(x[0], x[1])


def test_load_image_matches_pixels_when_no_resize(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path / "exact.png"
    Image.fromarray(arr).save(path)
    x = load_image(str(path), SIZE)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), arr / 255.0, atol=1e-6)


def test_load_image_center_crop(tmp_path):
    # wide image: left third black, middle white, right third black -> crop is white
    arr = np.zeros((60, 180, 3), dtype=np.uint8)
    arr[:, 60:120] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    x = load_image(path, SIZE)
    assert float(x[:, :, 2:-2].min()) > 0.9


def test_load_image_transparent_is_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(path)
    assert torch.all(load_image(path, SIZE) == 1.0)


def test_load_image_16bit_gray_rescaled(tmp_path):
    arr = np.full((20, 20), 32768, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    x = load_image(path, SIZE)
    assert abs(float(x.mean()) - 0.5) < 0.01


def test_load_image_bytes_and_filelike(png_file):
    ref = load_image(png_file, SIZE)
    data = png_file.read_bytes()
    assert torch.equal(load_image(data, SIZE), ref)
    assert torch.equal(load_image(bytearray(data), SIZE), ref)
    assert torch.equal(load_image(io.BytesIO(data), SIZE), ref)
    with open(png_file, "rb") as fh:
        assert torch.equal(load_image(fh, SIZE), ref)
    assert torch.equal(load_image(os.fspath(png_file), SIZE), ref)


def test_file_kind_matches_load_image(png_file):
    x = make_stimulus("file", SIZE, 2, path=png_file)
    assert torch.equal(x[0], load_image(png_file, SIZE))
    assert torch.equal(x[1], x[0])


def _raises(source, needle, **kw):
    with pytest.raises(StimulusError) as info:
        load_image(source, SIZE, **kw)
    msg = str(info.value)
    assert needle in msg, msg
    assert info.value.fix
    return msg


def test_refuse_missing_file(tmp_path):
    _raises(tmp_path / "nope.png", "nope.png")
    _raises(str(tmp_path / "nope.png"), "does not exist")


def test_refuse_directory(tmp_path):
    _raises(tmp_path, "directory")


def test_refuse_corrupt_file(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    msg = _raises(path, "garbage.png")
    assert "Could not read image" in msg and "PNG or JPEG" in msg


def test_refuse_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _raises(path, "empty.png")


def test_refuse_truncated_png(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    full = _png(tmp_path / "full.png", size=(200, 200))
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    msg = _raises(cut, "cut.png")
    assert "Could not read image" in msg


def test_refuse_truncated_jpeg_bytes(tmp_path):
    full = _png(tmp_path / "full.jpg", size=(200, 200), fmt="JPEG")
    data = full.read_bytes()[:300]
    _raises(data, "upload.jpg", name="upload.jpg")


def test_refuse_too_many_bytes(png_file, monkeypatch):
    monkeypatch.setattr(stimuli.files, "MAX_IMAGE_BYTES", 100)
    _raises(png_file, "picture.png")
    _raises(png_file, "limit")
    _raises(png_file.read_bytes(), "limit")
    _raises(io.BytesIO(png_file.read_bytes()), "limit")


def test_byte_cap_checked_before_reading(png_file, monkeypatch):
    import builtins

    monkeypatch.setattr(stimuli.files, "MAX_IMAGE_BYTES", 100)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        assert os.fspath(file) != os.fspath(png_file), "oversized file was opened"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    _raises(png_file, "limit")


def test_refuse_too_many_pixels(png_file, monkeypatch):
    monkeypatch.setattr(stimuli.files, "MAX_IMAGE_PIXELS", 100)
    msg = _raises(png_file, "picture.png")
    assert "40×30" in msg and "pixels" in msg


def test_refuse_pillow_decompression_bomb(png_file, monkeypatch):
    # Pillow's own limit (lower than ours here) raises DecompressionBombError past 2x and
    # warns past 1x; both must come out as StimulusError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30 // 3)
    _raises(png_file, "too large")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    _raises(png_file, "too large")


def test_refuse_bad_source_type():
    _raises(12345, "int")
    _raises(io.StringIO("not binary"), "text mode")
    _raises("", "No image path")


def test_file_stimulus_errors_name_the_file(tmp_path):
    with pytest.raises(StimulusError, match="ghost.png"):
        make_stimulus("file", SIZE, path=tmp_path / "ghost.png")
    with pytest.raises(StimulusError, match="ghost.png"):
        make_stimulus_from_spec(f"file:{tmp_path / 'ghost.png'}", SIZE)


@pytest.mark.parametrize("text", ["/etc/passwd", "/surely/missing/x.png", "file:/etc/passwd",
                                  "photo.jpg", "~/cat.png", "./here", "C:\\cat.png"])
def test_text_from_a_browser_never_names_a_file(text, monkeypatch):
    """files=False (links, text boxes): one message for every path, and the file system is
    never asked whether it exists."""
    def no_fs(*args, **kwargs):
        raise AssertionError("the file system was consulted")

    monkeypatch.setattr(os.path, "exists", no_fs)
    with pytest.raises(StimulusError) as err:
        parse_stimulus_spec(text, files=False)
    assert str(err.value) == str(stimuli.spec.NO_FILES)
    assert parse_stimulus_spec("image:chelsea", files=False) == ("image", {"name": "chelsea"})
    with pytest.raises(StimulusError, match="Unknown stimulus kind"):
        parse_stimulus_spec("nonsense-kind", files=False)
