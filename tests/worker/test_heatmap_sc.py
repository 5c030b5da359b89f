"""The heatmap Secondary Capture on its own: a small synthetic radiograph and heatmap become an SC
that says what it is, stays in the source's study, carries the legend in its pixels and passes
dciodvfy; a picture or source it cannot use is refused with a clear error."""

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from inference.overlay import HEAT_FLOOR, display_size, legend_lines, render_overlay
from inference.sample_dicom import wrap_image
from tests.kit.dicom_checks import SC_CLASS, dciodvfy_errors
from worker.encode.equipment import Algorithm
from worker.encode.heatmap_sc import SERIES_DESCRIPTION, build_heatmap_sc
from worker.pipeline import write_outputs

ALGORITHM = Algorithm("lungvision-resnet18", "1.0.0", "ab" * 32)
ROWS, COLUMNS = 600, 480
MAX_LONG_SIDE = 320


def phantom() -> np.ndarray:
    """A gray test image: smooth ribs-like stripes over a vertical gradient."""
    rows, columns = np.mgrid[0:ROWS, 0:COLUMNS]
    return ((np.sin(rows / 11.0) + 1) * 40 + rows / ROWS * 120 + columns / COLUMNS * 30).astype(np.float32)


def hot_spot(shape: tuple[int, int], peak: float) -> np.ndarray:
    """A heatmap of ``shape``: one round spot of heat ``peak`` at three quarters down, three quarters right."""
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]]
    distance = np.hypot(rows / shape[0] - 0.75, columns / shape[1] - 0.75)
    return (np.clip(1 - distance / 0.15, 0, 1) * peak).astype(np.float32)


def build(source, picture, compression="none"):
    return build_heatmap_sc(
        source,
        picture,
        algorithm=ALGORITHM,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9901,
        instance_number=3,
        compression=compression,
    )


@pytest.fixture
def source():
    return wrap_image(phantom(), bits_stored=12, study_uid=generate_uid(), patient_name="Sc^Test", patient_id="SC-1")


@pytest.fixture
def picture() -> np.ndarray:
    size = display_size((ROWS, COLUMNS), MAX_LONG_SIDE)
    return render_overlay(
        phantom(), hot_spot(size, 0.9), legend_lines(0.9, True, 0.5, "lungvision-resnet18 1.0.0"), MAX_LONG_SIDE
    )


def test_the_picture_has_the_display_size() -> None:
    assert display_size((2500, 2000), 1024) == (1024, 819)
    assert display_size((2000, 2500), 1024) == (819, 1024)
    assert display_size((300, 200), 1024) == (300, 200)  # never enlarged


def test_sc_is_a_derived_secondary_capture_in_the_source_study(source, picture, tmp_path) -> None:
    sc = build(source, picture)
    assert sc.SOPClassUID == SC_CLASS
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID and sc.SeriesNumber == 9901 and sc.InstanceNumber == 3
    assert (sc.PatientName, sc.PatientID) == (source.PatientName, source.PatientID)
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
    assert sc.SeriesDescription == SERIES_DESCRIPTION and sc.Manufacturer == "Lung Vision"
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert (sc.Rows, sc.Columns) == display_size((ROWS, COLUMNS), MAX_LONG_SIDE) == picture.shape[:2]
    reference = sc.SourceImageSequence[0]
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    assert "Lung Vision" in [item.Manufacturer for item in sc.ContributingEquipmentSequence]

    (path,) = write_outputs([sc], tmp_path / "outbox")
    assert dciodvfy_errors(path) == []
    assert np.array_equal(dcmread(path).pixel_array, picture)


def test_a_jpeg_sc_says_it_is_lossy_and_shows_the_same_picture(source, picture, tmp_path) -> None:
    """The default: JPEG Baseline (YCbCr, as PS3.5 asks of lossy colour JPEG), declared as lossy
    compression, several times smaller, and decoded back to the picture within JPEG's error."""
    sc = build(source, picture, compression="jpeg")
    assert sc.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel) == ("YBR_FULL_422", 3)
    assert (sc.LossyImageCompression, sc.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert float(sc.LossyImageCompressionRatio) > 4
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"

    (path,) = write_outputs([sc], tmp_path / "outbox")
    assert dciodvfy_errors(path) == []
    decoded = dcmread(path).pixel_array.astype(int)  # pydicom: back to RGB
    assert decoded.shape == picture.shape
    assert np.abs(decoded - picture).mean() < 2.0


def test_the_legend_and_colour_bar_are_burned_into_the_pixels(picture) -> None:
    top = picture[: picture.shape[0] // 4].astype(int)
    assert (top == 0).all(axis=2).any() and (top == 255).all(axis=2).any()  # white text on the black box
    red, blue = top[..., 0] - top[..., 2], top[..., 2] - top[..., 0]
    assert red.max() > 100 and blue.max() > 100  # both ends of the heat scale
    rest = picture[picture.shape[0] // 3 : picture.shape[0] // 2].astype(int)  # under the legend, away from the heat
    assert (rest[..., 0] == rest[..., 1]).all() and (rest[..., 1] == rest[..., 2]).all()


def test_heat_is_shown_where_it_is_and_only_above_the_floor() -> None:
    size = display_size((ROWS, COLUMNS), MAX_LONG_SIDE)
    legend = legend_lines(0.1, False, 0.5, "m 1")
    hot = render_overlay(phantom(), hot_spot(size, 0.9), legend, MAX_LONG_SIDE).astype(int)
    spot = hot[int(size[0] * 0.75), int(size[1] * 0.75)]
    assert spot[0] - spot[2] > 40  # the peak is tinted red
    faint = render_overlay(phantom(), hot_spot(size, HEAT_FLOOR * 0.9), legend, MAX_LONG_SIDE).astype(int)
    below = faint[faint.shape[0] // 3 :]
    assert (below[..., 0] == below[..., 2]).all()  # heat under the floor is not coloured at all


def test_a_full_size_heatmap_gives_the_same_picture_as_one_at_the_display_size() -> None:
    """The worker asks the model for heatmaps at the SC's size; ``lungvision analyze`` passes the
    image's: both must show the same picture."""
    size = display_size((ROWS, COLUMNS), MAX_LONG_SIDE)
    legend = legend_lines(0.9, True, 0.5, "m 1")
    small = render_overlay(phantom(), hot_spot(size, 0.9), legend, MAX_LONG_SIDE).astype(int)
    full = render_overlay(phantom(), hot_spot((ROWS, COLUMNS), 0.9), legend, MAX_LONG_SIDE).astype(int)
    assert small.shape == full.shape
    assert np.abs(small - full).mean() < 1.0 and np.abs(small - full).max() <= 24


@pytest.mark.parametrize("shape, dtype", [((40, 30), np.uint8), ((40, 30, 3), np.float32), ((40, 30, 4), np.uint8)])
def test_a_picture_that_is_not_8_bit_rgb_is_refused(source, shape, dtype) -> None:
    with pytest.raises(ValueError, match=r"H×W×3 uint8 RGB picture"):
        build(source, np.zeros(shape, dtype))


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"])
def test_a_source_without_its_uids_is_refused_by_name(source, picture, keyword) -> None:
    delattr(source, keyword)
    with pytest.raises(ValueError, match=f"source image has no {keyword}"):
        build(source, picture)


def test_the_source_is_named_as_acquisition_equipment_from_a_remembered_answer(source, picture) -> None:
    """highdicom's question "is the source's SOP class an image?" is answered once per class (worker/encode/
    equipment.py), with the answers of the scan it replaces: the source's equipment still comes first."""
    import inspect

    import highdicom.base_content
    from highdicom._standard_utils import does_iod_have_pixel_data

    remembered = highdicom.base_content.does_iod_have_pixel_data
    assert remembered is not does_iod_have_pixel_data and inspect.unwrap(remembered) is does_iod_have_pixel_data
    for sop_class in (source.SOPClassUID, SC_CLASS, "1.2.840.10008.5.1.4.1.1.88.33"):  # CR, SC, Comprehensive SR
        assert remembered(sop_class) == does_iod_have_pixel_data(sop_class)
    source.Manufacturer = "Modality Maker"
    equipment = build(source, picture).ContributingEquipmentSequence
    assert [item.Manufacturer for item in equipment][0] == "Modality Maker"
    assert equipment[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109101"  # Acquisition Equipment
