"""Association setup: NodeSettings → a configured pynetdicom AE, its TLS context, and the admission rule."""

import ipaddress
import ssl
from dataclasses import dataclass

from pydicom.uid import (
    JPEG2000,
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
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # the module makes its names at import time
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from config.settings import CallingPeer, NodeSettings, NodeTlsSettings

ANALYSED_SOP_CLASSES = frozenset(
    {
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
        SecondaryCaptureImageStorage,  # many chest images reach PACS as SC
    }
)
# Accepted as sent: decoding is the worker's job.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def build_ae(node: NodeSettings) -> AE:
    """The storage SCP: Verification, the analysed classes and, under policy "ignore", every other storage class."""
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_bytes
    ae.network_timeout = node.network_timeout_s
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.add_supported_context(Verification)
    for sop_class in sorted(ANALYSED_SOP_CLASSES):
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    if node.unknown_storage_classes == "ignore":
        for context in AllStoragePresentationContexts:
            sop_class = context.abstract_syntax  # always set in pynetdicom's list (typed optional)
            if sop_class is not None and sop_class not in ANALYSED_SOP_CLASSES:
                ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def server_ssl_context(tls: NodeTlsSettings) -> ssl.SSLContext | None:
    """The listening socket's TLS context (TLS 1.2+), or None when TLS is off."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.cert_file is not None  # the settings require it when TLS is on
    context.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=tls.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class Refusal:
    """An A-ASSOCIATE-RJ: result, source and diagnostic (PS3.8 9.3.4), and why, for the log."""

    result: int
    source: int
    diagnostic: int
    reason: str


class Admission:
    """Who may associate: the calling-AE allow-list (with optional hosts) and the called-AE check."""

    def __init__(self, node: NodeSettings) -> None:
        self._own_ae = node.ae_title
        self._require_called_ae = node.require_called_ae
        self._allowed: dict[str, CallingPeer] = {peer.ae_title: peer for peer in node.allowed_calling_aes}

    def refusal(self, *, calling_ae: str, called_ae: str, host: str) -> Refusal | None:
        """None when the association may proceed."""
        calling_ae, called_ae = calling_ae.strip(), called_ae.strip()
        if self._require_called_ae and called_ae != self._own_ae:
            return Refusal(0x01, 0x01, 0x07, f"called AE {called_ae!r} is not {self._own_ae!r}")
        if not self._allowed:
            return None
        peer = self._allowed.get(calling_ae)
        if peer is None:
            return Refusal(0x01, 0x01, 0x03, f"calling AE {calling_ae!r} is not on the allow-list")
        if peer.hosts and not any(_address_in(host, network) for network in peer.hosts):
            return Refusal(0x01, 0x01, 0x03, f"calling AE {calling_ae!r} is not allowed from {host}")
        return None


def _address_in(host: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # not an IP address (should not happen for a TCP peer)
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # an IPv4 peer seen through a dual-stack socket
    return address in network
