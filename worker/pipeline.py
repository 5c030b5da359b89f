"""Pipeline — a StudyReady message becomes result files in the outbox: load → select (intended-use
header rules, the population of the patient's age) → decode → predict (with the image check, each
image at its population's operating point) → encode. Delivery and recording happen in the tasks;
this module knows no Celery."""

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread, dcmwrite

from common.durable import fsync_dir
from common.messages import StudyReady
from common.outbox import study_folder
from common.results import Finding, GateAction, ImageResult, StudyStatus
from common.uids import derived_uid, output_instance_uid, output_series_uid
from config.settings import ScCompression
from inference.classifier import Classifier, Prediction
from inference.dicom_pixels import UnsupportedImage, dataset_to_gray
from inference.intended_use import GateVerdict, IntendedUse
from inference.overlay import blend_overlay, display_picture, display_size, legend_lines
from inference.preprocess import to_square_uint8
from inference.site_profile import OperatingPoint
from worker.encode.equipment import Algorithm
from worker.encode.findings_sr import ImageFinding, build_findings_sr
from worker.encode.heatmap_sc import build_heatmap_sc
from worker.encode.source_header import instance_number
from worker.select import select

SC_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902


@dataclass
class StudyOutcome:
    """What one study round produced: the finding, per-image details and the files to deliver."""

    message: StudyReady
    findings: list[ImageFinding]
    files: list[Path]
    images: list[ImageResult]
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def top(self) -> ImageFinding | None:
        """The image of the study-level finding (see ``study_finding``)."""
        return study_finding(self.findings)

    @property
    def operating_point(self) -> OperatingPoint | None:
        """The operating point of the study-level finding (its image's population's); None: nothing analysed."""
        top = self.top
        return None if top is None else top.operating_point

    @property
    def probability(self) -> float | None:
        """The study's probability: its finding's image's; None when nothing was analysed."""
        top = self.top
        return None if top is None else top.probability

    @property
    def modality(self) -> str | None:
        """The Modality of the round's first image (None: empty)."""
        return str(self.findings[0].source.get("Modality", "")) or None

    @property
    def accession_number(self) -> str | None:
        """The Accession Number of the round's first image (None: empty)."""
        return str(self.findings[0].source.get("AccessionNumber", "")) or None

    @property
    def output_uids(self) -> list[str]:
        """SOP Instance UIDs of the SCs and SRs this round produced, image by image."""
        return [uid for image in self.images for uid in image.output_uids]

    @property
    def finding(self) -> Finding:
        """POSITIVE, NEGATIVE, or NOT_ANALYSED when no image could be analysed."""
        top = self.top
        if top is None:
            return Finding.NOT_ANALYSED
        return Finding.POSITIVE if top.positive else Finding.NEGATIVE

    @property
    def status(self) -> StudyStatus:
        """Analysed; outside use when no image was analysed and the gate refused one; else not analysed."""
        if self.top is not None:
            return StudyStatus.ANALYSED
        refused = any(finding.gate is not None for finding in self.findings)
        return StudyStatus.OUTSIDE_USE if refused else StudyStatus.NOT_ANALYSED

    @property
    def remark(self) -> str | None:
        """Why the round has no finding, or why its finding lies outside the intended use."""
        top = self.top
        if top is not None:
            return top.gate.text if top.gate else None
        return "; ".join(dict.fromkeys(f.not_analysed_reason for f in self.findings if f.not_analysed_reason)) or None

    def gate_counts(self) -> dict[str, dict[str, int]]:
        """How many images the intended-use gate refused or flagged, by rule (for audit and metrics)."""
        counts: dict[str, dict[str, int]] = {action.value: {} for action in GateAction}
        for finding in self.findings:
            if finding.gate is not None:
                kind = counts[GateAction.FLAGGED if finding.analysed else GateAction.REFUSED]
                kind[finding.gate.reason.value] = kind.get(finding.gate.reason.value, 0) + 1
        return counts


def study_finding(findings: list[ImageFinding]) -> ImageFinding | None:
    """The analysed finding the study's finding comes from: the positive one with the highest
    probability, else the one with the highest probability (images of different populations have
    different thresholds, so the highest probability alone may be a negative beside a positive);
    None when nothing was analysed."""
    analysed = [finding for finding in findings if finding.analysed]
    return max(analysed, key=lambda finding: (finding.positive, finding.probability)) if analysed else None


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def lap(self, name: str, started: float) -> float:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + (now - started) * 1000
        return now


def algorithm_of(classifier: Classifier) -> Algorithm:
    """The algorithm identity our outputs carry."""
    return Algorithm(classifier.card.name, classifier.card.version, classifier.card.weights_sha256)


def analyse_study(
    message: StudyReady,
    classifier: Classifier,
    gate: IntendedUse,
    outbox: Path,
    *,
    device_uid: str,
    max_long_side: int,
    sc_compression: ScCompression = "jpeg",
) -> StudyOutcome:
    """Analyse every instance of ``message`` and write the SC and SR files into ``outbox``.

    An image outside the intended use (header rules first, then the image check from the same
    forward pass) is not analysed under ``Policy.REFUSE`` — its probability is dropped, never
    shown — and analysed but marked under ``Policy.FLAG``. Each analysed image is judged at the
    operating point of its population: the header's patient age's, else the image check's. The heatmap
    SCs are at most ``max_long_side`` pixels long, their pixels compressed as ``sc_compression`` says.
    """
    watch = _Stopwatch()
    images = _read_and_select(message, gate, watch)
    # The SC's gray picture needs the decoded image only: a thread of this call's own makes it while the
    # model runs (Pillow's resize and torch both leave Python's lock), so with a core to spare a study's
    # analysis does not wait for it (issue 12). A thread started before the pool forked would not exist here.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lungvision-display") as drawing:
        pictures = {index: drawing.submit(display_picture, gray, max_long_side) for index, gray in images.grays.items()}
        predictions = _predict(images, classifier, gate, max_long_side, watch)
        algorithm = algorithm_of(classifier)
        uids = _OutputUids(message.study_instance_uid, algorithm.weights_sha256)
        findings = _findings_with_heatmaps(
            images, pictures, predictions, classifier, algorithm, uids, sc_compression, watch
        )
    outputs, results = _findings_reports(findings, classifier, algorithm, uids, device_uid, watch)
    started = time.perf_counter()
    files = write_outputs(outputs, study_folder(outbox, message.study_instance_uid))
    watch.lap("write", started)
    return StudyOutcome(message, findings, files, results, watch.timings)


@dataclass
class _Images:
    """The round's instances as read: each source dataset, and per index its gray image (analysable ones),
    or why it is skipped; the header's gate verdict and population where there is one."""

    sources: list[Dataset] = field(default_factory=list)
    grays: dict[int, np.ndarray] = field(default_factory=dict)
    skipped: dict[int, tuple[str, GateVerdict | None]] = field(default_factory=dict)  # index → (reason, verdict)
    verdicts: dict[int, GateVerdict] = field(default_factory=dict)
    populations: dict[int, str | None] = field(default_factory=dict)  # the header's age's (None: unknown)


@dataclass(frozen=True)
class _OutputUids:
    """The UIDs of a round's outputs: derived from the study, the source and the weights, so a re-run
    replaces rather than duplicates them."""

    study_uid: str
    weights_sha256: str

    def series(self, kind: str) -> str:
        return output_series_uid(self.study_uid, self.weights_sha256, kind)

    def instance(self, source: Dataset, kind: str) -> str:
        return output_instance_uid(source.SOPInstanceUID, self.weights_sha256, kind)


def _read_and_select(message: StudyReady, gate: IntendedUse, watch: _Stopwatch) -> _Images:
    """Read each instance, apply the header rules and decode the pixels of those that pass."""
    started = time.perf_counter()
    images = _Images()
    for index, instance in enumerate(message.instances):
        dataset = dcmread(instance.path, force=True)
        images.sources.append(dataset)
        selection = select(dataset, gate)
        if selection.skip_reason is not None:
            images.skipped[index] = (selection.skip_reason, None)
        elif gate.refuses(selection.verdict):
            images.skipped[index] = (selection.verdict.text, selection.verdict)
        else:
            try:
                images.grays[index] = dataset_to_gray(dataset)
                del dataset.PixelData  # decoded: the rest of the study needs its header only (10 MB less held)
                images.populations[index] = selection.population
                if selection.verdict is not None:
                    images.verdicts[index] = selection.verdict
            except UnsupportedImage as error:
                images.skipped[index] = (f"unsupported image: {error}", None)
    watch.lap("read_decode", started)
    return images


def _predict(
    images: _Images, classifier: Classifier, gate: IntendedUse, max_long_side: int, watch: _Stopwatch
) -> dict[int, Prediction]:
    """One forward pass for the decoded images (heatmaps at the SC's size); the image check's verdict
    then refuses some (their probability is dropped here, never shown)."""
    started = time.perf_counter()
    candidates = sorted(images.grays)
    squares = np.stack([to_square_uint8(images.grays[index]) for index in candidates]) if candidates else None
    started = watch.lap("preprocess", started)
    heatmap_shapes = [display_size(images.grays[index].shape, max_long_side) for index in candidates]
    predictions = (
        classifier.predict_squares(squares, heatmap_shapes, [images.populations[index] for index in candidates])
        if squares is not None
        else []
    )
    watch.lap("model_heatmap", started)
    kept: dict[int, Prediction] = {}
    for index, predicted in zip(candidates, predictions):
        verdict = gate.verdict(images.verdicts.get(index), predicted.image_check_score)
        if gate.refuses(verdict):
            images.skipped[index] = (verdict.text, verdict)
        else:
            kept[index] = predicted
            if verdict is not None:
                images.verdicts[index] = verdict
    return kept


def _findings_with_heatmaps(
    images: _Images,
    pictures: dict[int, Future[Image.Image]],
    predictions: dict[int, Prediction],
    classifier: Classifier,
    algorithm: Algorithm,
    uids: _OutputUids,
    compression: ScCompression,
    watch: _Stopwatch,
) -> list[ImageFinding]:
    """One finding per source image: analysed ones with their heatmap Secondary Capture, drawn over the
    image's picture from ``pictures`` (``display_picture``'s, for every decoded image)."""
    started = time.perf_counter()
    findings: list[ImageFinding] = []
    for index, source in enumerate(images.sources):
        prediction = predictions.get(index)
        if prediction is None:
            reason, verdict = images.skipped[index]
            findings.append(ImageFinding(source, not_analysed_reason=reason, gate=verdict))
            continue
        legend = legend_lines(
            prediction.probability, prediction.positive, prediction.threshold, prediction.model_version
        )
        assert prediction.heatmap is not None  # predict_squares was given the heatmap shapes
        sc = build_heatmap_sc(
            source,
            blend_overlay(pictures[index].result(), prediction.heatmap, legend),
            algorithm=algorithm,
            series_instance_uid=uids.series("sc"),
            sop_instance_uid=uids.instance(source, "sc"),
            series_number=SC_SERIES_NUMBER,
            instance_number=instance_number(source, index + 1),
            compression=compression,
        )
        point = classifier.operating_points[prediction.population]
        findings.append(
            ImageFinding(
                source,
                prediction.probability,
                prediction.positive,
                heatmap_sc=sc,
                gate=images.verdicts.get(index),
                logit=prediction.logit,
                operating_point=point,
            )
        )
    watch.lap("sc_build", started)
    return findings


def _findings_reports(
    findings: list[ImageFinding],
    classifier: Classifier,
    algorithm: Algorithm,
    uids: _OutputUids,
    device_uid: str,
    watch: _Stopwatch,
) -> tuple[list[Dataset], list[ImageResult]]:
    """One findings SR per source image; the outputs to write (SC then SR per image) and the image results."""
    started = time.perf_counter()
    top = study_finding(findings)
    outputs: list[Dataset] = []
    results: list[ImageResult] = []
    for index, finding in enumerate(findings):
        # an image not analysed names the point of the study's finding, or the first population's
        point = finding.operating_point or (top.operating_point if top else classifier.operating_point)
        assert point is not None  # an analysed finding has its point
        sr = build_findings_sr(
            [finding],
            study_finding=top,
            threshold=point.threshold,
            operating_point=point.name,
            algorithm=algorithm,
            device_uid=device_uid,
            series_instance_uid=uids.series("sr"),
            sop_instance_uid=uids.instance(finding.source, "sr"),
            series_number=SR_SERIES_NUMBER,
            instance_number=instance_number(finding.source, index + 1),
        )
        outputs += [finding.heatmap_sc, sr] if finding.heatmap_sc is not None else [sr]
        results.append(image_record(finding, sr))
    watch.lap("sr_build", started)
    return outputs, results


def image_record(finding: ImageFinding, sr: Dataset) -> ImageResult:
    """What the store keeps about one source image (no patient data); population, operating point and
    threshold are None for an image not analysed."""
    point, gate = finding.operating_point, finding.gate
    return ImageResult(
        sop_instance_uid=str(finding.source.SOPInstanceUID),
        probability=finding.probability,
        positive=finding.positive,
        logit=finding.logit,
        not_analysed_reason=finding.not_analysed_reason,
        intended_use=gate is None,
        gate_reason=gate.reason if gate else None,
        gate_text=gate.text if gate else None,
        population=point.population if point else None,
        operating_point=point.name if point else None,
        threshold=point.threshold if point else None,
        sc_uid=str(finding.heatmap_sc.SOPInstanceUID) if finding.heatmap_sc is not None else None,
        sr_uid=str(sr.SOPInstanceUID),
    )


def write_outputs(datasets: list[Dataset], folder: Path) -> list[Path]:
    """Write each output durably as a Part-10 file named by its SOP Instance UID: written to a temporary
    name and fsynced, renamed into place once all are, then the folder fsynced once for all of them —
    after a crash a name either holds a complete file or does not exist.

    Each file's fsync runs on a thread while this one encodes the next file: the SC's ≈ 2.5 MB go to
    disk while the SR is encoded, and every fsync is still done before this returns (issue 12: the
    write stage ≈ 0.7 ms shorter on a disk whose fsync of the SC takes ≈ 2 ms; more on a slower one)."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    # A thread of this call's own: a pool process is forked from the parent that ran the warm-up study, and
    # a thread started before a fork does not exist after it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lungvision-fsync") as fsyncing:
        pending = [fsyncing.submit(_fsync_and_close, _encoded(dataset, folder)) for dataset in datasets]
        partials = [fsync.result() for fsync in pending]  # raises the first failure
    paths = [partial.replace(partial.with_suffix(".dcm")) for partial in partials]
    fsync_dir(folder)  # the renames
    if created:
        fsync_dir(folder.parent)  # the folder's own name
    return paths


def _encoded(dataset: Dataset, folder: Path) -> BinaryIO:
    """A temporary file in ``folder`` named by the dataset's SOP Instance UID, holding it as Part 10: written
    and flushed, still open for its fsync (``_fsync_and_close``)."""
    handle = (folder / f"{dataset.SOPInstanceUID}.partial").open("wb")
    try:
        dcmwrite(handle, dataset, enforce_file_format=True)
        handle.flush()
    except BaseException:
        handle.close()
        raise
    return handle


def _fsync_and_close(handle: BinaryIO) -> Path:
    """Flush ``handle``'s file to disk and close it; its path."""
    with handle:
        os.fsync(handle.fileno())
    return Path(handle.name)


def device_uid_for(ae_title: str) -> str:
    """The device observer UID of this Lung Vision installation (stable for its AE title)."""
    return derived_uid("lungvision-device", ae_title)
