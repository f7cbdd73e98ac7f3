"""Run independent per-image jobs across processes (results do not depend on the worker count)."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tqdm import tqdm


def resolve_workers(workers: int) -> int:
    """0 means every core."""
    return workers if workers > 0 else (os.cpu_count() or 1)


def run_jobs(
    fn: Callable[..., Any],
    jobs: list[tuple],
    *,
    workers: int = 0,
    progress: bool = True,
    desc: str = "",
) -> list[Any]:
    """``[fn(*job) for job in jobs]``, in worker processes when there are several; ``fn`` must be a
    module-level function. The first failing job's exception is raised."""
    n = min(resolve_workers(workers), len(jobs))
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        if n <= 1:
            results = []
            for job in jobs:
                results.append(fn(*job))
                bar.update(1)
            return results
        with ProcessPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(fn, *job) for job in jobs]
            results = []
            try:
                for future in futures:
                    results.append(future.result())
                    bar.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            return results
