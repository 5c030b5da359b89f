"""Model card — the one source of label order, input size, temperature, threshold and weights hash."""

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
CARD_JSON = "model_card.json"


@dataclass
class ModelCard:
    """What the shipped weights are, how they were made and how well they did on validation."""

    name: str
    version: str
    architecture: str
    labels: list[str]
    input_size: int
    preprocessing: str
    temperature: float
    threshold: float
    threshold_rule: str
    weights_file: str
    weights_sha256: str
    training: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    intended_use: str = ""
    population: dict = field(default_factory=lambda: {"min_age_years": 0.0, "max_age_years": 200.0})
    image_check: dict = field(default_factory=dict)  # file, sha256, threshold, rule, features, figures
    operating_point: dict = field(default_factory=dict)  # the threshold rule's evidence and expectations
    limitations: list[str] = field(default_factory=list)
    experiments: list[str] = field(default_factory=list)
    # per population: name, min_age_years, max_age_years, description, temperature, threshold, threshold_rule,
    # validation, operating_point; empty in cards made before populations (one population, from the fields above)
    populations: list = field(default_factory=list)
    localisation: dict = field(default_factory=dict)  # heatmap vs radiologist boxes on validation (pointing game…)
    ablations: list = field(default_factory=list)  # rows: change, what it measured, figures with CIs
    attribution: list[str] = field(default_factory=list)  # what the training data's terms require us to carry

    def save(self, folder: Path) -> Path:
        """Write ``model_card.json`` into ``folder``."""
        path = folder / CARD_JSON
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path = WEIGHTS_DIR) -> "ModelCard":
        """Read ``model_card.json`` from ``folder`` (default: the shipped weights)."""
        return cls(**json.loads((folder / CARD_JSON).read_text()))


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def render_markdown(card: ModelCard) -> str:
    """The model card for people (``MODEL_CARD.md``)."""
    validation = card.validation
    ci = validation.get("ci95", {})

    def figure(name: str) -> str:
        low_high = ci.get(name)
        value = validation.get(name)
        if value is None:
            return "—"
        return f"{value:.4f}" + (f" (95 % CI {low_high[0]:.4f}–{low_high[1]:.4f})" if low_high else "")

    lines = [
        f"# Model card — {card.name} {card.version}",
        "",
        "**Not a medical device.** Research and triage-support use only; every finding must be read by a radiologist.",
        "",
        "| | |",
        "|---|---|",
        f"| Architecture | {card.architecture} |",
        f"| Labels | {', '.join(card.labels)} (output = probability of {card.labels[-1]}) |",
        f"| Input | {card.input_size}×{card.input_size} gray; {card.preprocessing} |",
        *(
            ["| Temperature, threshold | one per population — see *Populations and their operating points* |"]
            if len(card.populations) > 1
            else [
                f"| Temperature | {card.temperature:.4f} (temperature scaling fitted on validation) |",
                f"| Threshold | {card.threshold:.4f} — {card.threshold_rule} |",
            ]
        ),
        f"| Weights | `{card.weights_file}`, sha256 `{card.weights_sha256}` |",
        "",
        "## Intended use",
        "",
        card.intended_use,
        "",
        *_gate_lines(card),
        *(_operating_point_lines(card) if len(card.populations) <= 1 else []),
        *_population_lines(card),
        *_localisation_lines(card),
        "## Training",
        "",
        *[f"- **{key.replace('_', ' ')}**: {value}" for key, value in card.training.items()],
        "",
        f"## Validation (patient-grouped split of train, n = {validation.get('n')})",
        "",
        "| metric | value |",
        "|---|---|",
        *[
            f"| {name} | {figure(name)} |"
            for name in ("roc_auc", "pr_auc", "accuracy", "recall", "specificity", "precision", "f1", "ece")
        ],
        f"| confusion at threshold | {validation.get('confusion')} |",
        "",
        *_ablation_lines(card),
        "## What was tried and why",
        "",
        *[f"- {item}" for item in card.experiments],
        "",
        *(["## Attribution", "", *[f"- {item}" for item in card.attribution], ""] if card.attribution else []),
        "## Limitations",
        "",
        *[f"- {item}" for item in card.limitations],
        "",
    ]
    return "\n".join(lines)


def _gate_lines(card: ModelCard) -> list[str]:
    """The intended-use gate: population and image check (empty for cards without them)."""
    population, check = card.population, card.image_check
    if not check:
        return []
    refused = check.get("refused_share", {})
    ranges = [(point["min_age_years"], point["max_age_years"], point["description"]) for point in card.populations] or [
        (population.get("min_age_years"), population.get("max_age_years"), population.get("description", ""))
    ]
    agreement = check.get("population_agreement_validation")
    return [
        "## Intended-use gate",
        "",
        "- **Populations** (header rule): patient age "
        + "; or ".join(f"{low:g} to under {high:g} years — {text}" for low, high, text in ranges)
        + ". Any other age is refused. Age from Patient's Age or from Birth Date and the study date; an unknown "
        "age is left to the image check, which also chooses the population"
        + (
            " (it agrees with the true population for "
            + ", ".join(f"{share:.1%} of {name}" for name, share in agreement.items())
            + " of the validation split)"
            if agreement
            else ""
        )
        + ".",
        "- **Header rules**: CR/DX (or a Secondary Capture with chest hints), body part chest, frontal view.",
        f"- **Image check**: {check.get('rule')}; threshold {check.get('threshold', 0):.2f}; refuses "
        f"{refused.get('validation', 0):.1%} of the validation split and {refused.get('train', 0):.1%} of the "
        f"training side. File `{check.get('file')}`, sha256 `{check.get('sha256')}`.",
        *[f"- {line}" for line in check.get("figures", [])],
        "",
    ]


def _operating_point_lines(card: ModelCard) -> list[str]:
    """The shipped operating point: its rule and what a new site should expect."""
    point = card.operating_point
    if not point:
        return []
    return [
        "## Operating point",
        "",
        f'- **Rule** (its history is under "What was tried and why"): {point.get("rule")}.',
        f"- **Threshold** {card.threshold:.4f}, temperature {card.temperature:.4f}.",
        *[f"- {line}" for line in point.get("expectation", [])],
        "- A site that wants its own point fits one on 100–300 of its own labelled cases: "
        "`lungvision calibrate --data DIR --out site.json`, then `model.site_profile: site.json`.",
        "",
    ]


def _with_ci(figures: dict, name: str) -> str:
    value = figures.get(name)
    if value is None:
        return "—"
    low_high = figures.get("ci95", {}).get(name)
    return f"{value:.3f}" + (f" ({low_high[0]:.3f}–{low_high[1]:.3f})" if low_high else "")


def _population_lines(card: ModelCard) -> list[str]:
    """One operating point and validation table per population (empty for single-population cards)."""
    if not card.populations:
        return []
    lines = [
        "## Populations and their operating points",
        "",
        "The population is the one whose age range holds the header's patient age; without an age, the image "
        "check's nearest population. Figures: patient-grouped validation split, 95 % bootstrap CIs.",
        "",
        "| population | ages | n | threshold | temperature | AUC | sensitivity | specificity | accuracy |",
        "|---|---|---:|---:|---:|---|---|---|---|",
    ]
    for point in card.populations:
        validation = point["validation"]
        lines.append(
            f"| {point['name']} | {point['min_age_years']:g} to <{point['max_age_years']:g} | "
            f"{validation['n']} | {point['threshold']:.4f} | {point['temperature']:.3f} | "
            f"{_with_ci(validation, 'roc_auc')} | {_with_ci(validation, 'recall')} | "
            f"{_with_ci(validation, 'specificity')} | {_with_ci(validation, 'accuracy')} |"
        )
        for source, figures in point.get("validation_by_source", {}).items():
            lines.append(
                f"| {point['name']}: {source} only | | {figures['n']} | | | {_with_ci(figures, 'roc_auc')} | "
                f"{_with_ci(figures, 'recall')} | {_with_ci(figures, 'specificity')} | "
                f"{_with_ci(figures, 'accuracy')} |"
            )
    lines.append("")
    for point in card.populations:
        lines += [
            f"- **{point['name']}** ({point['description']}): {point['threshold_rule']}.",
            *[f"  - {line}" for line in point.get("operating_point", {}).get("expectation", [])],
        ]
    return lines + [""]


def _localisation_lines(card: ModelCard) -> list[str]:
    """How often the heatmap points at the radiologists' boxes, against two baselines."""
    figures = card.localisation
    if not figures.get("n"):
        return []
    rows = []
    for kind, variant in figures.get("variants", {figures.get("heatmap", "gradcam"): figures}).items():
        shipped = " (shipped)" if kind == figures.get("heatmap") else ""
        rows.append(f"| {kind}{shipped} | {_with_ci(variant, 'pointing')} | {_with_ci(variant, 'energy')} |")
    return [
        "## Heatmap localisation",
        "",
        f"{figures.get('data', '')}, n = {figures['n']} (95 % bootstrap CIs). Shipped heatmap: "
        f"{figures.get('heatmap')} — {figures.get('rule', '')}.",
        "",
        "| heatmap | peak inside a box (pointing game) | share of heatmap energy inside the boxes |",
        "|---|---|---|",
        *rows,
        f"| baseline: image centre / uniform map | {_with_ci(figures, 'pointing_centre')} | "
        f"{_with_ci(figures, 'energy_uniform')} |",
        "",
        "Check it on your own boxed DICOMs: `lungvision evaluate --data DIR --boxes boxes.csv --out OUT`.",
        "",
    ]


FIGURE_NAMES = {  # figure keys of ``finalise.population_validation`` → table headings
    "auc_children": "AUC children",
    "auc_adults": "AUC adults",
    "auc_adults_rsna": "AUC adults RSNA",
    "auc_adults_nih": "AUC adults NIH",
    "specificity_at_sensitivity_0.90_rsna": "RSNA specificity at sensitivity 0.90",
    "pointing_gradcam": "peak in box (Grad-CAM)",
    "energy_gradcam": "energy in boxes (Grad-CAM)",
    "pointing_cam-range": "peak in box (CAM)",
    "energy_cam-range": "energy in boxes (CAM)",
}


def _ablation_lines(card: ModelCard) -> list[str]:
    """What each training choice bought, one change at a time."""
    if not card.ablations:
        return []
    head = card.ablations[0]
    columns = [key for key in head["figures"] if key != "ci95"]
    lines = [
        "## Ablations (one change at a time)",
        "",
        head.get("protocol", ""),
        "",
        "| change | " + " | ".join(FIGURE_NAMES.get(name, name) for name in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in card.ablations:
        lines.append(f"| {row['change']} | " + " | ".join(_with_ci(row["figures"], name) for name in columns) + " |")
    return lines + [""]
