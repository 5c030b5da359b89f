"""Settings — every Lung Vision setting, loaded in one place.

Precedence, lowest first: ``config/lungvision.yaml`` (the embedded defaults) → the file given with
``--config`` → ``LUNGVISION_*`` environment variables (nested keys joined by ``__``, e.g.
``LUNGVISION_NODE__PORT=11113``). Unknown keys are errors, so a typo is named instead of ignored.
"""

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

DEFAULTS_FILE = Path(__file__).with_name("lungvision.yaml")


class Section(BaseModel):
    """A settings section: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    """Which weights the worker and the offline commands load, and how they apply them. Each image is
    judged at the operating point (threshold, temperature) of its population — children, adults… from
    the model card: the population its header's patient age falls in, else (no age) the one whose
    training images the image check finds nearest; an age in no population is outside the intended
    use. The points are the model card's, or a site profile's per population; the age bounds here
    only narrow the card's populations."""

    weights_dir: Path | None = None  # None = the weights shipped in the package
    batch_size: int = 16
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # forward pass arithmetic; auto = bf16 where the CPU has it
    site_profile: Path | None = None  # a site's operating points from 'lungvision calibrate'; None = the shipped ones
    intended_use_policy: Literal["refuse", "flag"] = "refuse"  # images outside the intended use
    min_age_years: float | None = Field(default=None, ge=0)  # outer bound narrowing the card's populations; None: none
    max_age_years: float | None = Field(default=None, gt=0)  # outer bound narrowing the card's populations; None: none


class BrokerSettings(Section):
    """The Celery broker and result backend between node and worker.

    The defaults need no server (a SQLite file via kombu's SQLAlchemy transport, kept across
    restarts); production sets both to Redis, e.g. ``redis://127.0.0.1:6379/0``.
    """

    url: str = "sqla+sqlite:///var/broker.sqlite"
    result_backend: str = "db+sqlite:///var/results.sqlite"


class CallingPeer(Section):
    """One calling AE title allowed to associate, optionally only from some addresses."""

    ae_title: str = Field(min_length=1, max_length=16)
    hosts: list[IPvAnyNetwork] = []  # empty = from any address; entries are IPs or networks (10.0.0.0/8)


class NodeTlsSettings(Section):
    """TLS for the node's listening socket (DICOM over TLS, PS3.15 B.1)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None  # CA bundle used to verify client certificates
    require_client_cert: bool = False  # mutual TLS

    @model_validator(mode="after")
    def _complete(self) -> "NodeTlsSettings":
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.ca_file")
        return self


class NodeSettings(Section):
    """The DICOM storage SCP that receives studies from modalities and PACS."""

    ae_title: str = Field(default="LUNGVISION", min_length=1, max_length=16)
    port: int = Field(default=11112, ge=1, le=65535)
    bind_address: str = "0.0.0.0"
    allowed_calling_aes: list[CallingPeer] = []  # empty = any calling AE
    require_called_ae: bool = False  # refuse associations whose called AE is not ae_title
    max_associations: int = Field(default=32, ge=1)  # per receiving process
    receivers: int = Field(default=0, ge=0)  # processes accepting associations on the port; 0 = one per CPU, at most 4
    max_pdu_bytes: int = Field(default=262144, ge=0)  # largest PDU we accept; 0 = unlimited
    network_timeout_s: float | None = Field(default=60.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    unknown_storage_classes: Literal["ignore", "refuse"] = "ignore"
    tls: NodeTlsSettings = NodeTlsSettings()


class SpoolSettings(Section):
    """Where received instances wait, grouped by study, until the worker has analysed them."""

    dir: Path = Path("./var/spool")
    min_free_bytes: int = Field(default=2 * 1024**3, ge=0)  # below this, new instances get 0xA700
    stable_seconds: float = Field(default=5.0, gt=0)  # a study is complete after this long without an instance
    retention_days: float = Field(default=7.0, gt=0)  # queued rounds older than this are deleted
    stale_partial_s: float = Field(default=3600.0, gt=0)  # half-received files idle this long are deleted


ScCompression = Literal["jpeg", "none"]  # how the heatmap SC's pixels are stored (worker/encode/heatmap_sc.py)


class WorkerSettings(Section):
    """The Celery worker that analyses studies and sends results."""

    concurrency: int = Field(default=2, ge=1)  # worker processes
    soft_time_limit_s: float = Field(default=300.0, gt=0)  # analyse task gets SoftTimeLimitExceeded
    time_limit_s: float = Field(default=360.0, gt=0)  # analyse task process is killed and replaced
    visibility_timeout_s: float = Field(default=3600.0, gt=0)  # unacknowledged tasks return to the queue after this;
    # must exceed delivery.retry_max_delay_s and time_limit_s, or a waiting retry would run twice
    unacked_restore_interval_s: float = Field(default=10.0, ge=1)  # Redis: how often a worker returns tasks past
    # visibility_timeout_s to the queue (kombu's unacked_restore_interval; its throttle is set to 1)
    requeue_after_s: float = Field(default=600.0, gt=0)  # a queued round without outcome this long is sent again
    reconcile_interval_s: float = Field(default=30.0, gt=0)  # the sweeper compares spool and store this often
    max_analysis_attempts: int = Field(default=3, ge=1)  # analysis starts (worker died each time) before "failed"
    outbox_dir: Path = Path("./var/outbox")  # result objects written here before they are sent
    sc_max_long_side: int = Field(default=1024, ge=64)  # heatmap Secondary Capture size limit in pixels
    sc_compression: ScCompression = "jpeg"  # heatmap SC pixels: JPEG Baseline (lossy, quality 95, ≈ 20×
    # smaller) or uncompressed RGB; a destination that refuses JPEG gets it uncompressed (docs/worker.md)
    return_memory_after_idle_s: float = Field(default=10.0, ge=0)  # a pool process with no task this long gives
    # its heap's free pages back to the system; 0 = after each task (docs/worker.md, *Memory*)
    dead_letter_key: str = Field(
        default="lungvision:dead_letters",
        description="Redis hash where versions before the reconciliation kept dead letters; a worker start moves "
        "any it finds into the outcome store, where every dead letter is kept now",
    )


class DestinationTlsSettings(Section):
    """TLS towards a destination."""

    enabled: bool = False
    ca_file: Path | None = None  # CA that signed the destination's certificate; None = system store
    cert_file: Path | None = None  # our client certificate, for mutual TLS
    key_file: Path | None = None
    check_hostname: bool = True  # the destination's certificate must name its host


class DestinationSettings(Section):
    """Where results go: a DICOM peer (PACS, viewer) over C-STORE, or a folder of DICOM files."""

    name: str = Field(min_length=1)
    kind: Literal["dicom", "folder"] = "dicom"
    ae_title: str | None = Field(default=None, min_length=1, max_length=16)  # dicom
    host: str | None = None  # dicom
    port: int | None = Field(default=None, ge=1, le=65535)  # dicom
    tls: DestinationTlsSettings = DestinationTlsSettings()  # dicom
    path: Path | None = None  # folder: results are written to PATH/<StudyInstanceUID>/<SOPInstanceUID>.dcm

    @model_validator(mode="after")
    def _complete(self) -> "DestinationSettings":
        if self.kind == "dicom" and None in (self.ae_title, self.host, self.port):
            raise ValueError(f"destination {self.name!r}: a dicom destination needs ae_title, host and port")
        if self.kind == "folder" and self.path is None:
            raise ValueError(f"destination {self.name!r}: a folder destination needs a path")
        return self


class RoutingRule(Section):
    """Send a study's results to ``destinations`` when every condition given here matches."""

    calling_ae: str | None = None  # AE title that sent the study
    modality: str | None = None  # Modality of any instance of the study round (CR, DX, OT…)
    result: Literal["positive", "negative", "not_analysed", "outside_intended_use"] | None = None
    destinations: list[str] = Field(min_length=1)


class DeliverySettings(Section):
    """Retries of a failed delivery: exponential back-off with jitter, then the dead-letter list."""

    max_attempts: int = Field(default=5, ge=1)
    retry_base_delay_s: float = Field(default=10.0, gt=0)  # delay before the 2nd attempt; doubles each time
    retry_max_delay_s: float = Field(default=600.0, gt=0)
    connection_timeout_s: float = Field(default=10.0, gt=0)  # TCP connect to a destination
    acse_timeout_s: float = Field(default=30.0, gt=0)  # association set-up and release
    dimse_timeout_s: float = Field(default=60.0, gt=0)  # waiting for each C-STORE response
    network_timeout_s: float = Field(default=60.0, gt=0)  # idle network
    association_idle_s: float = Field(default=5.0, ge=0)  # an association stays open this long for the next study
    # true = results are sent by `lungvision deliverer` alone, while the analysis workers go on with the next
    # study (`lungvision serve` and docker compose run one and set this); false = analysis workers send them
    by_deliverer: bool = False
    deliverer_threads: int = Field(default=4, ge=1)  # deliveries a deliverer runs at once, one association each
    shadow_mode: bool = False  # true = results stay in the worklist and store; nothing goes to destinations or HL7


class StoreSettings(Section):
    """Where study outcomes are recorded (SQLAlchemy URL)."""

    url: str = "sqlite:///var/lungvision.db"


class WebSettings(Section):
    """The worklist web pages, JSON API and Prometheus metrics (``lungvision web``)."""

    bind_address: str = "127.0.0.1"  # this machine only by default
    port: int = Field(default=8080, ge=1, le=65535)
    auth_user: str = Field(default="operator", min_length=1)  # basic-auth user name
    auth_token: SecretStr | None = None  # None = patient fields and replay are disabled
    refresh_s: int = Field(default=15, ge=0)  # worklist auto-refresh; 0 = off
    thumbnail_px: int = Field(default=160, ge=32, le=1024)  # longest side of worklist heatmap thumbnails
    page_size: int = Field(default=200, ge=1)  # most studies on one worklist page


class Hl7Endpoint(Section):
    """A RIS or worklist system that receives HL7 v2 ORU^R01 results over MLLP."""

    name: str = Field(min_length=1)
    host: str
    port: int = Field(ge=1, le=65535)
    receiving_application: str = "RIS"
    receiving_facility: str = ""


class Hl7Settings(Section):
    """HL7 v2 ORU^R01 result messages for every analysed study."""

    endpoints: list[Hl7Endpoint] = []
    sending_application: str = "LUNGVISION"
    sending_facility: str = ""
    include_patient_name: bool = False  # PID-5 from the DICOM PatientName; off = patient id only
    timeout_s: float = Field(default=10.0, gt=0)  # connect and wait for the ACK


class AuditSettings(Section):
    """The append-only audit trail (JSON lines; never patient names, ids or birth dates)."""

    path: Path = Path("./var/audit.jsonl")


class Settings(BaseSettings):
    """The whole configuration of one Lung Vision installation."""

    model_config = SettingsConfigDict(env_prefix="LUNGVISION_", env_nested_delimiter="__", extra="forbid")
    config_files: ClassVar[list[Path]] = [DEFAULTS_FILE]

    model: ModelSettings = ModelSettings()
    broker: BrokerSettings = BrokerSettings()
    node: NodeSettings = NodeSettings()
    spool: SpoolSettings = SpoolSettings()
    worker: WorkerSettings = WorkerSettings()
    destinations: list[DestinationSettings] = []
    routing: list[RoutingRule] = []  # empty = every destination gets every result
    delivery: DeliverySettings = DeliverySettings()
    store: StoreSettings = StoreSettings()
    web: WebSettings = WebSettings()
    hl7: Hl7Settings = Hl7Settings()
    audit: AuditSettings = AuditSettings()
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _routes_name_known_destinations(self) -> "Settings":
        names = [destination.name for destination in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destinations: names must be unique, got {names}")
        for index, rule in enumerate(self.routing):
            unknown = sorted(set(rule.destinations) - set(names))
            if unknown:
                raise ValueError(f"routing.{index}.destinations: unknown destination(s) {unknown}")
        hl7_names = [endpoint.name for endpoint in self.hl7.endpoints]
        if len(set(hl7_names)) != len(hl7_names):
            raise ValueError(f"hl7.endpoints: names must be unique, got {hl7_names}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_files = YamlConfigSettingsSource(settings_cls, yaml_file=cls.config_files, deep_merge=True)
        return init_settings, env_settings, yaml_files


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key(s)."""


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load the effective settings: defaults, then ``config_file``, then the environment."""
    files = [DEFAULTS_FILE]
    if config_file is not None:
        if not Path(config_file).is_file():
            raise ConfigError(f"config file not found: {config_file}")
        files.append(Path(config_file))
    Settings.config_files = files
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None


def effective_settings_json(settings: Settings) -> dict:
    """The settings as JSON-ready data, with secrets and URL passwords masked."""
    data = settings.model_dump(mode="json")
    return mask_secrets(data)


def mask_secrets(value: Any) -> Any:
    """``value`` with URL passwords replaced by asterisks (recursing into dicts and lists)."""
    if isinstance(value, dict):
        return {key: mask_secrets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, rest = value.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:**********@{host}" if ":" in credentials else value
    return value


__all__ = [
    "ConfigError",
    "SecretStr",
    "Section",
    "Settings",
    "effective_settings_json",
    "load_settings",
    "mask_secrets",
]
