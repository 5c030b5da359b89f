"""Publishing — a finished training run becomes its model card (JSON for code, Markdown for people).

To ship a run, copy ``lungvision-resnet18.safetensors``, ``image-check.safetensors``,
``model_card.json`` and ``MODEL_CARD.md`` from the run folder into ``inference/weights/``.
"""

import platform
import shutil
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import load_file

from inference.finalise import THRESHOLD_RULE, finalise
from inference.model_card import WEIGHTS_DIR, ModelCard, render_markdown, sha256_of
from inference.network import build_resnet18
from inference.train import WEIGHTS_NAME, TrainOptions, split_images

PREPROCESSING = (
    "gray image (DICOM after Modality LUT, VOI LUT/window and MONOCHROME1 inversion) min–max scaled to 0..255, "
    "squashed to a 224×224 square (aspect ratio not kept, like a third of the training images), resized to the "
    "input size, contrast-stretched between its own 1st and 99th percentiles, standardised ((x − 0.5) / 0.25)"
)

EXPERIMENTS = [
    "Aspect ratio: every image is squashed to a 224 px square first, because 3537 training images exist only "
    "as 224/227 px squares; both kinds then look alike and the model cannot learn which kind it sees.",
    "Intensity: per-image 1st–99th percentile stretch at train and serve time, so exposure, window and "
    "detector differences drop out before the network (a reference run showed global normalisation alone "
    "does not close the train→test gap, so it is combined with the augmentations below).",
    "Augmentation against acquisition shift: random resized crops (60–100 % area, aspect 0.8–1.25), "
    "horizontal flips, ±10° rotation, 5 % translation, 5° shear, gamma 0.6–1.6, brightness/contrast jitter, "
    "blur, sharpening, resolution loss (downsample to 45–100 % and back), Gaussian noise.",
    "Shortcut suppression: random dark bands on the left/right edges (the known dark-border shortcut) "
    "and random erasing of small patches (burned-in markers).",
    "Class imbalance: balanced sampling (each batch draws NORMAL and PNEUMONIA equally often).",
    "Regularisation: label smoothing 0.05, AdamW weight decay 0.05, and an exponential moving average of the "
    "weights (decay 0.998) — the EMA weights are the ones shipped.",
    "Operating point, version 1 (model 1.0.20261125): the highest threshold keeping clean validation sensitivity "
    "≥ 0.98 (0.060). It sat in the far tail of the positives' scores, where a new site's normals also land, and "
    "over-called there. Version 2 (this card) chooses the best Youden index on a stressed validation split (every "
    "validation image under 4 seeded draws of the training augmentation) among thresholds keeping sensitivity ≥ "
    "0.95 on both the stressed and the clean split. The rule was first stated with the floor on the stressed split "
    "only; that gave threshold 0.466 with clean validation sensitivity 0.903 (augmentation raises pneumonia scores, "
    "so the stressed split hid the misses), below the triage floor the rule meant to keep, so the floor was extended "
    "to the clean split — decided on validation figures only, no test figure was seen.",
    "Intended-use image check: Mahalanobis distance of the four residual stages' pooled features to the training "
    "classes, threshold at the 99 % quantile of the validation split. Chosen in scripts/gate_design.py on the design "
    "half of the adult training images (by patient group), refusing at 1.1 % of pediatric validation: layer3+4 "
    "means 59.5 %, layer1–4 means 65.5 % (chosen), layer2–4 means 62.3 %, layer3+4 means and stds 58.9 %, "
    "layer3 mean + layer4 2×2 grid 64.9 %, layer1–4 means and stds 63.8 %, per-layer scores combined 48.2–57.7 %, "
    "nearest-neighbour distances 11.1–25.8 % of adults refused.",
    "What each choice bought is NOT measured: the CPU budget allowed one 20-epoch run, so nothing above was "
    "ablated. Observed for the shipped run: validation AUC 0.9955 (the reference run without the shift "
    "augmentations reached 0.999 on its own split — harder augmentation costs in-distribution fit, which "
    "is the intended trade); validation images that exist at original resolution (n = 256) and the "
    "squashed 224/227 px ones (n = 555) score alike (AUC 0.994 vs 0.996, specificity 0.952 vs 0.950 at the "
    "threshold), so the model does not separate the two kinds; on the 16-image Kaggle val folder (too small "
    "to tune on, never used for choices) AUC 0.969, sensitivity 8/8, specificity 3/8 at the threshold.",
    "Balanced sampling makes the network's raw output assume 50 % prevalence; the validation split has 74 %, "
    "so the calibrated probability understates pneumonia on populations like the training data (validation "
    "ECE 0.094); temperature scaling fixes spread, not bias. A site profile can refit the temperature.",
]

INTENDED_USE = (
    "Triage support for pneumonia on frontal (PA/AP) chest radiographs (CR/DX) of the population it was "
    "trained on: orders a reading worklist and shows where the model looked. Every result must be reviewed by "
    "a qualified radiologist. Images outside that population (other ages, lateral views, other body parts, "
    "non-radiographs, images unlike the training radiographs) are refused by the intended-use gate and get "
    "no probability."
)
POPULATION = "children aged one to five years (Kermany et al.: Guangzhou Women and Children's Medical Center)"

LIMITATIONS = [
    "Trained on pediatric (1–5 years) chest radiographs from one centre (Guangzhou Women and Children's "
    "Medical Center); performance on adult radiographs is unknown (domain shift in anatomy, projection, "
    "devices and disease mix).",
    "Binary NORMAL vs PNEUMONIA only: other findings (effusion, nodules, devices, COVID-19…) are not detected "
    "and may be called either way.",
    "The validation split comes from the same distribution as training and overestimates performance: a "
    "reference run scored AUC 0.999 on such a split and 0.954 on the withheld test split.",
    "Calibration (temperature) and threshold were fitted on that validation split; probabilities on other "
    "populations may be miscalibrated, and a new site should expect a lower specificity (see Operating point).",
    "Frontal (PA/AP) views only; lateral views, other body parts, other ages and images unlike the training "
    "radiographs are refused by the intended-use gate. Its image check is not perfect: about a third of adult "
    "films without an age in the header pass it (see Intended-use gate), so the header's patient age matters.",
    "Not a medical device; not cleared or approved for clinical use.",
]


def write_model_card(run_dir: Path, summary: dict, options: TrainOptions) -> Path:
    """Write ``model_card.json`` and ``MODEL_CARD.md`` for the weights in ``run_dir``."""
    weights = run_dir / WEIGHTS_NAME
    card = ModelCard(
        name="lungvision-resnet18",
        version=f"1.0.{date.today():%Y%m%d}",
        architecture="ResNet-18 (torchvision, weights=None) with a 1-channel stem and one output logit; "
        "trained from scratch, no pretrained weights",
        labels=["NORMAL", "PNEUMONIA"],
        input_size=options.input_size,
        preprocessing=PREPROCESSING,
        temperature=summary["temperature"],
        threshold=summary["threshold"],
        threshold_rule=THRESHOLD_RULE,
        weights_file=WEIGHTS_NAME,
        weights_sha256=sha256_of(weights),
        training={
            "data": "Kermany et al. 2018 pediatric chest X-ray (Mendeley v2, CC BY 4.0), Kaggle train split",
            "split_rule": f"patient-grouped, seed {options.seed}, {options.val_fraction:.0%} of each class's "
            "patients to validation (split.csv in the run folder)",
            "images": f"{summary['n_train']} train / {summary['n_val']} validation",
            "epochs": options.epochs,
            "batch_size": options.batch_size,
            "optimiser": f"AdamW lr {options.learning_rate}, weight decay {options.weight_decay}, "
            "1 warm-up epoch then cosine decay",
            "label_smoothing": options.label_smoothing,
            "ema_decay": options.ema_decay,
            "training_minutes": round(summary["train_seconds"] / 60, 1),
            "decode_seconds": round(summary["decode_seconds"], 1),
            "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads",
            "torch": torch.__version__,
        },
        validation=summary["validation"],
        intended_use=INTENDED_USE,
        limitations=LIMITATIONS,
        experiments=EXPERIMENTS,
        population=population_of(options),
        image_check=summary["image_check"],
        operating_point=summary["operating_point"],
    )
    return save_card(card, run_dir)


def population_of(options: TrainOptions) -> dict:
    """The intended-use population the training data stands for."""
    return {"min_age_years": options.min_age_years, "max_age_years": options.max_age_years,
            "description": POPULATION}


def save_card(card: ModelCard, run_dir: Path) -> Path:
    """Write ``model_card.json`` and ``MODEL_CARD.md`` into ``run_dir``."""
    path = card.save(run_dir)
    (run_dir / "MODEL_CARD.md").write_text(render_markdown(card))
    return path


def refit(data_dir: Path, run_dir: Path, weights_dir: Path = WEIGHTS_DIR, options: TrainOptions = TrainOptions()) -> Path:
    """Finalise already trained weights again (calibration, operating point, image check) on the
    split they were trained with, and write weights + updated card into ``run_dir``."""
    card = ModelCard.load(weights_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    images, _ = split_images(data_dir, run_dir, replace(options, input_size=card.input_size))
    network = build_resnet18()
    network.load_state_dict(load_file(weights_dir / card.weights_file))
    finished = finalise(network, images, card.input_size, run_dir)
    if weights_dir.resolve() != run_dir.resolve():
        shutil.copyfile(weights_dir / card.weights_file, run_dir / card.weights_file)
    major, minor, _ = card.version.split(".")
    card = replace(card, version=f"{major}.{int(minor) + 1}.{date.today():%Y%m%d}", temperature=finished["temperature"], threshold=finished["threshold"],
                   threshold_rule=THRESHOLD_RULE, validation=finished["validation"], intended_use=INTENDED_USE,
                   population=population_of(options), image_check=finished["image_check"],
                   operating_point=finished["operating_point"], limitations=LIMITATIONS, experiments=EXPERIMENTS)
    return save_card(card, run_dir)



