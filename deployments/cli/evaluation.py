"""`defectscope eval`, `calibrate`, `train decoder` and `train explainer`: measuring and training
the method on a product's own images."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from deployments.cli.inspection import (
    add_model_options,
    add_redis_options,
    detector_config,
    read_images,
)
from pipeline.errors import DefectscopeError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from bankstore import BankStore
    from pipeline.detector import Detector
    from pipeline.encoder import EncoderConfig
    from pipeline.evaluation import EvaluationReport
    from pipeline.memory import MemoryBank
    from pipeline.training import TrainingResult

TABLE_COLUMNS = (
    ("image_auroc", "image AUROC"),
    ("image_f1_max", "image F1-max"),
    ("pixel_auroc", "pixel AUROC"),
    ("pixel_f1_max", "pixel F1-max"),
    ("aupro", "AUPRO"),
    ("answer_accuracy", "answer acc."),
)
WEIGHTS_NOTE = (
    "These figures measure the encoder and checkpoint named above; other weights give other "
    "figures."
)
IN_BANK_SCORE = 1e-4
"""A normal image scoring below this matches the bank patch for patch: it is one of its
references, and its score says nothing about new good parts."""
RANDOM_WEIGHTS_NOTE = (
    "The encoder has random weights (tiny preset): the figures check the machinery, they say "
    "nothing about how well real parts are inspected."
)


def register(commands: argparse._SubParsersAction) -> None:
    _register_eval(commands)
    _register_calibrate(commands)
    _register_train(commands)


# eval -------------------------------------------------------------------------------------------


def _register_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="measure image/pixel AUROC, AUPRO and F1-max on a benchmark dataset",
        description="Evaluate the few-shot detector per class of an MVTec AD, VisA or folder "
        "dataset: k normal references per class build the bank, every other test image is "
        "inspected. Prints a markdown table (or JSON); the figures depend on the weights used.",
    )
    parser.add_argument("--dataset", required=True, choices=["mvtec", "visa", "folder"])
    parser.add_argument("--root", required=True, type=Path, help="the dataset's root directory")
    parser.add_argument("--classes", nargs="+", metavar="CLASS", help="classes to evaluate")
    parser.add_argument("--k-shot", type=int, default=4, help="normal references per class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference draw")
    parser.add_argument("--augment", action="store_true", help="add rotated references (x4)")
    parser.add_argument("--json", action="store_true", help="print one JSON report")
    parser.add_argument("--out", type=Path, help="write results.json and worst-case overlays here")
    parser.add_argument(
        "--worst", type=int, default=3, help="overlays per class of the worst normals/anomalies"
    )
    add_model_options(parser)
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipeline.datasets import few_shot_references, held_out, load_dataset
    from pipeline.detector import Detector
    from pipeline.evaluation import evaluate

    splits = load_dataset(args.dataset, args.root, args.classes)
    # Drawing the references here first refuses a bad --k-shot before any model is loaded.
    total = sum(len(held_out(s, few_shot_references(s, args.k_shot, args.seed))) for s in splits)
    detector = Detector(detector_config(args))

    with tqdm(total=total, desc="evaluating", unit="image", disable=not sys.stderr.isatty()) as bar:
        report = evaluate(
            detector,
            splits,
            args.k_shot,
            args.seed,
            augment=args.augment,
            worst=args.worst,
            on_images=bar.update,
        )
    random_weights = detector.encoder.fingerprint.weights.startswith("random:")
    if args.out:
        write_evaluation(args.out, report)
    if args.json:
        document = {
            "dataset": args.dataset,
            "root": str(args.root),
            "checkpoint": args.checkpoint,
            **report.to_dict(),
            "note": RANDOM_WEIGHTS_NOTE if random_weights else WEIGHTS_NOTE,
        }
        print(json.dumps(document))
    else:
        print(format_report(report, args.dataset, args.checkpoint, random_weights))
    return 0


def format_report(
    report: EvaluationReport, dataset: str, checkpoint: str | None, random_weights: bool
) -> str:
    """The per-class markdown table, its mean row, and what the figures depend on."""
    header = ["class", "normal", "anomalous", *(title for _, title in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for evaluation in report.classes:
        result = evaluation.result
        metrics = result.metrics()
        cells = [result.class_name, str(result.normal_count), str(result.anomalous_count)]
        cells += [_cell(metrics[name]) for name, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    normal = sum(evaluation.result.normal_count for evaluation in report.classes)
    anomalous = sum(evaluation.result.anomalous_count for evaluation in report.classes)
    cells = ["**mean**", str(normal), str(anomalous)]
    cells += [_cell(report.mean[name]) for name, _ in TABLE_COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{dataset}, {report.k_shot}-shot, seed {report.seed}; encoder {report.encoder}; "
        f"checkpoint {checkpoint or 'none'}."
    )
    lines.append(RANDOM_WEIGHTS_NOTE if random_weights else WEIGHTS_NOTE)
    return "\n".join(lines)


def write_evaluation(directory: Path, report: EvaluationReport) -> None:
    """results.json, and per class overlays of the worst normal and anomalous cases."""
    from pipeline.overlay import overlay

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    for evaluation in report.classes:
        class_dir = directory / evaluation.result.class_name
        class_dir.mkdir(exist_ok=True)
        for group, cases in (
            ("normal", evaluation.worst_normals),
            ("anomalous", evaluation.worst_anomalies),
        ):
            for rank, case in enumerate(cases, start=1):
                inspection = case.inspection
                picture = overlay(
                    case.sample.load_image(),
                    inspection.anomaly_map,
                    inspection.threshold,
                    inspection.regions,
                )
                name = f"worst_{group}_{rank}_{case.sample.defect_type}_{case.sample.path.stem}"
                picture.save(class_dir / f"{name}.png")


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# calibrate --------------------------------------------------------------------------------------


def _register_calibrate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "calibrate",
        help="set a product's threshold from its normal (and defect) images",
        description="Score images against the product's stored bank and store the threshold "
        "with it: above the normal scores by their spread when there are only normal images, "
        "else the point of best F1. The normal images must not be the bank's own references.",
    )
    parser.add_argument("product", help="a product whose bank is stored")
    parser.add_argument(
        "--normal",
        nargs="+",
        type=Path,
        required=True,
        metavar="IMAGE",
        help="good parts that are not in the bank (files or directories)",
    )
    parser.add_argument(
        "--defects",
        nargs="+",
        type=Path,
        default=[],
        metavar="IMAGE",
        help="defective parts (files or directories)",
    )
    parser.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="also score N synthetic anomalies made from the normal images",
    )
    parser.add_argument("--class-name", help="what the product is (default: as stored)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic anomalies")
    add_redis_options(parser)
    parser.add_argument("--dry-run", action="store_true", help="compute, but store nothing")
    parser.add_argument("--json", action="store_true", help="print the calibration as JSON")
    add_model_options(parser)
    parser.set_defaults(run=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import numpy as np

    from pipeline.calibration import calibrate
    from pipeline.detector import Detector, ExplainPolicy
    from pipeline.synthetic import SyntheticDataset

    store = _connect_store(args.redis_url, args.redis_prefix)
    normals = _load_images(args.normal, "normal")
    defects = _load_images(args.defects, "defect") if args.defects else []
    config = replace(detector_config(args), explainer=None, explain=ExplainPolicy.NEVER)
    detector = Detector(config)
    stored = store.get(args.product, fingerprint=detector.encoder.fingerprint)
    class_name = args.class_name or stored.info.class_name

    normal_scores = _scores(detector, normals, stored.bank, class_name)
    in_bank = normal_scores < IN_BANK_SCORE
    if in_bank.all():
        raise DefectscopeError(
            f"every normal image scores {IN_BANK_SCORE:g} or less against the bank of "
            f"{args.product!r}: they are its own references; calibrate with other good parts"
        )
    if in_bank.any():
        print(
            f"defectscope: warning: left out {int(in_bank.sum())} normal image(s) that are in "
            "the bank (they match it exactly)",
            file=sys.stderr,
        )
    normal_scores = normal_scores[~in_bank]

    defect_scores = [_scores(detector, defects, stored.bank, class_name)] if defects else []
    if args.synthetic > 0:
        synthetic = SyntheticDataset(
            normals,
            args.seed,
            normal_fraction=0.0,
            length=args.synthetic,
            image_size=detector.image_size,
        )
        images = [sample.image for sample in synthetic]
        defect_scores.append(_scores(detector, images, stored.bank, class_name))
    counts = {
        "normal": int(normal_scores.size),
        "defect": len(defects),
        "synthetic": args.synthetic,
    }
    calibration = calibrate(
        normal_scores, np.concatenate(defect_scores) if defect_scores else None, counts
    )
    if not args.dry_run:
        store.set_calibration(args.product, calibration.threshold, calibration.to_dict())

    if args.json:
        print(
            json.dumps(
                {"product": args.product, "stored": not args.dry_run, **calibration.to_dict()}
            )
        )
    else:
        f1 = "" if calibration.f1 is None else f", F1 {calibration.f1:.3f}"
        print(
            f"{args.product}: threshold {calibration.threshold:.4f} ({calibration.method.value}"
            f"{f1}) from {counts['normal']} normal, {counts['defect']} defect and "
            f"{counts['synthetic']} synthetic images"
            + (" (dry run, not stored)" if args.dry_run else "; stored")
        )
    return 0


def _connect_store(url: str | None, prefix: str | None) -> BankStore:
    from bankstore import BankStore

    return BankStore.connect(url, prefix=prefix)


def _scores(
    detector: Detector, images: Sequence[Image.Image], bank: MemoryBank, class_name: str | None
) -> np.ndarray:
    import numpy as np

    progress = len(images) >= 8 and sys.stderr.isatty()
    results = detector.inspect(images, bank=bank, class_name=class_name, progress=progress)
    return np.array([result.score for result in results])


# train ------------------------------------------------------------------------------------------


def _register_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train the decoder or the explainer on synthetic anomalies",
        description="Train on synthetic anomalies (NSA, cut-paste, noise) made from a "
        "product's normal images. Checkpoints are resumable (--resume).",
    )
    which = parser.add_subparsers(dest="part", required=True, metavar="PART")

    decoder = which.add_parser(
        "decoder",
        help="the zero-shot decoder's per-stage projections (focal + dice loss)",
        description="Train the zero-shot decoder (Eq. 1) with focal + dice loss on synthetic "
        "masks; writes a checkpoint with the decoder part.",
    )
    _add_training_options(decoder, steps=500, batch_size=8, learning_rate=1e-3)
    decoder.add_argument(
        "--normal-fraction", type=float, default=0.25, help="share of normal samples"
    )
    decoder.add_argument("--weight-decay", type=float, default=0.01)
    decoder.set_defaults(run=run_train_decoder)

    explainer = which.add_parser(
        "explainer",
        help="the prompt learner and image projection (optionally LoRA) for an LLM",
        description="Train the prompt learner and image projection (and LoRA adapters with "
        "--lora) with the LLM's cross-entropy on answers made from synthetic masks; writes a "
        "checkpoint with the prompt_learner and image_projection parts (and the decoder of "
        "--checkpoint, when it has one).",
    )
    _add_training_options(explainer, steps=500, batch_size=4, learning_rate=1e-3)
    explainer.add_argument(
        "--llm", default="gemma3-270m", help="'gemma3-270m', a .gguf file or a model directory"
    )
    explainer.add_argument(
        "--checkpoint", help="a checkpoint with a trained decoder, for zero-shot or mean fusion"
    )
    explainer.add_argument(
        "--fusion", default="auto", choices=["auto", "fewshot", "zeroshot", "mean"]
    )
    explainer.add_argument(
        "--k-shot", type=int, default=4, help="normal images in the bank that makes the maps"
    )
    explainer.add_argument("--augment", action="store_true", help="rotated bank references")
    explainer.add_argument("--normal-fraction", type=float, default=0.5)
    explainer.add_argument(
        "--lora", type=int, metavar="RANK", help="also train LoRA adapters of this rank"
    )
    explainer.set_defaults(run=run_train_explainer)


def _add_training_options(
    parser: argparse.ArgumentParser, steps: int, batch_size: int, learning_rate: float
) -> None:
    from pipeline.encoder import PRESETS
    from pipeline.synthetic import SYNTHETIC_KINDS

    parser.add_argument(
        "--normal",
        nargs="+",
        type=Path,
        required=True,
        metavar="IMAGE",
        help="normal images of the product (files or directories)",
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--steps", type=int, default=steps, help="total optimizer steps")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--learning-rate", type=float, default=learning_rate)
    parser.add_argument("--pool-size", type=int, default=256, help="distinct synthetic samples")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=list(SYNTHETIC_KINDS),
        choices=SYNTHETIC_KINDS,
        help="synthetic anomaly kinds",
    )
    parser.add_argument("--class-name", help="what the product is, e.g. 'washer'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    parser.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="encoder preset")
    model.add_argument("--model-name", help="any open_clip ViT name (overrides the preset's)")
    model.add_argument("--weights", help="encoder weights: a file, a cached tag, or 'random'")
    model.add_argument("--device", help="cuda, cuda:1, cpu (default: CUDA when present)")


def run_train_decoder(args: argparse.Namespace) -> int:
    from pipeline.encoder import load_encoder
    from pipeline.training import DecoderTrainingConfig, train_decoder

    _check_output(args.out, args.resume)
    normals = _load_images(args.normal, "normal")
    encoder = load_encoder(_encoder_config(args), args.device)
    config = DecoderTrainingConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        normal_fraction=args.normal_fraction,
        kinds=tuple(args.kinds),
        pool_size=args.pool_size,
        class_name=args.class_name,
        seed=args.seed,
        save_every=args.save_every,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
    )
    result = train_decoder(
        encoder, normals, args.out, config, resume=args.resume, progress=sys.stderr.isatty()
    )
    print(format_training("decoder", result, args.json))
    return 0


def run_train_explainer(args: argparse.Namespace) -> int:
    from pipeline.detector import Detector, DetectorConfig
    from pipeline.llm import load_llm
    from pipeline.postprocess import Fusion
    from pipeline.training import ExplainerTrainingConfig, train_explainer

    _check_output(args.out, args.resume)
    normals = _load_images(args.normal, "normal")
    detector = Detector(
        DetectorConfig(
            encoder=_encoder_config(args),
            checkpoint=args.checkpoint,
            fusion=Fusion(args.fusion),
            device=args.device,
        )
    )
    llm = load_llm(args.llm, detector.device)
    config = ExplainerTrainingConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        normal_fraction=args.normal_fraction,
        kinds=tuple(args.kinds),
        pool_size=args.pool_size,
        k_shot=args.k_shot,
        augment_bank=args.augment,
        lora_rank=args.lora,
        class_name=args.class_name,
        seed=args.seed,
        save_every=args.save_every,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
    )
    result = train_explainer(
        detector, llm, normals, args.out, config, resume=args.resume, progress=sys.stderr.isatty()
    )
    print(format_training("explainer", result, args.json))
    return 0


def format_training(part: str, result: TrainingResult, as_json: bool) -> str:
    """One line (or a JSON object) on what a training run did."""
    losses = result.run_losses
    window = max(1, min(10, len(losses) // 4))
    first = sum(losses[:window]) / window if losses else None
    last = sum(losses[-window:]) / window if losses else None
    if as_json:
        return json.dumps(
            {
                "part": part,
                "checkpoint": str(result.checkpoint),
                "start_step": result.start_step,
                "step": result.step,
                "first_loss": first,
                "last_loss": last,
                "seconds": round(result.seconds, 3),
            }
        )
    if not losses:
        return f"{part}: already at step {result.step}; checkpoint {result.checkpoint}"
    return (
        f"{part} trained steps {result.start_step}..{result.step} in {result.seconds:.1f} s: "
        f"loss {first:.4f} -> {last:.4f} (mean of the first and last {window}); "
        f"checkpoint {result.checkpoint}"
    )


def _encoder_config(args: argparse.Namespace) -> EncoderConfig:
    from pipeline.encoder import EncoderConfig

    return EncoderConfig(preset=args.preset, model_name=args.model_name, weights=args.weights)


def _check_output(directory: Path, resume: bool) -> None:
    from pipeline.checkpoint import CONFIG_FILE

    exists = (directory / CONFIG_FILE).is_file()
    if exists and not resume:
        raise DefectscopeError(
            f"{directory} already holds a checkpoint; pass --resume to continue it or choose "
            "another --out"
        )
    if resume and not exists:
        raise DefectscopeError(f"{directory}: no checkpoint to resume")


def _load_images(paths: Sequence[Path], what: str) -> list[Image.Image]:
    """Decodes image files and every image in the given directories; refuses unreadable ones."""
    from pipeline.datasets import IMAGE_SUFFIXES

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DefectscopeError(f"{path}: no {what} images in this directory")
            files.extend(found)
        else:
            files.append(path)
    images, failures = read_images(files)
    if failures:
        raise DefectscopeError(f"{what} image {failures[0]}" + _more(len(failures) - 1))
    return [image for _, image in images]


def _more(count: int) -> str:
    return f" (and {count} more)" if count else ""
