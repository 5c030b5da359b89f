"""Sample DICOM — wraps a gray image as a chest radiograph DICOM dataset (used by tests, the demo and the benchmarks).

``wrap_image`` turns a 2-D gray array (display orientation, bright = dense) into a CR, DX or
Secondary Capture dataset in any transfer syntax of ``SUPPORTED_TRANSFER_SYNTAXES``; read back
through ``inference.dicom_pixels.dataset_to_gray`` it gives the same picture again (up to a
monotone scaling, plus the codec's error for lossy syntaxes). ``write_dataset`` saves it, as a
standard DICOM file or — for testing lenient readers — as a bare dataset without File Meta.

Encoders used per transfer syntax:

* Implicit / Explicit VR Little Endian, Explicit VR Big Endian, Deflated: native pixels
  (pydicom deflates when writing; Big Endian pixel words are byte-swapped here).
* RLE Lossless, JPEG-LS (lossless, near-lossless), JPEG 2000 (lossless, lossy):
  ``Dataset.compress`` (pydicom's RLE encoder, pyjpegls, pylibjpeg-openjpeg).
* JPEG Baseline (8-bit): Pillow.
* JPEG Extended (12-bit), JPEG Lossless (process 14, selection value 6) and JPEG Lossless SV1:
  dcmtk's ``dcmcjpeg`` on a temporary file; ``RuntimeError`` when dcmtk is not installed.

The identifiers are fake and the defaults are fixed, so fixtures never carry real patient data.
"""

import io
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset as write_bare_dataset
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

NATIVE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
LOSSY_TRANSFER_SYNTAXES: tuple[UID, ...] = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000)
# Every syntax dataset_to_gray is claimed to decode; the tests round-trip each one.
SUPPORTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    *NATIVE_TRANSFER_SYNTAXES,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
)

SOP_CLASSES = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "SC": SecondaryCaptureImageStorage,
}
_DEFAULT_MODALITY = {"CR": "CR", "DX": "DX", "SC": "OT"}
GRAY_PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")
COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "PALETTE COLOR")

_MAX_BITS = {JPEGBaseline8Bit: 8, JPEGExtended12Bit: 12}
_DCMCJPEG_OPTIONS = {JPEGExtended12Bit: "+ee", JPEGLossless: "+el", JPEGLosslessSV1: "+e1"}
_LOSSY_METHOD = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
}
JPEG_QUALITY = 90
J2K_COMPRESSION_RATIO = 15.0


def wrap_image(
    pixels: np.ndarray,
    *,
    sop_class: str = "CR",
    modality: str | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 8,
    transfer_syntax: str = ExplicitVRLittleEndian,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    view_position: str = "PA",
    body_part: str = "CHEST",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    patient_name: str = "Test^Patient",
    patient_id: str = "LV-TEST",
) -> Dataset:
    """Wrap a 2-D gray image (bright = dense) as a single-frame chest radiograph dataset.

    The image is min–max scaled to ``0 .. 2**bits_stored - 1`` and stored so that it displays
    the same way: MONOCHROME1 stores it inverted; RGB / YBR_FULL store three equal channels;
    PALETTE COLOR stores 8-bit indices into a gray ramp. Colour needs ``sop_class="SC"`` (CR
    and DX are gray by definition) and 8 bits. ``rescale`` is (slope, intercept) and
    ``window`` is (center, width) in rescaled units; DX gets identity rescale and a full-range
    window by default because its IOD requires them. Lossy JPEG of colour is stored as
    YBR_FULL_422, as DICOM requires.
    """
    transfer_syntax = UID(transfer_syntax)
    _check_arguments(pixels, sop_class, photometric, bits_stored, transfer_syntax)

    stored = scale_to_bits(pixels, bits_stored)
    max_value = 2**bits_stored - 1
    if photometric == "MONOCHROME1":
        stored = (max_value - stored).astype(stored.dtype)
    elif photometric == "RGB":
        stored = np.repeat(stored[..., None], 3, axis=2)
    elif photometric == "YBR_FULL":
        stored = convert_color_space(np.repeat(stored[..., None], 3, axis=2), "RGB", "YBR_FULL")

    ds = _base_dataset(
        sop_class=sop_class,
        modality=modality or _DEFAULT_MODALITY[sop_class],
        view_position=view_position,
        body_part=body_part,
        study_uid=study_uid or generate_uid(),
        series_uid=series_uid or generate_uid(),
        sop_instance_uid=sop_instance_uid or generate_uid(),
        patient_name=patient_name,
        patient_id=patient_id,
    )
    ds.set_pixel_data(stored, photometric, bits_stored, generate_instance_uid=False)
    if photometric == "PALETTE COLOR":
        _add_gray_palette(ds)

    if sop_class == "DX":
        rescale = rescale or (1.0, 0.0)
        slope, intercept = rescale
        window = window or (intercept + slope * max_value / 2, abs(slope) * (max_value + 1))
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = _ds_value(rescale[0]), _ds_value(rescale[1])
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = _ds_value(window[0]), _ds_value(window[1])

    _encode(ds, transfer_syntax)
    return ds


def scale_to_bits(pixels: np.ndarray, bits_stored: int) -> np.ndarray:
    """Min–max scale to ``0 .. 2**bits_stored - 1``: uint8 for 8 bits, uint16 above; constant → zeros."""
    values = np.asarray(pixels, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    return np.rint(unit * (2**bits_stored - 1)).astype(dtype)


def write_dataset(ds: Dataset, path: Path, *, with_file_meta: bool = True) -> Path:
    """Save ``ds`` to ``path``; returns ``path``.

    ``with_file_meta=True``: a standard DICOM file (preamble, "DICM", File Meta). ``False``:
    only the bare data set, no preamble and no File Meta, in the dataset's own native syntax
    (Implicit or Explicit VR Little Endian) — how some old modalities and scripts write.
    """
    path = Path(path)
    if with_file_meta:
        ds.save_as(path, enforce_file_format=True)
        return path
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        raise ValueError(f"a file without File Meta needs Implicit or Explicit VR Little Endian, not {syntax.name}")
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buffer.is_little_endian = True
    write_bare_dataset(buffer, ds)
    path.write_bytes(buffer.getvalue())
    return path


# --- building the dataset -------------------------------------------------------------------------


def _check_arguments(
    pixels: np.ndarray, sop_class: str, photometric: str, bits_stored: int, transfer_syntax: UID
) -> None:
    if np.ndim(pixels) != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {np.shape(pixels)}")
    if sop_class not in SOP_CLASSES:
        raise ValueError(f"sop_class must be one of {sorted(SOP_CLASSES)}, not {sop_class!r}")
    if photometric not in GRAY_PHOTOMETRICS + COLOUR_PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {GRAY_PHOTOMETRICS + COLOUR_PHOTOMETRICS}")
    if photometric in COLOUR_PHOTOMETRICS and sop_class != "SC":
        raise ValueError(f"{photometric} needs sop_class='SC': CR and DX images are gray")
    if photometric in COLOUR_PHOTOMETRICS and bits_stored != 8:
        raise ValueError(f"{photometric} fixtures are 8-bit only")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 8..16, not {bits_stored}")
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"transfer syntax {transfer_syntax} is not one of SUPPORTED_TRANSFER_SYNTAXES")
    if bits_stored > _MAX_BITS.get(transfer_syntax, 16):
        raise ValueError(f"{transfer_syntax.name} holds at most {_MAX_BITS[transfer_syntax]} bits, not {bits_stored}")
    if photometric == "PALETTE COLOR" and transfer_syntax in LOSSY_TRANSFER_SYNTAXES:
        raise ValueError("lossy compression of PALETTE COLOR indices is meaningless")
    if photometric in ("RGB", "YBR_FULL") and transfer_syntax in (JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1):
        raise ValueError(f"colour fixtures in {transfer_syntax.name} are not supported")


def _base_dataset(
    *,
    sop_class: str,
    modality: str,
    view_position: str,
    body_part: str,
    study_uid: str,
    series_uid: str,
    sop_instance_uid: str,
    patient_name: str,
    patient_id: str,
) -> Dataset:
    """Patient, study, series, equipment, image and SOP Common modules, without pixels."""
    now = datetime.now(UTC)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[sop_class]
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP_CLASSES[sop_class]
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "Lung Vision test fixtures"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["R", "F"] if view_position.upper() == "AP" else ["L", "F"]

    if sop_class == "SC":
        ds.ConversionType = "WSD"
    else:
        ds.ViewPosition = view_position
        ds.ImagerPixelSpacing = [0.2, 0.2]
    if sop_class == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.DetectorType = "DIRECT"
        ds.ContrastBolusAgent = ""
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
        ds.AnatomicRegionSequence = [_chest_code()] if body_part.upper() == "CHEST" else []
    return ds


def _chest_code() -> Dataset:
    """SNOMED CT "Chest" (51185008), the DX Anatomic Region for BodyPartExamined CHEST."""
    item = Dataset()
    item.CodeValue = "51185008"
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = "Chest"
    return item


def _add_gray_palette(ds: Dataset) -> None:
    """A 256-entry, 16-bit gray ramp in all three palette channels."""
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype("<u2").tobytes()
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", ramp)


def _ds_value(value: float) -> str:
    """A Decimal String value: at most 16 characters."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6g}"


# --- encoding -------------------------------------------------------------------------------------


def _encode(ds: Dataset, syntax: UID) -> None:
    """Re-encode the native (Explicit VR LE) pixel data of ``ds`` in ``syntax``, in place."""
    raw_size = len(ds.PixelData)
    if syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax  # pydicom deflates the whole data set on save
    elif syntax == ExplicitVRBigEndian:
        if ds.BitsAllocated == 16:
            words = np.frombuffer(ds.PixelData, dtype="<u2")
            ds.PixelData = words.astype(">u2").tobytes()
        if "RedPaletteColorLookupTableData" in ds:
            for colour in ("Red", "Green", "Blue"):
                keyword = f"{colour}PaletteColorLookupTableData"
                ds[keyword].value = np.frombuffer(ds[keyword].value, dtype="<u2").astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax in (RLELossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000):
        options: dict[str, Any] = {}
        if syntax == JPEGLSNearLossless:
            options["jls_error"] = min(255, 2 ** max(0, int(ds.BitsStored) - 8))
        if syntax == JPEG2000:
            options["j2k_cr"] = [J2K_COMPRESSION_RATIO]
        ds.compress(syntax, generate_instance_uid=False, **options)
    elif syntax == JPEGBaseline8Bit:
        _encode_with_pillow(ds)
    elif syntax in _DCMCJPEG_OPTIONS:
        _encode_with_dcmcjpeg(ds, syntax)
    else:
        raise ValueError(f"no fixture encoder for {syntax.name}")

    if syntax in LOSSY_TRANSFER_SYNTAXES:
        declare_lossy_compression(ds, raw_size)


def declare_lossy_compression(ds: Dataset, raw_size: int) -> None:
    """Say that ``ds``'s encapsulated Pixel Data went through lossy compression (General Image module, Type 1C):
    Lossy Image Compression 01, the ratio of ``raw_size`` (bytes uncompressed) to the fragments' size, and the
    method of its transfer syntax (one of ``LOSSY_TRANSFER_SYNTAXES``)."""
    encoded_size = sum(len(fragment) for fragment in generate_fragments(ds.PixelData))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = _ds_value(raw_size / max(encoded_size, 1))
    ds.LossyImageCompressionMethod = _LOSSY_METHOD[ds.file_meta.TransferSyntaxUID]


def _encode_with_pillow(ds: Dataset) -> None:
    """JPEG Baseline via Pillow: 'L' for gray, YCbCr 4:2:2 (YBR_FULL_422) for colour."""
    pixels = ds.pixel_array  # native, RGB for RGB and YBR_FULL alike
    buffer = io.BytesIO()
    if pixels.ndim == 2:
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=1)
        ds.PhotometricInterpretation = "YBR_FULL_422"
    _set_encapsulated(ds, buffer.getvalue(), JPEGBaseline8Bit)


def _encode_with_dcmcjpeg(ds: Dataset, syntax: UID) -> None:
    """JPEG Extended / Lossless / Lossless SV1 via dcmtk's dcmcjpeg on a temporary file."""
    executable = shutil.which("dcmcjpeg")
    if executable is None:
        raise RuntimeError(f"dcmcjpeg (dcmtk) is needed to encode {syntax.name} fixtures; install dcmtk")
    with tempfile.TemporaryDirectory(prefix="lv-dcmcjpeg-") as folder:
        source, target = Path(folder) / "in.dcm", Path(folder) / "out.dcm"
        ds.save_as(source, enforce_file_format=True)
        result = subprocess.run(
            [executable, _DCMCJPEG_OPTIONS[syntax], "+un", str(source), str(target)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"dcmcjpeg failed ({result.returncode}): {result.stderr.strip()[:500]}")
        encoded = pydicom.dcmread(target)
    if UID(encoded.file_meta.TransferSyntaxUID) != syntax:
        raise RuntimeError(f"dcmcjpeg wrote {encoded.file_meta.TransferSyntaxUID}, expected {syntax}")
    ds.PhotometricInterpretation = encoded.PhotometricInterpretation
    ds["PixelData"] = encoded["PixelData"]
    ds.file_meta.TransferSyntaxUID = syntax


def _set_encapsulated(ds: Dataset, codestream: bytes, syntax: UID) -> None:
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
