"""Valid results from invalid sources: whatever a source's header holds, every SC and SR we write
passes dciodvfy, and the source's values are repaired (Patient's Age 12 → 012Y…) or dropped.

Fixtures are our own generated radiographs, broken on purpose (tests/kit/dicom_fixtures.py);
a property test then breaks headers at random — of generated files, and of the real samples in
../shared/data/dicom_samples when present — and runs the whole pipeline on each.
"""

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import generate_uid

from common.results import StudyStatus
from inference.classifier import load_classifier
from tests.kit.data import DICOM_SAMPLES, require
from tests.kit.dicom_checks import dciodvfy_errors
from tests.kit.dicom_fixtures import radiograph, write_broken
from tests.kit.pipeline import run_pipeline
from tests.kit.worker import make_message
from worker.encode.charset import declared_encodings, decode_text
from worker.encode.source_header import clean_source_header
from worker.encode.vr_values import clean_value

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
OUTCOMES = {StudyStatus.ANALYSED, StudyStatus.NOT_ANALYSED, StudyStatus.OUTSIDE_USE}
FUZZ_EXAMPLES = 50  # with REAL_SAMPLE_EXAMPLES, about a minute on two cores: each runs the pipeline and dciodvfy
REAL_SAMPLE_EXAMPLES = 12

# --- one value against its VR ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vr", "received", "written"),
    [
        ("AS", "58", "058Y"),
        ("AS", "5 Y", "005Y"),
        ("AS", "3 years", "003Y"),
        ("AS", "005M", "005M"),
        ("AS", "12w", "012W"),
        ("AS", "058Y", "058Y"),
        ("AS", "1000Y", None),
        ("AS", "old", None),
        ("AS", "-5", None),
        ("DA", "1958-03-01", "19580301"),
        ("DA", "1958.03.01", "19580301"),
        ("DA", "19580301 ", "19580301"),
        ("DA", "20230231", None),
        ("DA", "2024", None),
        ("DA", "01/03/1958", None),
        ("TM", "12:30:00", "123000"),
        ("TM", "12:30", "1230"),
        ("TM", "123000.1234567", "123000.123456"),
        ("TM", "07", "07"),
        ("TM", "2500", None),
        ("TM", "noon", None),
        ("DT", "20240301123000.5+0100", "20240301123000.5+0100"),
        ("DT", "20241301", None),
        ("DT", "20240231", None),
        ("DT", "2024.5", None),
        ("CS", "m", "M"),
        ("CS", " PA ", "PA"),
        ("CS", "ANTERIOR-POSTERIOR", None),
        ("CS", "É", None),
        ("IS", "12.0", "12"),
        ("IS", "+7", "7"),
        ("IS", "1e3", None),
        ("IS", "99999999999", None),
        ("DS", "0.2", "0.2"),
        ("DS", "12.3456789012345678", "12.3456789012346"),
        ("DS", "nan", None),
        ("DS", "1e999", None),
        ("LO", "x" * 70, "x" * 64),
        ("LO", "ü" * 40, "ü" * 32),
        ("LO", "a\x07b", "a\ufffdb"),
        ("LO", "a\\b", None),
        ("SH", "  ST-01  ", "ST-01"),
        ("ST", "  line 1\r\nline 2  ", "  line 1\r\nline 2"),
        ("PN", "Doe^John", "Doe^John"),
        ("PN", "MARKERNAME", "MARKERNAME"),
        ("PN", "A" * 80 + "^B", "A" * 64),
        ("PN", "a^b^c^d^e^f", None),
        ("PN", "a=b=c=d", None),
        ("UI", "1.2.3\x00", "1.2.3"),
        ("OB", "anything", None),
        ("US", "1", None),
    ],
)
def test_a_value_is_kept_repaired_or_refused(vr, received, written) -> None:
    assert clean_value(vr, received) == written


@pytest.mark.parametrize(
    ("raw", "charset", "text"),
    [
        (b"Doe^John", None, "Doe^John"),
        ("Müller^Jürgen".encode("latin-1"), None, "Müller^Jürgen"),  # undeclared, not UTF-8: Latin-1
        ("Дмитриев^Иван".encode(), None, "Дмитриев^Иван"),  # undeclared UTF-8
        ("Дмитриев^Иван".encode(), "ISO_IR 999", "Дмитриев^Иван"),  # unknown charset: read as undeclared
        ("Дмитриев^Иван".encode("iso8859_5"), "ISO_IR 144", "Дмитриев^Иван"),  # declared Cyrillic
        ("Müller".encode("latin-1"), "ISO_IR 192", "Müller"),  # declared UTF-8, but it is not
        (
            b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
            "\\ISO 2022 IR 87",
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
        ),  # PS3.5 H.3.1, ISO 2022 escapes
    ],
)
def test_text_is_decoded_with_the_declared_charset_else_utf8_else_latin1(raw, charset, text) -> None:
    dataset = radiograph()
    if charset is None:
        del dataset.SpecificCharacterSet
    else:
        dataset.SpecificCharacterSet = charset.split("\\")
    assert decode_text(raw, "PN", declared_encodings(dataset)) == text


def test_identifiers_are_dropped_rather_than_shortened() -> None:
    source = radiograph(PatientID="P" * 70, AccessionNumber="ACC\x01", StudyID="1", InstitutionName="I" * 70)
    header, report = clean_source_header(source)
    assert header.PatientID == "" and header.AccessionNumber == "" and header.StudyID == "1"
    assert header.InstitutionName == "I" * 64
    assert set(report.dropped) == {"PatientID", "AccessionNumber"} and report.repaired == ["InstitutionName"]


# --- broken files through the pipeline -------------------------------------------------------------

CASES = {
    "age without unit (12)": dict(values={"PatientAge": b"12"}),
    "age with a space (5 Y)": dict(values={"PatientAge": b"5 Y "}),
    "dates and times with separators": dict(
        values={
            "PatientBirthDate": b"2020-03-01",
            "StudyDate": b"2024.03.01",
            "StudyTime": b"12:30:00",
            "AcquisitionTime": b"08:15",
        }
    ),
    "impossible dates and times": dict(
        values={
            "PatientBirthDate": b"20200231",
            "StudyTime": b"256100",
            "AcquisitionDate": b"2024",
            "AcquisitionDateTime": b"20241399",
        }
    ),
    "over-long values": dict(
        values={
            "InstitutionName": b"Regional Children's Hospital " * 4,
            "PatientName": b"Verylongfamilyname" * 5 + b"^Given",
            "PatientID": b"ID" * 35,
            "StudyDescription": b"Chest " * 20,
            "StationName": b"STATION-NUMBER-0001",
        }
    ),
    "national characters, no charset, Latin-1": dict(
        without=("SpecificCharacterSet",),
        values={
            "PatientName": "Müller^Jürgen".encode("latin-1"),
            "InstitutionName": "Hôpital Saint-Éloi".encode("latin-1"),
            "ReferringPhysicianName": "Ødegård^Åse".encode("latin-1"),
        },
    ),
    "national characters, no charset, UTF-8": dict(
        without=("SpecificCharacterSet",),
        values={
            "PatientName": "Дмитриев^Иван".encode(),
            "InstitutionName": "北京协和医院".encode(),
            "StudyDescription": "Thorax ap/pa ÜBERSICHT".encode(),
        },
    ),
    "unknown character set": dict(values={"SpecificCharacterSet": b"ISO_IR 999", "PatientName": "Çelik^Ayşe".encode()}),
    "ISO 2022 Japanese": dict(
        values={
            "SpecificCharacterSet": b"\\ISO 2022 IR 87",
            "PatientName": b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
        }
    ),
    "wrong VRs": dict(
        values={
            "PatientBirthDate": b"20200301",
            "StudyDate": b"20240301",
            "PatientSex": b"f ",
            "PatientName": b"Roe^Jane",
            "PatientAge": b"4 ",
            "StudyTime": b"120000",
        },
        vrs={
            "PatientBirthDate": "LO",
            "StudyDate": "DT",
            "PatientSex": "LO",
            "PatientName": "LO",
            "PatientAge": "LO",
            "StudyTime": "SH",
        },
    ),
    "implicit VR, binary where text belongs": dict(
        implicit=True,
        values={
            "PatientAge": b"\x04\x00",
            "StudyTime": b"\x00\x01\x02\x03",
            "PatientSex": b"\x01\x00",
            "InstitutionName": b"\xff\xfe\x00\x01",
        },
    ),
    "odd lengths, control characters, NUL padding": dict(
        values={
            "StudyDescription": b"Chest PA1",
            "StationName": b"CR\x0701",
            "PatientName": b"Doe^John\x00",
            "InstitutionalDepartmentName": b"Radiology\tWest",
            "AccessionNumber": b"A1\x02",
        }
    ),
    "invalid enumerations and multiplicities": dict(
        values={
            "PatientSex": b"MALE",
            "Laterality": b"X ",
            "PatientName": b"Doe^John\\Roe^Richard",
            "PatientOrientation": b"left\\foot",
            "SoftwareVersions": b"1.0\\" + b"v" * 70,
        }
    ),
    "invalid numbers": dict(
        values={"PatientWeight": b"12.3456789012345678", "PatientSize": b"tall", "PatientAge": b"old "}
    ),
}


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def broken_study(classifier, tmp_path_factory) -> dict[str, dict]:
    """Every case of CASES as one image of one study, analysed once: case → its SR, SC (or None) and outcome."""
    folder = tmp_path_factory.mktemp("broken")
    study_uid = generate_uid()
    paths = {}
    for index, (case, breakage) in enumerate(CASES.items()):
        breakage = dict(breakage)
        dataset = radiograph(index % 4, implicit=breakage.pop("implicit", False), study_uid=study_uid)
        paths[case] = write_broken(dataset, folder / f"case{index}.dcm", **breakage)
    outcome = run_pipeline(make_message(list(paths.values())), classifier, folder / "outbox", max_long_side=256)
    by_stem = {path.stem: path for path in outcome.files}
    results = {}
    for case, image in zip(CASES, outcome.images):
        results[case] = {
            "image": image,
            "outcome": outcome,
            "sr": by_stem[image.sr_uid],
            "sc": by_stem[image.sc_uid] if image.sc_uid else None,
        }
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_every_output_of_a_broken_source_is_valid(broken_study, case) -> None:
    result = broken_study[case]
    assert result["outcome"].status in OUTCOMES
    for path in (result["sr"], result["sc"]):
        if path is not None:
            assert dciodvfy_errors(path) == [], f"{case}: {path.name}"


def output_of(broken_study, case: str, kind: str = "sr"):
    return dcmread(broken_study[case][kind])


def test_ages_are_repaired(broken_study) -> None:
    assert output_of(broken_study, "age without unit (12)").PatientAge == "012Y"
    assert "12 years" in broken_study["age without unit (12)"]["image"].not_analysed_reason  # no population
    assert output_of(broken_study, "age with a space (5 Y)").PatientAge == "005Y"
    assert output_of(broken_study, "wrong VRs").PatientAge == "004Y"
    assert "PatientAge" not in output_of(broken_study, "invalid numbers")


def test_dates_and_times_are_repaired_or_left_empty(broken_study) -> None:
    repaired = output_of(broken_study, "dates and times with separators")
    assert (repaired.PatientBirthDate, repaired.StudyDate, repaired.StudyTime) == ("20200301", "20240301", "123000")
    impossible = output_of(broken_study, "impossible dates and times")
    assert impossible.PatientBirthDate == "" and impossible.StudyTime == ""  # Type 2: present, empty


def test_over_long_text_is_cut_and_identifiers_dropped(broken_study) -> None:
    sr = output_of(broken_study, "over-long values")
    assert len(sr.PatientName.family_name) == 64 and sr.PatientID == ""
    equipment = sr.ContributingEquipmentSequence[0]  # the source's acquisition equipment
    assert equipment.InstitutionName == ("Regional Children's Hospital " * 4)[:64].rstrip()


def test_national_characters_are_decoded_and_declared(broken_study) -> None:
    for case, name in [
        ("national characters, no charset, Latin-1", "Müller^Jürgen"),
        ("national characters, no charset, UTF-8", "Дмитриев^Иван"),
        ("unknown character set", "Çelik^Ayşe"),
        ("ISO 2022 Japanese", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ]:
        for kind in ("sr", "sc"):
            if broken_study[case][kind] is not None:
                output = output_of(broken_study, case, kind)
                assert output.SpecificCharacterSet == "ISO_IR 192", case
                assert str(output.PatientName) == name, case
    plain = output_of(broken_study, "dates and times with separators")
    assert "SpecificCharacterSet" not in plain  # ASCII only: the default repertoire, declared by omission


def test_wrong_vrs_are_read_by_the_dictionary(broken_study) -> None:
    sr = output_of(broken_study, "wrong VRs")
    assert (sr.PatientBirthDate, sr.StudyDate, sr.PatientSex, str(sr.PatientName)) == (
        "20200301",
        "20240301",
        "F",
        "Roe^Jane",
    )
    assert sr["PatientBirthDate"].VR == "DA" and sr["PatientName"].VR == "PN"


def test_odd_lengths_and_control_characters(broken_study) -> None:
    sr = output_of(broken_study, "odd lengths, control characters, NUL padding")
    assert (str(sr.PatientName), sr.StudyDescription, sr.AccessionNumber) == ("Doe^John", "Chest PA1", "")
    equipment = sr.ContributingEquipmentSequence[0]
    assert equipment.StationName == "CR\ufffd01" and equipment.InstitutionalDepartmentName == "Radiology\ufffdWest"


def test_binary_bytes_in_an_implicit_vr_file_are_dropped(broken_study) -> None:
    sr = output_of(broken_study, "implicit VR, binary where text belongs")
    assert "PatientAge" not in sr and sr.StudyTime == "" and sr.PatientSex == ""


def test_invalid_enumerations_and_multiplicities_are_dropped(broken_study) -> None:
    sr = output_of(broken_study, "invalid enumerations and multiplicities")
    assert sr.PatientSex == "" and sr.PatientName == ""
    sc = broken_study["invalid enumerations and multiplicities"]["sc"]
    if sc is not None:
        assert dcmread(sc).Laterality == "" and dcmread(sc).PatientOrientation == ""


# Two crashes outside worker/encode that the property test below found (now fixed).
def test_a_manufacturer_with_a_backslash_gives_an_outcome(classifier, tmp_path) -> None:
    path = write_broken(radiograph(0), tmp_path / "source.dcm", values={"Manufacturer": b"ACME\\X-RAY "})
    outcome = run_pipeline(make_message([path]), classifier, tmp_path / "outbox", max_long_side=256)
    assert outcome.status in OUTCOMES


@pytest.mark.parametrize("stored", [b"abc ", b"1\\2 "])
def test_an_invalid_instance_number_gives_an_outcome(classifier, tmp_path, stored) -> None:
    path = write_broken(radiograph(0), tmp_path / "source.dcm", values={"InstanceNumber": stored})
    outcome = run_pipeline(make_message([path]), classifier, tmp_path / "outbox", max_long_side=256)
    assert outcome.status in OUTCOMES


@pytest.mark.parametrize(
    ("stored", "number"), [(b"7 ", 7), (b" 12.0", 12), (b"abc ", 3), (b"1\\2 ", 3), (b"99999999999 ", 3), (b"", 3)]
)
def test_instance_number_is_read_safely(tmp_path, stored, number) -> None:
    from worker.encode.source_header import instance_number

    path = write_broken(radiograph(0), tmp_path / "source.dcm", values={"InstanceNumber": stored})
    assert instance_number(dcmread(path), default=3) == number


# --- property test: random header damage, generated files and real samples ------------------------

TEXT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientWeight",
    "PatientSize",
    "OtherPatientNames",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "SoftwareVersions",
    "AcquisitionDate",
    "Manufacturer",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "PatientComments",
    "Laterality",
    "PatientOrientation",
)
WRONG_VRS = ("LO", "SH", "CS", "DA", "TM", "AS", "PN", "IS", "DS", "UN", "OB", "UT", "ST", "US")
CHARSETS = (
    b"",
    b"ISO_IR 100",
    b"ISO_IR 192",
    b"ISO_IR 144",
    b"GB18030",
    b"\\ISO 2022 IR 87",
    b"ISO_IR 999",
    b"iso-ir-100",
    b"ISO_IR 100\\ISO_IR 192",
)
NAMES = ("MARKERNAME", "Doe^John", "Müller^Jürgen", "Дмитриев^Иван", "山田^太郎", "O'Brien^Seán", "=^^", "a" * 90)
CODECS = ("ascii", "latin-1", "utf-8", "iso8859_5", "gb18030", "shift_jis", "utf-16-le")


def _encoded(text: str, codec: str) -> bytes:
    return text.encode(codec, errors="replace")


raw_values = st.one_of(
    st.binary(max_size=80),
    st.builds(_encoded, st.one_of(st.sampled_from(NAMES), st.text(max_size=70)), st.sampled_from(CODECS)),
    st.sampled_from(
        [
            b"58",
            b"5 Y",
            b"20200231",
            b"1958-03-01",
            b"12:30:00",
            b"256100",
            b"-",
            b"\\",
            b"\x00",
            b" ",
            b"M\\F",
            b"1e999",
            b"NaN",
            b"X" * 65,
            b"\x1b$B;3ED\x1b(B",
            b"\x1b",
            b"\xff\xfe",
        ]
    ),
)
damage = st.dictionaries(st.sampled_from(TEXT_KEYWORDS), raw_values, min_size=1, max_size=8)


FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def assert_valid_outcome(
    dataset, damage: dict[str, bytes], charset: bytes | None, vrs: dict[str, str], classifier, policy: str = "refuse"
) -> None:
    """Store ``damage`` (and ``charset``, with ``vrs`` as written VRs) in ``dataset``, run the pipeline
    on it under the intended-use ``policy``: it must end with an outcome, one SR, and only
    dciodvfy-clean outputs."""
    vrs = {keyword: vr for keyword, vr in vrs.items() if keyword in damage}
    if charset is not None:
        damage = {**damage, "SpecificCharacterSet": charset}
    with tempfile.TemporaryDirectory(prefix="lv-fuzz-") as folder:
        path = write_broken(dataset, Path(folder) / "damaged.dcm", values=damage, vrs=vrs)
        outcome = run_pipeline(
            make_message([path]),
            classifier,
            Path(folder) / "outbox",
            gate=classifier.intended_use(policy=policy),
            max_long_side=256,
        )
        assert outcome.status in OUTCOMES
        assert len(outcome.images) == 1 and outcome.images[0].sr_uid
        # shown by pytest --hypothesis-show-statistics: how many examples made an SC
        event(f"{outcome.status} ({outcome.images[0].gate_reason or 'no gate rule'})")
        for output in outcome.files:
            assert dciodvfy_errors(output) == [], (sorted(damage), dcmread(output).SOPClassUID == SC_CLASS)


charsets = st.one_of(st.none(), st.sampled_from(CHARSETS))
written_vrs = st.dictionaries(st.sampled_from(TEXT_KEYWORDS), st.sampled_from(WRONG_VRS), max_size=3)


@settings(FUZZ, max_examples=FUZZ_EXAMPLES)
@given(damage=damage, charset=charsets, vrs=written_vrs, implicit=st.booleans(), index=st.integers(0, 3))
def test_any_damaged_header_of_a_generated_file_gives_valid_outputs(
    classifier, damage, charset, vrs, implicit, index
) -> None:
    """A generated radiograph (explicit or implicit VR: there the VR is not stored) with random damage."""
    assert_valid_outcome(radiograph(index, implicit=implicit), damage, charset, {} if implicit else vrs, classifier)


@settings(FUZZ, max_examples=REAL_SAMPLE_EXAMPLES)
@given(damage=damage, charset=charsets, vrs=written_vrs, index=st.integers(0, 2))
def test_any_damaged_header_of_a_real_sample_gives_valid_outputs(classifier, damage, charset, vrs, index) -> None:
    """The real samples (../shared/data/dicom_samples) with random damage; skipped when they are absent.
    They are adults' films, which the gate refuses: the "flag" policy analyses them, so the heatmap SC
    is made from their headers too."""
    samples = sorted(require(DICOM_SAMPLES).glob("*.dcm"))
    assert_valid_outcome(dcmread(samples[index % len(samples)]), damage, charset, vrs, classifier, policy="flag")
