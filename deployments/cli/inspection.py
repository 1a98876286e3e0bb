"""`defectscope inspect`: the method on local image files, no service needed."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import DefectscopeError

if TYPE_CHECKING:
    from PIL import Image

    from pipeline.detector import Detector, DetectorConfig, Inspection
    from pipeline.memory import MemoryBank

PROGRESS_FROM = 8
"""Show a progress bar from this many images on."""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect",
        help="inspect image files against normal references or a stored bank",
        description="Inspect image files. Give normal reference images (--normal) or a product "
        "whose memory bank is stored (--product); prints one verdict per image.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--normal", nargs="+", type=Path, default=[], metavar="REF", help="normal reference images"
    )
    source.add_argument("--product", help="use the stored memory bank of this product")
    parser.add_argument("--class-name", help="what the product is, e.g. 'washer'")
    parser.add_argument("--augment", action="store_true", help="add rotated references (x4)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per image")
    parser.add_argument("--heatmap-dir", type=Path, help="write an overlay PNG per image here")
    add_redis_options(parser)
    add_model_options(parser)
    parser.set_defaults(run=run_inspect)


def add_redis_options(parser: argparse.ArgumentParser) -> None:
    """--redis-url and --redis-prefix, for every command that talks to the bank store or streams."""
    group = parser.add_argument_group("Redis")
    group.add_argument(
        "--redis-url",
        help="redis://, rediss:// or unix:// URL (default: $REDIS_URL, else the embedded server)",
    )
    group.add_argument(
        "--redis-prefix",
        help="key prefix (default: $DEFECTSCOPE_REDIS_PREFIX, else 'defectscope:')",
    )


def redis_prefix(args: argparse.Namespace) -> str:
    """The key prefix the options name, resolved as BankStore resolves it."""
    from bankstore.keys import DEFAULT_PREFIX
    from bankstore.store import PREFIX_ENV

    return args.redis_prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options every command that builds a detector shares."""
    from pipeline.encoder import PRESETS

    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="encoder preset")
    model.add_argument("--model-name", help="any open_clip ViT name (overrides the preset's)")
    model.add_argument(
        "--weights", help="encoder weights: a checkpoint file, a cached open_clip tag, or 'random'"
    )
    model.add_argument("--checkpoint", help="directory of trained decoder/explainer parts")
    model.add_argument(
        "--llm",
        default="none",
        help="explainer LLM: 'gemma3-270m', a .gguf file, a transformers directory, or 'none' "
        "(answers from the regions; the default)",
    )
    model.add_argument(
        "--explain",
        default="anomalous",
        choices=["never", "anomalous", "always"],
        help="which images get an LLM answer",
    )
    model.add_argument("--threshold", type=float, help="fixed threshold instead of the calibrated")
    model.add_argument("--fusion", default="auto", choices=["auto", "fewshot", "zeroshot", "mean"])
    model.add_argument("--score", default="max", choices=["max", "topk"], help="image score")
    model.add_argument("--device", help="cuda, cuda:1, cpu (default: CUDA when present)")
    model.add_argument("--batch-size", type=int, default=16)


def detector_config(args: argparse.Namespace) -> DetectorConfig:
    """A DetectorConfig from the shared model options."""
    from pipeline.detector import DetectorConfig, ExplainPolicy
    from pipeline.encoder import EncoderConfig
    from pipeline.explainer import ExplainerConfig
    from pipeline.postprocess import Fusion, ScoreMode

    llm = None if args.llm in (None, "", "none") else args.llm
    return DetectorConfig(
        encoder=EncoderConfig(preset=args.preset, model_name=args.model_name, weights=args.weights),
        checkpoint=args.checkpoint,
        fusion=Fusion(args.fusion),
        score_mode=ScoreMode(args.score),
        threshold=args.threshold,
        explainer=ExplainerConfig(llm=llm, checkpoint=args.checkpoint) if llm else None,
        explain=ExplainPolicy(args.explain),
        device=args.device,
        batch_size=args.batch_size,
    )


def read_images(paths: Sequence[Path]) -> tuple[list[tuple[Path, Image.Image]], list[str]]:
    """Decodes what it can; returns the images and one error line per file that failed."""
    from pipeline.images import load_image

    images, errors = [], []
    for path in paths:
        try:
            images.append((path, load_image(path)))
        except DefectscopeError as error:
            errors.append(str(error))
    return images, errors


def run_inspect(args: argparse.Namespace) -> int:
    from pipeline.detector import Detector

    images, failures = read_images(args.images)
    for failure in failures:
        print(f"defectscope: error: {failure}", file=sys.stderr)
    if not images:
        print("defectscope: error: no image could be read", file=sys.stderr)
        return 1

    references: list[Image.Image] = []
    if args.normal:
        decoded, reference_failures = read_images(args.normal)
        for failure in reference_failures:
            print(f"defectscope: error: reference {failure}", file=sys.stderr)
        if not decoded:
            raise DefectscopeError("none of the normal reference images could be read")
        references = [image for _, image in decoded]

    detector = Detector(detector_config(args))
    bank = None
    if references:
        bank = detector.build_bank(references, augment=args.augment, class_name=args.class_name)
    elif args.product:
        bank, stored_class = load_product_bank(
            detector, args.product, args.redis_url, args.redis_prefix
        )
        args.class_name = args.class_name or stored_class

    progress = len(images) >= PROGRESS_FROM and sys.stderr.isatty()
    results = detector.inspect(
        [image for _, image in images], bank=bank, class_name=args.class_name, progress=progress
    )
    if args.heatmap_dir:
        write_heatmaps(args.heatmap_dir, images, results)
    for (path, _), result in zip(images, results, strict=True):
        print(format_result(path, result, as_json=args.json), flush=True)
    return 1 if failures else 0


def load_product_bank(
    detector: Detector, product: str, url: str | None = None, prefix: str | None = None
) -> tuple[MemoryBank, str | None]:
    """The stored bank of `product` (carrying its calibrated threshold when one is set) and the
    product's stored class name.

    The store is `url` (else `$REDIS_URL`, else the embedded server) under `prefix` (else
    `$DEFECTSCOPE_REDIS_PREFIX`); a bank made with another encoder is refused.
    """
    from bankstore import BankStore

    store = BankStore.connect(url, prefix=prefix)
    stored = store.get(product, fingerprint=detector.encoder.fingerprint)
    return stored.bank, stored.info.class_name


def format_result(path: Path, result: Inspection, as_json: bool) -> str:
    if as_json:
        return json.dumps({"path": str(path), **result.to_dict()})
    verdict = "ANOMALOUS" if result.anomalous else "ok"
    return (
        f"{path}: {verdict} score {result.score:.4f} (threshold {result.threshold:.4f}) "
        f"- {result.answer}"
    )


def write_heatmaps(
    directory: Path, images: list[tuple[Path, Image.Image]], results: list[Inspection]
) -> None:
    from pipeline.overlay import overlay

    directory.mkdir(parents=True, exist_ok=True)
    stems = [path.stem for path, _ in images]
    for index, ((path, image), result) in enumerate(zip(images, results, strict=True)):
        name = path.stem if stems.count(path.stem) == 1 else f"{index:04d}_{path.stem}"
        picture = overlay(image, result.anomaly_map, result.threshold, result.regions)
        picture.save(directory / f"{name}.png")
