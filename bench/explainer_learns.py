"""Does the explainer learn to read the image? Gemma 3 270M, before and after training the prompt
learner and image projection on synthetic defects, on the CPU, for a bounded time.

The bundled washer samples (and their mirror images) are the product. Training images: the eight
normal samples, four of them the bank the maps are matched against, the others the bases of NSA /
cut-paste / noise defects. Held-out images: synthetic defects and plain parts made from the three
good test samples, which training never sees. Each held-out image is asked AnomalyGPT's question;
the answer's yes/no is scored against the label and, for defects, its location words against the
mask's (3 x 3 grid). Chance is the majority class for yes/no and the better of 1/9 and the most
common location set for locations. Encoder: the tiny preset (random weights), so the maps come
from few-shot matching of random features; the figures are about the explainer, not the encoder.

    python bench/explainer_learns.py [--minutes 12] [--train 256] [--test 48] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# Run as a script, this file's directory (bench/) comes first on sys.path, and bench/pipeline.py
# would hide the `pipeline` package: the repository root goes ahead of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.checkpoint import load_checkpoint
from pipeline.detector import Detector, DetectorConfig
from pipeline.explainer import Explainer, ExplainerConfig, Grounding, question_for
from pipeline.images import load_image
from pipeline.llm import EMBEDDED_LLM, load_llm
from pipeline.memory import MemoryBank
from pipeline.metrics import answer_accuracy, location_accuracy, location_words
from pipeline.synthetic import SyntheticDataset
from pipeline.training import (
    ExplainerTrainingConfig,
    detector_view,
    locations_for_mask,
    split_references,
    train_explainer,
)

SAMPLES = Path(__file__).resolve().parents[1] / "pipeline" / "samples"
CLASS_NAME = "washer"


def mirrored(images: list[Image.Image]) -> list[Image.Image]:
    """Each image, mirrored left-right, top-bottom and both: more distinct parts, same product
    (the belt's stripes stay vertical, so the bank still matches them)."""
    views = []
    for image in images:
        views += [image, ImageOps.mirror(image), ImageOps.flip(image)]
        views.append(ImageOps.flip(ImageOps.mirror(image)))
    return views


def ask(
    explainer: Explainer,
    detector: Detector,
    bank: MemoryBank,
    images: list[Image.Image],
    batch_size: int = 8,
) -> list[str]:
    answers = []
    question = question_for(CLASS_NAME)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        embeddings, maps = detector_view(detector, batch, bank, CLASS_NAME)
        explanations = explainer.explain(embeddings, maps, [question] * len(batch))
        answers += [explanation.text for explanation in explanations]
    return answers


def score(answers: list[str], labels: np.ndarray, locations: list[frozenset[str]]) -> dict:
    anomalous = [index for index, label in enumerate(labels) if label]
    examples = [
        f"{'defect' if labels[i] else 'normal'} {sorted(locations[i])}: {answers[i]!r}"
        for i in (*np.flatnonzero(~labels)[:1], *anomalous[:2])
    ]
    return {
        "examples": examples,
        "yes/no": answer_accuracy(answers, labels),
        "location": location_accuracy(
            [answers[index] for index in anomalous], [locations[index] for index in anomalous]
        ),
        "answers": Counter(_kind_of(answer) for answer in answers),
    }


def _kind_of(answer: str) -> str:
    text = answer.strip().lower()
    if text.startswith("yes"):
        return "yes+location" if location_words(text) else "yes"
    if text.startswith("no"):
        return "no"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=12.0, help="training time budget")
    parser.add_argument("--train", type=int, default=256, help="distinct training samples")
    parser.add_argument("--test", type=int, default=48, help="held-out samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--k-shot", type=int, default=4)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(arguments.seed)

    train_normals = mirrored([load_image(p) for p in sorted((SAMPLES / "normal").glob("*.jpg"))])
    test_parts = [load_image(p) for p in sorted((SAMPLES / "test").glob("good_*.jpg"))]
    detector = Detector(DetectorConfig(device="cpu"))
    started = time.perf_counter()
    llm = load_llm(EMBEDDED_LLM)
    print(f"LLM {llm.identity} loaded in {time.perf_counter() - started:.1f} s")

    # The held-out set: parts training never saw, half of them given a synthetic defect.
    held_out = SyntheticDataset(
        mirrored(test_parts),
        seed=arguments.seed + 1000,
        normal_fraction=0.5,
        length=arguments.test,
        image_size=detector.image_size,
    )
    samples = list(held_out)
    images = [sample.image for sample in samples]
    labels = np.array([sample.anomalous for sample in samples])
    locations = [locations_for_mask(sample.mask) for sample in samples]
    anomalous_locations = [locations[index] for index in np.flatnonzero(labels)]
    yes_no_chance = max(labels.mean(), 1 - labels.mean())
    common = Counter(anomalous_locations).most_common(1)[0][1] / len(anomalous_locations)
    location_chance = max(1 / 9, common)

    config = ExplainerTrainingConfig(
        steps=1_000_000,
        batch_size=arguments.batch_size,
        learning_rate=arguments.learning_rate,
        pool_size=arguments.train,
        k_shot=arguments.k_shot,
        class_name=CLASS_NAME,
        seed=arguments.seed,
        save_every=1_000_000,
        max_seconds=arguments.minutes * 60,
    )
    references, _ = split_references(train_normals, config.k_shot, config.seed)
    bank = detector.build_bank(references, class_name=CLASS_NAME)

    # Before: the explainer exactly as training starts it (same seed), soft prompts untrained.
    untrained = Explainer(llm, detector.encoder.embed_dim, Grounding.IMAGE, 32, arguments.seed)
    started = time.perf_counter()
    before = score(ask(untrained, detector, bank, images), labels, locations)
    print(f"asked {len(images)} held-out images in {time.perf_counter() - started:.0f} s")

    with tempfile.TemporaryDirectory() as directory:
        result = train_explainer(detector, llm, train_normals, directory, config, progress=True)
        checkpoint = load_checkpoint(directory, detector.encoder.fingerprint, llm.identity)
        trained = Explainer.from_config(
            ExplainerConfig(max_new_tokens=32), llm, detector.encoder.embed_dim, checkpoint
        )
    after = score(ask(trained, detector, bank, images), labels, locations)

    losses = np.array(result.losses)
    window = max(1, min(20, len(losses) // 10))
    print()
    print(
        f"training: {result.step} steps x batch {config.batch_size} in {result.seconds / 60:.1f} "
        f"min on the CPU ({result.seconds / max(1, result.step):.2f} s/step), "
        f"{config.pool_size} distinct samples, grounding {trained.grounding.value}"
    )
    deciles = [
        float(np.mean(part)) for part in np.array_split(losses, min(10, len(losses))) if len(part)
    ]
    print(
        f"loss: first {window} steps {losses[:window].mean():.3f}, last {window} steps "
        f"{losses[-window:].mean():.3f}; by tenths of the run: "
        + " ".join(f"{value:.3f}" for value in deciles)
    )
    print(
        f"held-out: {len(samples)} images ({int(labels.sum())} with a defect), bases never seen "
        "in training"
    )
    print(f"{'':<22}{'before':>8}{'after':>8}{'chance':>8}")
    print(
        f"{'yes/no accuracy':<22}{before['yes/no']:>8.3f}{after['yes/no']:>8.3f}"
        f"{yes_no_chance:>8.3f}"
    )
    print(
        f"{'location accuracy':<22}{before['location']:>8.3f}{after['location']:>8.3f}"
        f"{location_chance:>8.3f}"
    )
    for name, outcome in (("before", before), ("after", after)):
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(outcome["answers"].items()))
        print(f"answers {name}: {kinds}")
        for example in outcome["examples"]:
            print(f"  {example}")


if __name__ == "__main__":
    main()
