"""DICOM pixels — a pydicom dataset becomes a 2-D gray float image (bright = dense), or a clear refusal.

The pipeline, in the order DICOM defines it (PS3.4 N.2):

1. Refuse what we cannot analyse sanely, before spending time on decoding: no Pixel Data,
   more than one frame, absurd dimensions, bit depths outside 8..16, unknown photometric
   interpretations.
2. Decode the stored pixels (any transfer syntax pydicom has a working decoder for: native,
   deflated, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000). A decoder failure
   becomes ``UnsupportedImage(reason="undecodable")``.
3. Gray images (MONOCHROME1/2): Modality LUT or Rescale Slope/Intercept, then the VOI LUT or
   Window Center/Width when present and sane (see ``_apply_voi``), then inversion so that
   higher values are always brighter, i.e. denser (bone bright, lungs dark).
   Colour images (RGB, YBR_FULL, YBR_FULL_422, PALETTE COLOR): converted to RGB, then to
   luma with the ITU-R BT.601 weights Pillow uses for ``convert("L")``, so a colour DICOM
   and a colour JPEG of the same picture give the same gray image.

Inversion rule (``_is_inverted``):

* MONOCHROME1 means "minimum value is white": always inverted, exactly once.
* Presentation LUT Shape INVERSE on MONOCHROME1 is *not* a second inversion. The DX, MG and
  IO image IODs require INVERSE alongside MONOCHROME1 (and IDENTITY alongside MONOCHROME2);
  it restates the same inversion. Viewers that inverted twice were fixed for it.
* Presentation LUT Shape INVERSE on MONOCHROME2 is non-conformant in those IODs, but where it
  appears we follow the attribute's own meaning: the display is inverted.

The output scale is not meaningful (downstream min–max scales every image); only the order
of the values is. ``dataset_to_gray`` never modifies the dataset it is given.
"""

import copy
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

MIN_SIDE = 32
MAX_SIDE = 16384
MIN_BITS_STORED = 8
MAX_BITS_STORED = 16

GRAY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")
# ITU-R BT.601 luma, the weights Pillow's convert("L") uses.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)

# What pydicom raises on malformed bytes; OSError included because it reports truncated data
# as OSError ("No tag to read at file position ...") once the file itself is open.
_PARSE_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    EOFError,
    OSError,
    struct.error,
    ValueError,
    KeyError,
    TypeError,
    NotImplementedError,
    OverflowError,
)
# Image Pixel / presentation elements read before decoding.
_IMAGE_KEYWORDS = (
    "NumberOfFrames",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PresentationLUTShape",
)
# Elements the LUT stages read; they get copies so pydicom's helpers cannot alter the caller's ds.
_LUT_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)


class UnsupportedImage(ValueError):
    """The dataset holds no image we can analyse; ``reason`` says why in one machine-readable word.

    Reasons: ``not_dicom``, ``malformed``, ``no_pixel_data``, ``multi_frame``, ``dimensions``,
    ``bit_depth``, ``photometric``, ``transfer_syntax``, ``undecodable``, ``modality_lut``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_dicom_file(path: Path) -> np.ndarray:
    """Read a DICOM file (with or without preamble and File Meta) and return its gray image.

    A file pydicom cannot parse raises ``UnsupportedImage(reason="not_dicom")``; a missing or
    unreadable path raises the usual ``OSError``.
    """
    ds = read_dicom_dataset(path)
    return dataset_to_gray(ds)


def read_dicom_dataset(path: Path) -> Dataset:
    """``dcmread(force=True)`` plus a Transfer Syntax UID inferred for files without File Meta."""
    with Path(path).open("rb") as file:  # missing or unreadable paths raise OSError here
        try:
            ds = pydicom.dcmread(file, force=True)
        except _PARSE_ERRORS as exc:
            raise UnsupportedImage(f"not a DICOM file: {exc}", reason="not_dicom") from exc
    if len(ds) == 0 or not any(keyword in ds for keyword in ("PixelData", "SOPClassUID", "Rows")):
        raise UnsupportedImage("not a DICOM file: no image or SOP elements found", reason="not_dicom")
    if not ds.file_meta.get("TransferSyntaxUID"):
        inferred = _native_syntax_from_encoding(ds)
        if inferred is not None:
            ds.file_meta.TransferSyntaxUID = inferred
    return ds


def dataset_to_gray(ds: Dataset) -> np.ndarray:
    """Return the dataset's image as float32 rows×columns, higher = brighter = denser.

    Raises ``UnsupportedImage`` (with ``.reason``) for anything that is not one sane,
    decodable, single-frame 2-D image.
    """
    _parse_elements(ds, _IMAGE_KEYWORDS + _LUT_KEYWORDS)
    photometric = _check_image_pixel_module(ds)
    transfer_syntax = _transfer_syntax(ds)
    pixels, decoded_photometric = _decode(ds, transfer_syntax)

    if photometric in GRAY_PHOTOMETRICS:
        lut_view = _lut_view(ds, transfer_syntax)
        values = _apply_modality(pixels, lut_view)
        values = np.asarray(_apply_voi(values, lut_view))
        if _is_inverted(ds, photometric):
            # exact: stored integers (no rescale or window) in a wider integer, anything else in float64
            wide = (np.int32 if values.dtype.itemsize <= 2 else np.int64) if values.dtype.kind in "iu" else np.float64
            values = values.astype(wide)
            values = values.max() + values.min() - values
        gray = values  # to float32 below: the same values as through float64, with fewer passes
    else:
        gray = _colour_to_gray(pixels, decoded_photometric, ds)

    checked = gray.dtype.kind in "iu"  # integers are finite
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2:
        raise UnsupportedImage(f"decoded pixels have shape {gray.shape}, expected 2-D", reason="dimensions")
    if not checked and not np.isfinite(gray).all():
        raise UnsupportedImage("pixel values are not finite after the Modality LUT", reason="modality_lut")
    return gray


# --- refusals before decoding -------------------------------------------------------------------


def _parse_elements(ds: Dataset, keywords: tuple[str, ...]) -> None:
    """Parse the elements we will read now, so a malformed one is refused rather than crashing later.

    Datasets from dcmread and from network peers hold elements raw until first accessed.
    """
    for keyword in keywords:
        try:
            ds.get(keyword)
        except _PARSE_ERRORS as exc:
            raise UnsupportedImage(f"malformed {keyword} element: {exc}", reason="malformed") from exc


def _check_image_pixel_module(ds: Dataset) -> str:
    """Refuse datasets we will not decode; return the (upper-case) photometric interpretation."""
    if "PixelData" not in ds:
        other = [kw for kw in ("FloatPixelData", "DoubleFloatPixelData") if kw in ds]
        detail = f" (only {other[0]}, which is not a radiograph)" if other else ""
        raise UnsupportedImage(f"no Pixel Data{detail}", reason="no_pixel_data")

    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    if frames > 1:
        raise UnsupportedImage(f"{frames} frames; only single-frame images are analysed", reason="multi_frame")

    rows, columns = _int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))
    if rows is None or columns is None:
        raise UnsupportedImage("Rows or Columns missing", reason="dimensions")
    if not (MIN_SIDE <= rows <= MAX_SIDE and MIN_SIDE <= columns <= MAX_SIDE):
        raise UnsupportedImage(
            f"{rows}x{columns} pixels; each side must be {MIN_SIDE}..{MAX_SIDE}", reason="dimensions"
        )

    bits_allocated = _int_or_none(ds.get("BitsAllocated"))
    bits_stored = _int_or_none(ds.get("BitsStored"))
    if bits_allocated not in (8, 16):
        raise UnsupportedImage(f"Bits Allocated {bits_allocated}; only 8 or 16 are supported", reason="bit_depth")
    if bits_stored is None or not (MIN_BITS_STORED <= bits_stored <= min(MAX_BITS_STORED, bits_allocated)):
        raise UnsupportedImage(
            f"Bits Stored {bits_stored}; must be {MIN_BITS_STORED}..{MAX_BITS_STORED} "
            f"and at most Bits Allocated ({bits_allocated})",
            reason="bit_depth",
        )

    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if not photometric:
        raise UnsupportedImage("photometric interpretation missing", reason="photometric")
    if photometric not in GRAY_PHOTOMETRICS + COLOUR_PHOTOMETRICS:
        raise UnsupportedImage(f"photometric interpretation {photometric} is not supported", reason="photometric")
    return photometric


def _int_or_none(value: object) -> int | None:
    """An integer attribute value, or None when absent or unparseable (force-read files)."""
    if value is None or value == "":
        return None
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


# --- decoding -----------------------------------------------------------------------------------


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's Transfer Syntax UID, inferred from how it was read when File Meta lacks one."""
    file_meta = getattr(ds, "file_meta", None)
    declared = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if declared:
        return UID(declared)
    inferred = _native_syntax_from_encoding(ds)
    if inferred is None:
        raise UnsupportedImage(
            "undecodable: no Transfer Syntax UID and the encoding cannot be inferred",
            reason="undecodable",
        )
    return inferred


def _native_syntax_from_encoding(ds: Dataset) -> UID | None:
    """Native syntax matching how pydicom parsed a File-Meta-less dataset; None if compressed/unknown."""
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        return None  # encapsulated pixel data: the codec cannot be guessed from the encoding
    is_implicit, is_little = ds.original_encoding
    if is_implicit is None or is_little is None:
        return None
    if is_implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if is_little else ExplicitVRBigEndian


def _decode(ds: Dataset, transfer_syntax: UID) -> tuple[np.ndarray, str]:
    """Decode the single frame; return the pixels and their photometric interpretation after decoding.

    pydicom's decoders convert YBR_FULL / YBR_FULL_422 to RGB themselves and say so in the
    returned pixel properties.
    """
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        raise UnsupportedImage(
            f"transfer syntax {transfer_syntax.name} ({transfer_syntax}) is not supported",
            reason="transfer_syntax",
        ) from exc
    if not decoder.is_available:
        raise UnsupportedImage(
            f"no decoder plugin installed for {transfer_syntax.name} ({transfer_syntax})",
            reason="transfer_syntax",
        )
    try:
        options = as_pixel_options(ds)
        pixels, properties = decoder.as_array(ds, index=0, **options)
    except MemoryError:
        raise
    except Exception as exc:  # plugins raise RuntimeError, ValueError, struct.error, ... alike
        raise UnsupportedImage(f"undecodable {transfer_syntax.name} pixel data: {exc}", reason="undecodable") from exc
    return pixels, str(properties["photometric_interpretation"]).upper()


# --- gray pipeline --------------------------------------------------------------------------------


def _lut_view(ds: Dataset, transfer_syntax: UID) -> Dataset:
    """A small dataset holding copies of the LUT elements: pydicom's helpers rewrite some in place."""
    view = Dataset()
    view.file_meta = FileMetaDataset()
    view.file_meta.TransferSyntaxUID = transfer_syntax
    for keyword in _LUT_KEYWORDS:
        if keyword in ds:
            view[keyword] = copy.deepcopy(ds[keyword])
    return view


def _apply_modality(pixels: np.ndarray, view: Dataset) -> np.ndarray:
    """Modality LUT Sequence or Rescale Slope/Intercept (PS3.3 C.11.1); unchanged when absent."""
    try:
        return apply_modality_lut(pixels, view)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError, struct.error) as exc:
        raise UnsupportedImage(f"the Modality LUT / rescale cannot be applied: {exc}", reason="modality_lut") from exc


def _apply_voi(values: np.ndarray, view: Dataset) -> np.ndarray:
    """Apply the first VOI LUT, else the first window, when sane; otherwise keep the full range.

    Sane means: it parses, a window's width is valid for its VOI LUT Function, and the LUT's
    input range or the window overlaps the actual pixel range (a window that misses every
    pixel would give a constant image).
    """
    low, high = float(np.min(values)), float(np.max(values))
    lut_inputs = _sane_voi_lut_inputs(view, low, high)
    if lut_inputs is not None:
        # Values outside the LUT map to its first/last entry anyway; clipping first keeps
        # pydicom's uint16 index arithmetic from wrapping around.
        indices = np.clip(np.rint(values), *lut_inputs).astype(np.int64)
        return apply_voi(indices, view, index=0)
    if _window_is_sane(view, low, high):
        return apply_windowing(values, view, index=0)
    return values


def _sane_voi_lut_inputs(view: Dataset, low: float, high: float) -> tuple[int, int] | None:
    """(first, last) input value of the first VOI LUT when it is usable here, else None."""
    sequence = view.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    descriptor = item.get("LUTDescriptor")
    data = item.get("LUTData")
    if descriptor is None or data is None or len(descriptor) != 3:
        return None
    entries = int(descriptor[0]) or 2**16
    first_mapped, entry_bits = int(descriptor[1]), int(descriptor[2])
    if entry_bits not in (8, *range(10, 17)) or entries < 2:
        return None
    data_entries = len(data) // 2 if isinstance(data, bytes) else len(data)
    if data_entries < entries:
        return None
    last_mapped = first_mapped + entries - 1
    if first_mapped > high or last_mapped < low:
        return None
    return first_mapped, last_mapped


def _window_is_sane(view: Dataset, low: float, high: float) -> bool:
    if "WindowCenter" not in view or "WindowWidth" not in view:
        return False
    try:
        center = float(_first_value(view["WindowCenter"].value))
        width = float(_first_value(view["WindowWidth"].value))
    except (TypeError, ValueError, IndexError):  # an unreadable window is not used: the caller keeps the values
        return False  # unwindowed, and preprocessing stretches their own percentiles
    function = str(view.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        return False
    if not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        return False
    if function == "LINEAR" and width < 1:
        return False
    return center - width / 2 <= high and center + width / 2 >= low


def _first_value(value: Any) -> Any:
    """The first value of a possibly multi-valued element (VM 1-n)."""
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0]
    return value


def _is_inverted(ds: Dataset, photometric: str) -> bool:
    """True when the stored order is dark = dense; see the module docstring for the rule."""
    if photometric == "MONOCHROME1":
        return True
    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    return shape == "INVERSE"


# --- colour -----------------------------------------------------------------------------------------


def _colour_to_gray(pixels: np.ndarray, decoded_photometric: str, ds: Dataset) -> np.ndarray:
    """RGB / YBR_FULL(_422) / PALETTE COLOR pixels → BT.601 luma."""
    if decoded_photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(pixels, ds)
        except (ValueError, TypeError, IndexError, AttributeError, KeyError, NotImplementedError) as exc:
            raise UnsupportedImage(
                f"the PALETTE COLOR lookup table cannot be applied: {exc}", reason="photometric"
            ) from exc
    elif decoded_photometric in ("YBR_FULL", "YBR_FULL_422"):
        # pydicom normally converts already; this covers decoders that leave YCbCr as stored.
        rgb = convert_color_space(pixels, decoded_photometric, "RGB")
    elif decoded_photometric == "RGB":
        rgb = pixels
    else:
        raise UnsupportedImage(
            f"photometric interpretation {decoded_photometric} is not supported", reason="photometric"
        )
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise UnsupportedImage(f"colour pixels have shape {rgb.shape}, expected rows×columns×3", reason="photometric")
    return rgb[..., :3].astype(np.float64) @ _LUMA_WEIGHTS
