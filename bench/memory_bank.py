"""Exact few-shot matching: defectscope's chunked matmul against faiss IndexFlatIP, same data.

For each bank size, both find every query patch's largest cosine similarity to the bank (the
inner product of L2-normalised vectors, which is what Eq. 2 needs). Both sides get the bank
normalised ahead of time (faiss at `add`, defectscope in `MemoryBank.prepared`) and normalise the
queries inside the timed call, and the two sides alternate. Prints the best-of-N seconds per side,
the ratio ours / faiss, and whether the maxima agree.

    python bench/memory_bank.py [--sizes 1024 4096 51200] [--dims 1280] [--queries 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

# Run as a script, this file's directory (bench/) comes first on sys.path, and bench/pipeline.py
# would hide the `pipeline` package: the repository root goes ahead of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.memory import MemoryBank, nearest_similarity


def best_times(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple:
    """Best-of-`repeats` seconds and last result of two functions, run alternately so that any
    drift of a shared machine hits both alike."""
    best, results = [float("inf"), float("inf")], [None, None]
    for _ in range(repeats):
        for side, function in enumerate((first, second)):
            started = time.perf_counter()
            results[side] = function()
            best[side] = min(best[side], time.perf_counter() - started)
    return best[0], results[0], best[1], results[1]


def ours(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    return nearest_similarity(F.normalize(queries, dim=-1), bank)


def theirs(queries: np.ndarray, index: faiss.IndexFlatIP) -> np.ndarray:
    normalised = queries.copy()
    faiss.normalize_L2(normalised)
    return index.search(normalised, 1)[0][:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 51200])
    parser.add_argument("--dims", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    faiss.omp_set_num_threads(arguments.threads)

    generator = torch.Generator().manual_seed(0)
    print(
        f"{arguments.queries} query patches x {arguments.dims} dims, {arguments.threads} threads, "
        f"best of {arguments.repeats}"
    )
    print(f"{'bank patches':>12}  {'ours (s)':>10}  {'faiss (s)':>10}  {'ours/faiss':>10}  maxima")
    for size in arguments.sizes:
        bank_tokens = torch.randn(size, arguments.dims, generator=generator).half()
        queries = torch.randn(arguments.queries, arguments.dims, generator=generator)

        bank = MemoryBank([bank_tokens])
        (prepared,) = bank.prepared("cpu")
        index = faiss.IndexFlatIP(arguments.dims)
        index.add(prepared.numpy())
        query_array = queries.numpy()

        ours_time, ours_maxima, faiss_time, faiss_maxima = best_times(
            partial(ours, queries, prepared), partial(theirs, query_array, index), arguments.repeats
        )
        difference = float(np.abs(ours_maxima.numpy() - faiss_maxima).max())
        agree = "identical" if difference < 1e-5 else f"differ by {difference:.2e}"
        print(
            f"{size:>12}  {ours_time:>10.5f}  {faiss_time:>10.5f}  "
            f"{ours_time / faiss_time:>10.2f}  {agree}"
        )


if __name__ == "__main__":
    main()
