"""Heatmap Secondary Capture — a source radiograph and its overlay picture become a colour SC image
in the same study (patient and study attributes copied by highdicom from the source's clean
reference header, see ``source_header``).

Its pixels are JPEG Baseline by default (highdicom's encoder: quality 95, YBR_FULL_422, declared as
lossy compression): ≈ 20× smaller than the 2.5 MB of an uncompressed 1024×819 RGB picture, which every
hop — the outbox's fsync, the C-STORE, the PACS's storage — pays for (issue 12). ``compression="none"``
(``worker.sc_compression``) keeps them uncompressed RGB."""

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit

from common.identity import MANUFACTURER
from config.settings import ScCompression
from inference.sample_dicom import declare_lossy_compression
from worker.encode.charset import declare_character_set
from worker.encode.equipment import Algorithm
from worker.encode.source_header import complete_source_header, require_references

SERIES_DESCRIPTION = "Lung Vision pneumonia heatmap (not for diagnostic use)"
_VALID_ORIENTATION_LETTERS = set("APRLHF")
# compression → (transfer syntax, photometric interpretation of the encoded pixels)
_ENCODINGS: dict[str, tuple[UID, str]] = {
    "jpeg": (JPEGBaseline8Bit, "YBR_FULL_422"),  # highdicom encodes the RGB array as YCbCr (PS3.5 8.2.1)
    "none": (ExplicitVRLittleEndian, "RGB"),
}


def _patient_orientation(header: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is a valid pair of direction codes, else None."""
    values = header.get("PatientOrientation") or []
    values = [values] if isinstance(values, str) else list(values)
    if len(values) == 2 and all(value and set(value) <= _VALID_ORIENTATION_LETTERS for value in values):
        return values[0], values[1]
    return None


def build_heatmap_sc(
    source: Dataset,
    overlay_rgb: np.ndarray,
    *,
    algorithm: Algorithm,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    compression: ScCompression = "jpeg",
) -> hd.sc.SCImage:
    """A Secondary Capture Image: the source image with the heatmap and legend burned in.

    ``overlay_rgb`` is the H×W×3 uint8 picture from ``inference.overlay.render_overlay``. The SC is
    DERIVED\\SECONDARY, says BurnedInAnnotation YES, references its source instance, and names
    Lung Vision in Manufacturer, Software Versions and Contributing Equipment; with ``compression``
    "jpeg" it is JPEG Baseline and says so (Lossy Image Compression 01, its ratio and method). Raises
    ValueError for a picture that is not H×W×3 uint8 or a source without the UIDs the SC refers to it by.
    """
    if overlay_rgb.ndim != 3 or overlay_rgb.shape[2] != 3 or overlay_rgb.dtype != np.uint8:
        raise ValueError(
            f"the overlay must be an H×W×3 uint8 RGB picture (render_overlay's), "
            f"got shape {overlay_rgb.shape} of {overlay_rgb.dtype}"
        )
    require_references(source, "the source image")
    header = complete_source_header(source)
    orientation = _patient_orientation(header)
    transfer_syntax, photometric_interpretation = _ENCODINGS[compression]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=overlay_rgb,
        photometric_interpretation=photometric_interpretation,
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=transfer_syntax,
        contributing_equipment=[algorithm.contributing_equipment()],
    )
    if orientation is None:
        # Type 2: unknown stays empty rather than guessed (highdicom types the attribute as a list)
        sc.PatientOrientation = ""  # type: ignore[assignment]
    sc.Laterality = header.get("Laterality", "")  # Type 2C for paired body parts: empty when unknown (or invalid)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = SERIES_DESCRIPTION
    sc.SoftwareVersions = algorithm.software_versions  # type: ignore[assignment]  # highdicom: str or 1-tuple
    sc.ManufacturerModelName = algorithm.name
    sc.DerivationDescription = "Grad-CAM heatmap and legend blended over the source image"
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    if transfer_syntax.is_encapsulated:
        declare_lossy_compression(sc, overlay_rgb.nbytes)
    return declare_character_set(sc)
