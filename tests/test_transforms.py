"""Image loading and the geometry between image, model and low-res frames."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from segany import transforms as T


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_rgb_array_passes_through(rgb_image):
    out = T.load_image(rgb_image)
    assert out.dtype == np.uint8 and np.array_equal(out, rgb_image)


def test_grayscale_file(tmp_path):
    gray = np.arange(60 * 80, dtype=np.uint32).reshape(60, 80) % 256
    path = tmp_path / "g.png"
    Image.fromarray(gray.astype(np.uint8), mode="L").save(path)
    out = T.load_image(path)
    assert out.shape == (60, 80, 3)
    assert np.array_equal(out[..., 0], gray.astype(np.uint8))
    assert np.array_equal(out[..., 0], out[..., 2])


def test_rgba_drops_alpha(tmp_path):
    arr = np.zeros((10, 12, 4), np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 7
    path = tmp_path / "a.png"
    Image.fromarray(arr, mode="RGBA").save(path)
    out = T.load_image(path)
    assert out.shape == (10, 12, 3) and (out[..., 0] == 200).all() and (out[..., 1] == 0).all()
    assert T.load_image(arr).shape == (10, 12, 3)


def test_16bit_png_is_scaled(tmp_path):
    arr = np.full((8, 9), 65535, np.uint16)
    arr[0, 0] = 0
    arr[0, 1] = 32896  # ~ 128 * 257
    path = tmp_path / "d.png"
    Image.fromarray(arr).save(path)
    out = T.load_image(path)
    assert out.shape == (8, 9, 3)
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255 and out[0, 1, 0] == 128


def test_exif_rotation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # white stripe on the left
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    data = _png_bytes(img, format="JPEG", exif=exif.tobytes(), quality=95)
    out = T.load_image(data)
    assert out.shape == (40, 20, 3)
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # stripe moved to the top


def test_palette_and_bilevel(tmp_path):
    p = Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10)).convert("P")
    assert T.load_image(p).shape == (10, 10, 3)
    b = Image.fromarray(np.eye(10, dtype=bool))
    assert T.load_image(b).shape == (10, 10, 3)


def test_float_arrays():
    arr = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    out = T.load_image(arr)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    with pytest.raises(T.ImageError, match=r"\[0, 1\]"):
        T.load_image(arr * 3)
    with pytest.raises(T.ImageError, match="NaN"):
        T.load_image(np.full((4, 4), np.nan, np.float32))


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4, 4), bool), "mask"),
        (np.full((4, 4), 300, np.int32), "outside 0..255"),
        ("definitely-not-here.png", "no such image"),
        (b"this is not an image", "cannot read"),
        (42, "cannot use int"),
    ],
)
def test_bad_inputs_have_clear_errors(bad, match):
    with pytest.raises(T.ImageError, match=match):
        T.load_image(bad)


def test_truncated_and_non_image_files(tmp_path):
    good = _png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)), format="JPEG")
    (tmp_path / "t.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "n.jpg").write_text("hello")
    for name in ("t.jpg", "n.jpg"):
        with pytest.raises(T.ImageError, match="cannot read"):
            T.load_image(tmp_path / name)


def test_huge_image_refused(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(T.ImageError, match="above the limit"):
        T.load_image(path, max_pixels=300 * 200 - 1)
    assert T.load_image(path, max_pixels=300 * 200).shape == (200, 300, 3)


def test_preprocess_shape_and_coords():
    assert T.preprocess_shape(400, 600, 1024) == (683, 1024)
    assert T.preprocess_shape(512, 512, 1024) == (1024, 1024)
    c = T.coords_to_model(np.array([[600.0, 400.0], [0.0, 0.0]]), (400, 600), 1024)
    torch.testing.assert_close(c, torch.tensor([[1024.0, 683.0], [0.0, 0.0]]))
    b = T.boxes_to_model(np.array([[0.0, 0.0, 300.0, 200.0]]), (400, 600), 1024)
    torch.testing.assert_close(b, torch.tensor([[0.0, 0.0, 512.0, 341.5]]))


def test_model_input_is_normalised_and_padded(rgb_image):
    mean = torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1)
    std = torch.tensor([2.0, 2.0, 2.0]).view(3, 1, 1)
    x, size = T.to_model_input(rgb_image, img_size=128, pixel_mean=mean, pixel_std=std)
    assert x.shape == (1, 3, 128, 128) and size == (85, 128)
    assert (x[..., 85:, :] == 0).all()
    resized = T.resize_image(rgb_image, 128)
    torch.testing.assert_close(x[0, 0, :85], (torch.from_numpy(resized[..., 0]).float() - 10) / 2)
    # bit-equal to the plain (B, 3, h, w) normalise-then-pad, landscape and portrait,
    # with the real constants and padding on either axis
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    for img in (rgb_image, np.ascontiguousarray(rgb_image.transpose(1, 0, 2))):
        x, size = T.to_model_input(img, img_size=128, pixel_mean=mean, pixel_std=std)
        plain = torch.from_numpy(T.resize_image(img, 128)).permute(2, 0, 1)[None].float()
        want = T.normalize_and_pad(plain, img_size=128, pixel_mean=mean, pixel_std=std)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, want), size


def test_masks_to_image_geometry():
    low = torch.zeros(1, 1, 32, 32)
    low[..., :8, :16] = 10.0  # top-left quarter of the *valid* area for a 2:1 image
    out = T.masks_to_image(low, input_size=(64, 128), original_size=(50, 100), img_size=128)
    assert out.shape == (1, 1, 50, 100)
    m = out[0, 0] > 0
    assert m[:20, :45].all() and not m[30:].any() and not m[:, 55:].any()


@pytest.mark.parametrize(
    "original", [(480, 640), (640, 480), (300, 451), (15, 1000), (1000, 15), (2000, 1500)]
)
def test_image_tokens_cover_every_cell_the_resize_reads(original):
    """Logits zeroed outside ``image_tokens`` give the same image-size masks."""
    input_size = T.preprocess_shape(*original, 1024)
    rows, cols = T.image_tokens(input_size, 1024, (64, 64))
    assert rows <= 64 and cols <= 64
    low = torch.randn(1, 1, 256, 256)
    cut = torch.zeros_like(low)
    cut[..., : rows * 4, : cols * 4] = low[..., : rows * 4, : cols * 4]
    size = dict(input_size=input_size, original_size=original, img_size=1024)
    torch.testing.assert_close(T.masks_to_image(cut, **size), T.masks_to_image(low, **size))


def test_thin_images_keep_one_pixel():
    """Beyond 2048:1 the short side used to round to zero pixels."""
    assert T.preprocess_shape(1, 3000, 1024) == (1, 1024)
    assert T.preprocess_shape(9000, 2, 1024) == (1024, 1)
    assert T.preprocess_shape(1, 1, 1024) == (1024, 1024)
    img = np.full((1, 5000, 3), 7, np.uint8)
    assert T.resize_image(img, 1024).shape == (1, 1024, 3)
    c = T.coords_to_model(np.array([[2500.0, 0.5]]), (1, 5000), 1024)
    assert torch.allclose(c, torch.tensor([[512.0, 0.5]]))
