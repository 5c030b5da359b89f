"""Character sets — text from a source is decoded safely, and every output declares the one it uses.

Reading: a source may declare no Specific Character Set (0008,0005) and still carry national
characters, or declare one nobody knows. :func:`decode_text` tries, in order: the declared
character set (when pydicom knows it), UTF-8, then Latin-1 — which decodes any byte, so decoding
never fails; what stays unreadable becomes U+FFFD later (see ``vr_values.replace_controls``).

Writing: all our outputs hold Python text, so one rule is enough. :func:`declare_character_set`
looks at every text value of an output (nested sequences included): with non-ASCII text left it
declares ``ISO_IR 192`` (UTF-8), else it declares nothing (the default repertoire).
"""

from collections.abc import Iterator
from typing import TypeVar

from pydicom import Dataset
from pydicom.charset import decode_bytes, python_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import PN_DELIMS, TEXT_VR_DELIMS

from worker.encode.vr_values import TEXT_VRS

UTF8 = "ISO_IR 192"
SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
_DEFAULT_REPERTOIRE = ("", "ISO_IR 6", "ISO 2022 IR 6")
_ESC = b"\x1b"


def declared_encodings(source: Dataset) -> list[str] | None:
    """The Python codecs of the source's Specific Character Set; None when it declares none, only
    the default repertoire, or a term pydicom does not know (then the text is read as undeclared)."""
    element = source.get_item(SPECIFIC_CHARACTER_SET)
    value = None if element is None else element.value
    if isinstance(value, bytes):
        terms = value.decode("latin-1").split("\\")
    elif isinstance(value, (list, tuple, MultiValue)):
        terms = [str(term) for term in value]
    else:
        terms = [str(value or "")]
    terms = [term.strip(" \x00") for term in terms]
    if all(term in _DEFAULT_REPERTOIRE for term in terms):
        return None
    if any(term not in python_encoding for term in terms):
        return None
    return ["ascii" if term in _DEFAULT_REPERTOIRE else python_encoding[term] for term in terms]


def decode_text(raw: bytes, vr: str, encodings: list[str] | None) -> str:
    """Stored bytes of one element → text. ASCII stays ASCII; other bytes in a VR that allows a
    character set are decoded with ``encodings``, else as UTF-8, else as Latin-1. Bytes outside
    ASCII in any other VR come out as Latin-1 (the VR's check refuses them afterwards)."""
    raw = raw.rstrip(b"\x00")  # NUL padding, written by some old modalities
    if raw.isascii() and _ESC not in raw:
        return raw.decode("ascii")
    if vr not in TEXT_VRS:
        return raw.decode("latin-1")
    if encodings:
        if _ESC in raw:  # ISO 2022 code extensions: pydicom switches codecs at each escape sequence
            return decode_bytes(raw, encodings, PN_DELIMS if vr == "PN" else TEXT_VR_DELIMS)
        try:
            return raw.decode(encodings[0])
        except (UnicodeDecodeError, LookupError):
            pass  # not what the source declared: fall through to UTF-8, then Latin-1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def element_text(element: DataElement | RawDataElement, vr: str, encodings: list[str] | None) -> list[str] | None:
    """The values of one element as text, read without pydicom's value conversion (whose warnings
    quote the values); None when the element holds no text (a sequence)."""
    value = element.value
    if value is None:
        return []
    if isinstance(value, bytes):
        text = decode_text(value, vr, encodings)
        if text == "":
            return []
        return [text] if vr in ("ST", "LT", "UT") else text.split("\\")
    if isinstance(value, (list, tuple, MultiValue)):
        if any(isinstance(item, Dataset) for item in value):
            return None
        return [str(item) for item in value]
    if isinstance(value, Dataset):
        return None
    text = str(value)
    return [] if text == "" else [text]


AnyDataset = TypeVar("AnyDataset", bound=Dataset)


def declare_character_set(dataset: AnyDataset) -> AnyDataset:
    """Set ``dataset``'s Specific Character Set to what its text needs: ISO_IR 192 with non-ASCII
    text, none without. Returns ``dataset``."""
    if any(not text.isascii() for text in _texts(dataset)):
        dataset.SpecificCharacterSet = UTF8
    elif SPECIFIC_CHARACTER_SET in dataset:
        del dataset[SPECIFIC_CHARACTER_SET]
    return dataset


def _texts(dataset: Dataset) -> Iterator[str]:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from _texts(item)
        elif element.VR in TEXT_VRS and element.value is not None:
            values = element.value if isinstance(element.value, (list, tuple, MultiValue)) else [element.value]
            yield from (str(value) for value in values)
