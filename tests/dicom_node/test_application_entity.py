"""AE construction, admission rules, TLS settings, SCU context proposal — no network."""

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage, SecondaryCaptureImageStorage

from common.scu import proposed_contexts
from config.settings import ConfigError, NodeSettings, load_settings
from dicom_node.application_entity import (
    ACCEPTED_TRANSFER_SYNTAXES,
    ANALYSED_SOP_CLASSES,
    Admission,
    build_ae,
    server_ssl_context,
)
from tests.kit.dicom_fixtures import make_image


def test_defaults_match_the_issue() -> None:
    settings = load_settings()
    assert (settings.node.ae_title, settings.node.port, settings.node.max_associations) == ("LUNGVISION", 11112, 32)
    assert settings.spool.stable_seconds == 5
    assert settings.node.unknown_storage_classes == "ignore"


def test_the_ae_accepts_every_listed_syntax_for_the_analysed_classes_and_others_by_policy() -> None:
    contexts = {cx.abstract_syntax: cx.transfer_syntax for cx in build_ae(NodeSettings()).supported_contexts}
    for sop_class in ANALYSED_SOP_CLASSES:
        assert contexts[sop_class] == ACCEPTED_TRANSFER_SYNTAXES
    assert len(ACCEPTED_TRANSFER_SYNTAXES) == 12
    assert CTImageStorage in contexts
    refusing = build_ae(NodeSettings(unknown_storage_classes="refuse"))
    assert CTImageStorage not in {cx.abstract_syntax for cx in refusing.supported_contexts}
    assert refusing.maximum_associations == 32


def test_admission_checks_allow_list_hosts_and_called_ae() -> None:
    admission = Admission(
        NodeSettings(
            require_called_ae=True,
            allowed_calling_aes=[{"ae_title": "CR1"}, {"ae_title": "PACS", "hosts": ["10.0.0.0/8", "192.168.1.7"]}],
        )
    )
    assert admission.refusal(calling_ae="CR1", called_ae="LUNGVISION", host="127.0.0.1") is None
    assert admission.refusal(calling_ae="PACS", called_ae="LUNGVISION", host="10.2.3.4") is None
    assert admission.refusal(calling_ae="PACS", called_ae="LUNGVISION", host="::ffff:192.168.1.7") is None
    assert admission.refusal(calling_ae="PACS", called_ae="LUNGVISION", host="192.168.1.8").diagnostic == 0x03
    assert admission.refusal(calling_ae="OTHER", called_ae="LUNGVISION", host="10.2.3.4").diagnostic == 0x03
    assert admission.refusal(calling_ae="CR1", called_ae="ELSEWHERE", host="127.0.0.1").diagnostic == 0x07
    assert Admission(NodeSettings()).refusal(calling_ae="ANY", called_ae="ANY", host="1.2.3.4") is None


def test_tls_settings_must_be_complete(tmp_path) -> None:
    assert server_ssl_context(NodeSettings().tls) is None
    config = tmp_path / "tls.yaml"
    config.write_text("node:\n  tls:\n    enabled: true\n")
    with pytest.raises(ConfigError, match="cert_file"):
        load_settings(config)
    config.write_text("node:\n  tls:\n    require_client_cert: true\n")
    with pytest.raises(ConfigError, match="ca_file"):
        load_settings(config)


def test_the_scu_proposes_uncompressed_plus_each_datasets_own_syntax() -> None:
    plain = make_image()
    jpeg = make_image()
    jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    rle = make_image(sop_class_uid=SecondaryCaptureImageStorage)
    rle.file_meta.TransferSyntaxUID = RLELossless
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert proposed_contexts([plain, jpeg, plain, rle]) == [
        (ComputedRadiographyImageStorage, uncompressed),
        (ComputedRadiographyImageStorage, [JPEGBaseline8Bit]),
        (SecondaryCaptureImageStorage, uncompressed),
        (SecondaryCaptureImageStorage, [RLELossless]),
    ]
