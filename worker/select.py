"""Selection — a study's instances are sorted into frontal chest radiographs to analyse and the rest,
each with the reason it is not analysed."""

from pydicom import Dataset

from dicom_node.identity import is_lung_vision_object

RADIOGRAPH_MODALITIES = {"CR", "DX"}
SECONDARY_CAPTURE_MODALITIES = {"OT", "SC", "CR", "DX"}
SECONDARY_CAPTURE_CLASSES = {"1.2.840.10008.5.1.4.1.1.7"}  # Secondary Capture Image Storage (single frame)
CHEST_BODY_PARTS = {"CHEST", "THORAX"}
FRONTAL_VIEWS = {"PA", "AP", ""}
CHEST_WORDS = ("CHEST", "THORAX", "THORAC", "LUNG", "CXR", "PNEUMO")


def _text(dataset: Dataset, keyword: str) -> str:
    return str(dataset.get(keyword, "") or "").strip().upper()


def _has_chest_hint(dataset: Dataset) -> bool:
    if _text(dataset, "BodyPartExamined") in CHEST_BODY_PARTS:
        return True
    descriptions = " ".join(_text(dataset, k) for k in ("StudyDescription", "SeriesDescription", "ProtocolName"))
    return any(word in descriptions for word in CHEST_WORDS)


def not_analysed_reason(dataset: Dataset) -> str | None:
    """None when ``dataset`` is a frontal chest radiograph to analyse, else the reason it is not."""
    if is_lung_vision_object(sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
                             series_instance_uid=str(dataset.get("SeriesInstanceUID", "")),
                             manufacturer=dataset.get("Manufacturer")):
        return "created by Lung Vision"
    modality = _text(dataset, "Modality")
    is_secondary_capture = str(dataset.get("SOPClassUID", "")) in SECONDARY_CAPTURE_CLASSES
    if is_secondary_capture:
        if modality not in SECONDARY_CAPTURE_MODALITIES or not _has_chest_hint(dataset):
            return "secondary capture without chest radiograph hints"
    elif modality not in RADIOGRAPH_MODALITIES:
        return f"modality {modality or 'missing'} is not a radiograph (CR/DX)"
    body_part = _text(dataset, "BodyPartExamined")
    if body_part and body_part not in CHEST_BODY_PARTS:
        return f"body part {body_part} is not the chest"
    view = _text(dataset, "ViewPosition")
    if view not in FRONTAL_VIEWS:
        return f"{'lateral' if view in {'LL', 'RL', 'LATERAL', 'LAT'} else 'non-frontal'} view (ViewPosition {view})"
    return None
