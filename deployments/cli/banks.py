"""`defectscope bank ...` (memory banks in the bank store) and `defectscope redis ...` (the
embedded Redis server)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from deployments.cli.inspection import (
    add_model_options,
    add_redis_options,
    detector_config,
    read_images,
)
from pipeline.errors import BankError, DefectscopeError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from bankstore import BankInfo, BankStore, ProductInfo
    from pipeline.detector import Detector
    from pipeline.memory import MemoryBank


def register(commands: argparse._SubParsersAction) -> None:
    _register_bank(commands)
    _register_redis(commands)


def _register_bank(commands: argparse._SubParsersAction) -> None:
    bank = commands.add_parser(
        "bank",
        help="add, list, show, remove, export and import stored memory banks",
        description="Memory banks of normal patches, stored in Redis ($REDIS_URL, else the "
        "embedded server) and shared by every replica.",
    )
    actions = bank.add_subparsers(dest="bank_command", required=True, metavar="ACTION")
    store = argparse.ArgumentParser(add_help=False)
    add_redis_options(store)

    add = actions.add_parser(
        "add",
        parents=[store],
        help="build a product's bank from normal images, or append them to it",
        description="Encode normal images and store their patches as the product's bank. If the "
        "product has a bank, the images are appended as a new version, and the threshold rises "
        "to cover how they score against the old bank.",
    )
    add.add_argument("product", help="product name: letters, digits, '.', '_', '-'")
    add.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="normal images")
    add.add_argument("--augment", action="store_true", help="add 90/180/270 degree rotations")
    add.add_argument(
        "--coreset", type=_ratio, metavar="RATIO", help="keep this fraction of patches, in (0, 1]"
    )
    add.add_argument("--class-name", help="what the product is, e.g. 'washer'")
    add_model_options(add)
    add.set_defaults(run=run_add)

    listing = actions.add_parser("list", parents=[store], help="stored products, with stats")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=run_list)

    show = actions.add_parser(
        "show", parents=[store], help="a product's versions, patch counts, bytes and encoder"
    )
    show.add_argument("product")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=run_show)

    remove = actions.add_parser("rm", parents=[store], help="delete a product's banks")
    remove.add_argument("product")
    remove.set_defaults(run=run_rm)

    export = actions.add_parser(
        "export", parents=[store], help="write a product's bank to one safetensors file"
    )
    export.add_argument("product")
    export.add_argument("file", type=Path, metavar="FILE")
    export.add_argument("--version", type=int, help="a stored version (default: the current)")
    export.set_defaults(run=run_export)

    imported = actions.add_parser(
        "import", parents=[store], help="publish the bank of an export file"
    )
    imported.add_argument("file", type=Path, metavar="FILE")
    imported.add_argument("--product", help="store it under this name (default: the file's)")
    imported.set_defaults(run=run_import)


def _register_redis(commands: argparse._SubParsersAction) -> None:
    server = commands.add_parser(
        "redis",
        help="the embedded Redis server: status, start, stop",
        description="The Redis server defectscope starts on its own when REDIS_URL is not set "
        "($DEFECTSCOPE_DATA_DIR/redis, else ~/.local/share/defectscope/redis).",
    )
    actions = server.add_subparsers(dest="redis_command", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="which server is in use and how it is doing")
    status.add_argument("--redis-url", help="ask this server instead of $REDIS_URL / embedded")
    status.set_defaults(run=run_redis_status)
    actions.add_parser("start", help="start the embedded server").set_defaults(run=run_redis_start)
    actions.add_parser("stop", help="stop the embedded server").set_defaults(run=run_redis_stop)


# bank -------------------------------------------------------------------------------------------


def run_add(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pipeline.detector import Detector, ExplainPolicy, threshold_after_append

    store = _store(args)  # a Redis problem shows before the model loads
    images, failures = read_images(args.images)
    for failure in failures:
        print(f"defectscope: error: {failure}", file=sys.stderr)
    if not images:
        raise BankError(
            f"none of the {len(args.images)} images could be read; a bank needs at least one "
            "normal image"
        )
    sources = [_file_sha256(path) for path, _ in images]
    pictures = [image for _, image in images]

    config = replace(detector_config(args), explainer=None, explain=ExplainPolicy.NEVER)
    detector = Detector(config)
    fingerprint = detector.encoder.fingerprint
    progress = sys.stderr.isatty()
    if store.current_version(args.product) is None:
        bank = detector.build_bank(
            pictures, args.augment, args.coreset, class_name=args.class_name, progress=progress
        )
        result = store.publish(
            args.product, bank, fingerprint, sources, args.augment, args.coreset, args.class_name
        )
        origin = f"{len(images)} images"
    else:
        base = store.get(args.product, fingerprint=fingerprint)
        class_name = args.class_name or base.info.class_name
        bank = detector.build_bank(pictures, args.augment, class_name=class_name, progress=progress)
        # The new images are not in the old bank: their scores against it are held-out normals.
        scores = held_out_scores(detector, pictures, base.bank, class_name)
        threshold = threshold_after_append(base.info.threshold, scores)
        result = store.append(
            args.product,
            bank,
            fingerprint,
            sources,
            args.augment,
            args.coreset,
            threshold,
            args.class_name,
        )
        origin = f"version {result.base_version} + {len(images)} images"

    calibration = store.get_calibration(args.product)
    note = "" if calibration is None else f"; calibrated threshold {calibration.threshold:.4f} kept"
    print(
        f"{args.product}: version {result.version} = {origin}, {_summary(result.num_patches)}, "
        f"{_mebibytes(result.nbytes)}{note}"
    )
    return 1 if failures else 0


def held_out_scores(
    detector: Detector,
    images: Sequence[Image.Image],
    bank: MemoryBank,
    class_name: str | None,
) -> torch.Tensor:
    """(K,) image scores of images matched against a bank they are not part of.

    The maps are fused and scored exactly as `Detector.build_bank` does for its leave-one-out
    threshold, so the two kinds of normal score are comparable.
    """
    import torch

    from pipeline.postprocess import fuse_maps, image_scores

    config = detector.config
    scores = []
    with torch.inference_mode():
        for start in range(0, len(images), config.batch_size):
            batch = images[start : start + config.batch_size]
            output = detector.encode(detector.prepare(batch))
            fewshot = detector.fewshot_maps(output, bank)  # (B, S, S)
            zero_shot = (
                detector.zero_shot_maps(output, [class_name] * len(batch))
                if detector.needs_zero_shot(bank)
                else None
            )
            maps = fuse_maps(fewshot, zero_shot, config.fusion)
            scores.append(image_scores(maps, config.score_mode, config.topk_fraction).cpu())
    return torch.cat(scores)


def run_list(args: argparse.Namespace) -> int:
    products = _store(args).list()
    if args.json:
        print(json.dumps([product.to_dict() for product in products]))
        return 0
    if not products:
        print("no banks stored (add one with `defectscope bank add PRODUCT IMAGE...`)")
        return 0
    rows = []
    for product in products:
        info = product.current_info
        if info is None:
            continue
        rows.append(
            [
                product.product,
                f"v{info.version}",
                str(len(product.versions)),
                str(len(info.sources)),
                _per_stage(info.num_patches),
                _per_stage(info.dims),
                _mebibytes(product.nbytes),
                _threshold(product, info),
                str(info.fingerprint),
            ]
        )
    headers = ["PRODUCT", "CURRENT", "VERSIONS", "IMAGES", "PATCHES", "DIMS", "STORED"]
    print(_table([*headers, "THRESHOLD", "ENCODER"], rows))
    return 0


def run_show(args: argparse.Namespace) -> int:
    product = _store(args).info(args.product)
    if args.json:
        print(json.dumps(product.to_dict()))
        return 0
    current = product.current_info
    calibration = product.calibration
    lines = [f"product      {product.product}"]
    if current is not None:
        lines += [
            f"current      v{current.version}",
            f"encoder      {current.fingerprint}",
            f"weights      {current.fingerprint.weights}",
            f"class name   {current.class_name or '-'}",
        ]
    if calibration is not None:
        lines.append(
            f"calibrated   {calibration.threshold:.4f} (set {_when(calibration.created)} on "
            f"v{calibration.bank_version}; used instead of the banks' own thresholds)"
        )
    lines.append(
        f"stored       {_count(len(product.versions), 'version')}, {_mebibytes(product.nbytes)}"
    )
    rows = [
        [
            f"v{info.version}" + (" *" if info.version == product.current else ""),
            _when(info.created),
            str(len(info.sources)),
            _per_stage(info.num_patches),
            _per_stage(info.dims),
            str(info.num_chunks),
            _mebibytes(info.nbytes),
            "-" if info.threshold is None else f"{info.threshold:.4f}",
            "yes" if info.augment else "no",
            "-" if info.coreset_ratio is None else f"{info.coreset_ratio:g}",
            "-" if info.base_version is None else f"v{info.base_version}",
        ]
        for info in product.versions
    ]
    headers = ["VERSION", "CREATED", "IMAGES", "PATCHES", "DIMS", "CHUNKS", "SIZE"]
    table = _table([*headers, "THRESHOLD", "AUGMENT", "CORESET", "APPENDED TO"], rows)
    print("\n".join(lines) + "\n\n" + table)
    return 0


def run_rm(args: argparse.Namespace) -> int:
    store = _store(args)
    product = store.info(args.product)  # a clear error when there is nothing to remove
    store.delete(args.product)
    print(
        f"{args.product}: removed {_count(len(product.versions), 'version')} "
        f"({_mebibytes(product.nbytes)})"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    info = _store(args).export(args.product, args.file, args.version)
    print(
        f"{args.product}: version {info.version} exported to {args.file} "
        f"({_mebibytes(args.file.stat().st_size)})"
    )
    return 0


def run_import(args: argparse.Namespace) -> int:
    result = _store(args).import_(args.file, args.product)
    print(
        f"{result.product}: version {result.version} imported from {args.file}, "
        f"{_summary(result.num_patches)}, {_mebibytes(result.nbytes)}"
    )
    return 0


# redis ------------------------------------------------------------------------------------------


def run_redis_status(args: argparse.Namespace) -> int:
    from bankstore.connection import REDIS_URL_ENV, connect, safe_url
    from bankstore.embedded import EmbeddedRedis

    url = args.redis_url or os.environ.get(REDIS_URL_ENV, "").strip()
    if url:
        print(f"server   {safe_url(url)} ({'--redis-url' if args.redis_url else REDIS_URL_ENV})")
    else:
        embedded = EmbeddedRedis()
        print(f"server   embedded, data in {embedded.data_dir}")
        if not embedded.ping():
            print("status   not running (it starts when a command first needs it)")
            return 1
        url = embedded.url
        print(f"pid      {embedded.pid()}")

    client = connect(url)
    info = client.info()
    aof = "on" if info.get("aof_enabled") else "off"
    print(
        f"status   Redis {info['redis_version']}, up {info['uptime_in_seconds']} s, "
        f"{_mebibytes(int(info['used_memory']))} used, {client.dbsize()} keys, AOF {aof}"
    )
    return 0


def run_redis_start(args: argparse.Namespace) -> int:
    from bankstore.embedded import EmbeddedRedis

    _refuse_external("start")
    embedded = EmbeddedRedis()
    print(f"embedded Redis running at {embedded.start()} (pid {embedded.pid()})")
    return 0


def run_redis_stop(args: argparse.Namespace) -> int:
    from bankstore.embedded import EmbeddedRedis

    _refuse_external("stop")
    embedded = EmbeddedRedis()
    if embedded.stop():
        print(f"embedded Redis in {embedded.data_dir} stopped")
    else:
        print(f"embedded Redis in {embedded.data_dir} was not running")
    return 0


# helpers ----------------------------------------------------------------------------------------


def _store(args: argparse.Namespace) -> BankStore:
    from bankstore import BankStore

    return BankStore.connect(args.redis_url, prefix=args.redis_prefix)


def _refuse_external(action: str) -> None:
    from bankstore.connection import REDIS_URL_ENV

    if os.environ.get(REDIS_URL_ENV, "").strip():
        raise DefectscopeError(
            f"{REDIS_URL_ENV} names an external server; `defectscope redis {action}` manages "
            f"only the embedded one (unset {REDIS_URL_ENV} to use it)"
        )


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"coreset ratio {text!r} is not a number in (0, 1]")
    return value


def _file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _summary(num_patches: Sequence[int]) -> str:
    return f"{_per_stage(num_patches)} patches per stage"


def _per_stage(values: Sequence[int]) -> str:
    """One number when every stage has it, else all of them: "2048" or "2048/1024/..."."""
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _mebibytes(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _when(created: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))


def _threshold(product: ProductInfo, info: BankInfo) -> str:
    if product.calibration is not None:
        return f"{product.calibration.threshold:.4f} (calibrated)"
    return "-" if info.threshold is None else f"{info.threshold:.4f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in [headers, *rows]) for column in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )
