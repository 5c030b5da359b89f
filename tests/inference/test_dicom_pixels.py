"""DICOM pixel pipeline: fixtures made by sample_dicom round-trip through dicom_pixels; bad input is refused.

Every fixture is generated from one picture: a synthetic chest-like phantom (always) and one
real Kermany training image (when ../shared is present). The three real vendor files in
../shared/data/dicom_samples are decoded too, when present.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from inference.dicom_pixels import UnsupportedImage, dataset_to_gray, read_dicom_file
from inference.sample_dicom import (
    LOSSY_TRANSFER_SYNTAXES,
    SUPPORTED_TRANSFER_SYNTAXES,
    wrap_image,
    write_dataset,
)
from tests.kit.data import CHEST_XRAY, DICOM_SAMPLES
from tests.kit.dicom_checks import dciodvfy_path

TRAINING_IMAGE = CHEST_XRAY / "train" / "NORMAL" / "IM-0115-0001.jpeg"
VENDOR_FILES = ("dwv_1.dcm", "orthanc_1.dcm", "wg04rg1_1.dcm")
NEEDS_DCMTK = (JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)
# Bits stored per syntax in the round-trip test: what each codec holds, 16 where it can.
BITS_FOR_SYNTAX = {JPEGBaseline8Bit: 8, JPEGExtended12Bit: 12, JPEGLSNearLossless: 12, JPEG2000: 12}


def _phantom() -> np.ndarray:
    """A 160×192 chest-like phantom: soft gradient body, two dark lungs, a bright spine."""
    y, x = np.mgrid[0:160, 0:192].astype(np.float64)
    image = 120 + 0.3 * y + 10 * np.sin(x / 9)
    for centre_x in (55, 137):
        image[((x - centre_x) / 38) ** 2 + ((y - 75) / 55) ** 2 < 1] -= 80
    image[:, 88:104] += 90
    return image


@pytest.fixture(scope="module", params=["phantom", "training_image"])
def source(request) -> np.ndarray:
    """The picture every fixture wraps: the phantom, and the real training image when present."""
    if request.param == "phantom":
        return _phantom()
    if not TRAINING_IMAGE.exists():
        pytest.skip(f"{TRAINING_IMAGE} not present")
    with Image.open(TRAINING_IMAGE) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation after min–max normalisation of both images."""
    a = (a - a.min()) / np.ptp(a)
    b = (b - b.min()) / np.ptp(b)
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _round_trip(ds: Dataset, folder: Path, *, with_file_meta: bool = True) -> np.ndarray:
    """Write to disk and read back through the file entry point."""
    return read_dicom_file(write_dataset(ds, folder / "image.dcm", with_file_meta=with_file_meta))


def _refusal(ds: Dataset) -> UnsupportedImage:
    with pytest.raises(UnsupportedImage) as caught:
        dataset_to_gray(ds)
    return caught.value


# --- transfer syntaxes and bit depths -----------------------------------------------------------


@pytest.mark.parametrize("syntax", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda uid: uid.name)
def test_every_supported_transfer_syntax_round_trips(source, syntax, tmp_path):
    if syntax in NEEDS_DCMTK and shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk's dcmcjpeg is not installed")
    bits = BITS_FOR_SYNTAX.get(syntax, 16)
    encoded = wrap_image(source, transfer_syntax=syntax, bits_stored=bits)
    path = write_dataset(encoded, tmp_path / "image.dcm")

    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    gray = read_dicom_file(path)
    assert gray.dtype == np.float32 and gray.shape == source.shape
    if syntax in LOSSY_TRANSFER_SYNTAXES:
        assert encoded.LossyImageCompression == "01"
        assert _correlation(gray, source) > 0.99
    else:
        native = dataset_to_gray(wrap_image(source, bits_stored=bits))
        np.testing.assert_array_equal(gray, native)
        assert _correlation(gray, source) > 0.999


@pytest.mark.parametrize("bits", [8, 10, 12, 15, 16])
def test_bit_depths_keep_every_stored_value(source, bits, tmp_path):
    ds = wrap_image(source, bits_stored=bits)
    assert ds.BitsAllocated == (8 if bits == 8 else 16) and ds.HighBit == bits - 1
    gray = _round_trip(ds, tmp_path)
    np.testing.assert_array_equal(gray, ds.pixel_array.astype(np.float32))
    assert gray.max() == 2**bits - 1
    assert _correlation(gray, source) > 0.999


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian], ids=lambda uid: uid.name)
def test_file_without_file_meta_is_read(source, syntax, tmp_path):
    ds = wrap_image(source, bits_stored=12, transfer_syntax=syntax)
    path = write_dataset(ds, tmp_path / "bare.dcm", with_file_meta=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_dicom_file(path), dataset_to_gray(ds))


def test_compressed_dataset_cannot_be_written_without_file_meta(source, tmp_path):
    with pytest.raises(ValueError, match="File Meta"):
        write_dataset(wrap_image(source, transfer_syntax=JPEG2000Lossless), tmp_path / "x.dcm", with_file_meta=False)


# --- photometric interpretation and grayscale transforms -----------------------------------------


def test_monochrome1_is_inverted_to_display_orientation(source, tmp_path):
    ds = wrap_image(source, photometric="MONOCHROME1", bits_stored=12)
    assert _correlation(ds.pixel_array.astype(np.float64), source) < -0.99  # stored dark = dense
    assert _correlation(_round_trip(ds, tmp_path), source) > 0.99


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_stored_integers_give_exactly_the_float64_values(photometric):
    """Without rescale or window the image is computed on integers: it must equal the float64 result,
    also at the extremes of 16 bits (stored 1 and 65535: an inversion in 16 bits would wrap around)."""
    stored = np.array([[1, 2, 3, 40000], [65535, 65534, 12345, 7]], dtype=np.uint16).repeat(40, 0).repeat(20, 1)
    ds = wrap_image(stored, bits_stored=16)
    ds.PhotometricInterpretation, ds.PixelData = photometric, stored.tobytes()  # exactly these stored values
    values = ds.pixel_array.astype(np.float64)
    assert values.min() == 1 and values.max() == 65535
    expected = values.max() + values.min() - values if photometric == "MONOCHROME1" else values
    gray = dataset_to_gray(ds)
    assert gray.dtype == np.float32
    np.testing.assert_array_equal(gray, expected.astype(np.float32))


def test_presentation_lut_shape(source):
    # DX requires INVERSE with MONOCHROME1: the same inversion, not a second one.
    dx = wrap_image(source, sop_class="DX", photometric="MONOCHROME1", bits_stored=12)
    assert dx.PresentationLUTShape == "INVERSE"
    assert _correlation(dataset_to_gray(dx), source) > 0.99
    # INVERSE on MONOCHROME2 inverts the display.
    mono2 = wrap_image(source, bits_stored=12)
    mono2.PresentationLUTShape = "INVERSE"
    assert _correlation(dataset_to_gray(mono2), source) < -0.99


def test_rescale_slope_and_intercept_are_applied(source):
    ds = wrap_image(source, bits_stored=12, rescale=(2.0, -1024.0))
    expected = ds.pixel_array.astype(np.float64) * 2.0 - 1024.0
    np.testing.assert_array_equal(dataset_to_gray(ds), expected.astype(np.float32))


def test_window_center_and_width_are_applied(source):
    ds = wrap_image(source, bits_stored=12, window=(1500, 1000))
    stored = ds.pixel_array.astype(np.float64)
    # PS3.3 C.11.2.1.2.1 (LINEAR): below 1000 → black, above 1999 → white, linear between.
    expected = np.clip((stored - 1499.5) / 999 + 0.5, 0, 1) * 4095
    np.testing.assert_allclose(dataset_to_gray(ds), expected, atol=0.01)


def test_window_in_rescaled_units_after_rescale(source):
    ds = wrap_image(source, bits_stored=12, rescale=(0.5, 100.0), window=(1000, 500))
    values = ds.pixel_array.astype(np.float64) * 0.5 + 100.0
    gray = dataset_to_gray(ds)
    assert np.all(gray[values <= 750] == gray.min()) and np.all(gray[values > 1249] == gray.max())


@pytest.mark.parametrize("window", [(100000.0, 10.0), (-5000.0, 100.0), (2000.0, 0.0)])
def test_insane_window_is_ignored(source, window):
    ds = wrap_image(source, bits_stored=12, window=window)
    np.testing.assert_array_equal(dataset_to_gray(ds), ds.pixel_array.astype(np.float32))


def test_voi_lut_sequence_is_applied(source):
    ds = wrap_image(source, bits_stored=8)
    lut = np.rint(np.sqrt(np.arange(256) / 255) * 4095).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 12]
    item.LUTData = lut.tolist()
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 10, 5  # the LUT wins when both are sane
    np.testing.assert_array_equal(dataset_to_gray(ds), lut[ds.pixel_array].astype(np.float32))


def test_dataset_is_not_modified(source):
    ds = wrap_image(source, sop_class="DX", bits_stored=12, rescale=(1, 0), window=(2048, 4096))
    before = {element.keyword: str(element.value) for element in ds if element.keyword != "PixelData"}
    dataset_to_gray(ds)
    assert {element.keyword: str(element.value) for element in ds if element.keyword != "PixelData"} == before


@pytest.mark.parametrize(
    ("photometric", "syntax"),
    [
        ("RGB", ExplicitVRLittleEndian),
        ("YBR_FULL", ExplicitVRLittleEndian),
        ("PALETTE COLOR", ExplicitVRLittleEndian),
        ("RGB", JPEGBaseline8Bit),  # stored as YBR_FULL_422
        ("RGB", JPEG2000Lossless),
        ("RGB", DeflatedExplicitVRLittleEndian),
    ],
)
def test_colour_images_become_gray(source, photometric, syntax, tmp_path):
    ds = wrap_image(source, sop_class="SC", photometric=photometric, transfer_syntax=syntax)
    if syntax == JPEGBaseline8Bit:
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
    gray = _round_trip(ds, tmp_path)
    assert gray.ndim == 2
    assert _correlation(gray, source) > (0.99 if syntax in LOSSY_TRANSFER_SYNTAXES else 0.999)


# --- refusals ------------------------------------------------------------------------------------


def _without_pixel_data(ds: Dataset) -> None:
    del ds.PixelData


def _three_frames(ds: Dataset) -> None:
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3


def _photometric(value: str):
    def change(ds: Dataset) -> None:
        ds.PhotometricInterpretation = value

    return change


def _rows(value: int):
    def change(ds: Dataset) -> None:
        ds.Rows = value

    return change


def _bits_stored(value: int):
    def change(ds: Dataset) -> None:
        ds.BitsStored, ds.HighBit = value, value - 1

    return change


def _bits_allocated_32(ds: Dataset) -> None:
    ds.BitsAllocated = 32


def _truncated_native_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[:1000]


def _garbage_codestream(ds: Dataset) -> None:
    ds.PixelData = encapsulate([b"\x00\x11" * 400])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless


def _truncated_jpeg_ls(ds: Dataset) -> None:
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    fragment = next(pydicom.encaps.generate_fragments(ds.PixelData))
    ds.PixelData = encapsulate([fragment[:30]])


def _unsupported_syntax(ds: Dataset) -> None:
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML


@pytest.mark.parametrize(
    ("change", "reason", "message"),
    [
        (_without_pixel_data, "no_pixel_data", "no Pixel Data"),
        (_three_frames, "multi_frame", "3 frames"),
        (_photometric("YBR_PARTIAL_420"), "photometric", "YBR_PARTIAL_420 is not supported"),
        (_photometric("HSV"), "photometric", "HSV"),
        (_photometric(""), "photometric", "missing"),
        (_rows(20000), "dimensions", "20000"),
        (_rows(16), "dimensions", "16x"),
        (_bits_stored(6), "bit_depth", "Bits Stored 6"),
        (_bits_allocated_32, "bit_depth", "Bits Allocated 32"),
        (_truncated_native_pixels, "undecodable", "undecodable"),
        (_garbage_codestream, "undecodable", "undecodable"),
        (_truncated_jpeg_ls, "undecodable", "undecodable"),
        (_unsupported_syntax, "transfer_syntax", "not supported"),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_refusals_name_their_reason(change, reason, message):
    ds = wrap_image(_phantom(), bits_stored=12)
    change(ds)
    refusal = _refusal(ds)
    assert refusal.reason == reason
    assert message in str(refusal)


def test_tiny_image_is_refused():
    refusal = _refusal(wrap_image(np.arange(16 * 16, dtype=np.float64).reshape(16, 16)))
    assert refusal.reason == "dimensions"


def test_not_a_dicom_file_is_refused(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n" * 10)
    with pytest.raises(UnsupportedImage) as caught:
        read_dicom_file(path)
    assert caught.value.reason == "not_dicom"


# --- validity and real vendor files ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sop_class", "photometric", "syntax"),
    [
        ("CR", "MONOCHROME1", ExplicitVRLittleEndian),
        ("CR", "MONOCHROME2", JPEG2000),
        ("DX", "MONOCHROME1", ImplicitVRLittleEndian),
        ("SC", "RGB", JPEGBaseline8Bit),
    ],
)
def test_fixtures_pass_dciodvfy(sop_class, photometric, syntax, tmp_path):
    dciodvfy = dciodvfy_path()
    bits = 8 if syntax == JPEGBaseline8Bit else 12
    ds = wrap_image(_phantom(), sop_class=sop_class, photometric=photometric, bits_stored=bits, transfer_syntax=syntax)
    path = write_dataset(ds, tmp_path / "fixture.dcm")
    result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert errors == [] and result.returncode == 0


@pytest.mark.parametrize("name", VENDOR_FILES)
def test_real_vendor_files_decode_in_display_orientation(name):
    path = DICOM_SAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    assert pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
    gray = read_dicom_file(path)
    assert gray.ndim == 2 and gray.dtype == np.float32 and min(gray.shape) >= 400
    assert np.isfinite(gray).all() and np.ptp(gray) > 0
    # Bright = dense: the mediastinum/spine strip is brighter than both lung fields (PA chests).
    height, width = gray.shape
    band = (gray[int(0.3 * height) : int(0.6 * height)] - gray.min()) / np.ptp(gray)
    left_lung = band[:, int(0.2 * width) : int(0.38 * width)]
    right_lung = band[:, int(0.62 * width) : int(0.8 * width)]
    lungs = np.concatenate([left_lung.ravel(), right_lung.ravel()])
    mediastinum = band[:, int(0.45 * width) : int(0.55 * width)]
    assert mediastinum.mean() > lungs.mean() + 0.1
