"""Independent jobs spread over worker processes, each with its own torch threads.

``plan(workers, jobs)`` decides how many processes run and how many threads each one gets
so that processes x threads never exceeds the cores this process may use;
``run_jobs(shared, jobs, ...)`` returns ``[job(shared) for job in jobs]`` in input order,
computed in that many processes. ``shared`` (e.g. the models) is sent once to each worker;
the jobs are handed out one at a time to whichever worker is free, so a slow job does not
hold up the others. A job's result depends only on the job, ``shared`` and the threads it
runs with, never on which worker ran it or in what order.

Workers are started with ``spawn`` (a fresh interpreter): forking a process whose OpenMP
thread pool is already running is not safe. Each worker pays one ``import torch``.

A job that raises in a worker raises the same exception (type and message) in the caller,
the others are cancelled and every worker is stopped; a worker that dies (killed for
memory) is reported as one line naming its exit code.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")
Job = Callable[[Any], T]
_POLL_SECONDS = 0.5


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def plan(workers: int, jobs: int, *, cores: int | None = None) -> tuple[int, int]:
    """(processes, torch threads per process) for ``jobs`` jobs.

    ``workers`` 0 means one process per core; never more processes than jobs; the cores are
    shared out evenly, so processes x threads <= cores (at least one thread each).
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = every core), got {workers}")
    cores = usable_cores() if cores is None else cores
    processes = max(1, min(workers or cores, jobs))
    return processes, max(1, cores // processes)


def run_jobs(
    shared: Any,
    jobs: Sequence[Job],
    *,
    processes: int,
    threads: int,
    progress: bool = True,
    desc: str = "jobs",
) -> list[Any]:
    """``[job(shared) for job in jobs]`` computed in ``processes`` processes of ``threads``
    torch threads each (``processes`` 1: here, with the thread count set for the call).

    Jobs and ``shared`` must be picklable when ``processes`` > 1 (module-level classes and
    functions, tensors, modules).
    """
    if processes < 1 or threads < 1:
        raise ValueError(f"processes and threads must be >= 1, got {processes}, {threads}")
    jobs = list(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=not progress, leave=False)
    with bar:
        if processes == 1 or len(jobs) <= 1:
            return _run_here(shared, jobs, threads, bar)
        return _run_spread(shared, jobs, min(processes, len(jobs)), threads, bar)


def _run_here(shared: Any, jobs: list[Job], threads: int, bar: tqdm) -> list[Any]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for job in jobs:
            results.append(job(shared))
            bar.update(1)
        return results
    finally:
        torch.set_num_threads(before)


def _serve(shared: Any, threads: int, inbox: Any, outbox: Any) -> None:
    """A worker's loop: (index, job) from ``inbox`` until None; (index, ok, payload) out."""
    torch.set_num_threads(threads)
    for index, job in iter(inbox.get, None):
        try:
            outbox.put((index, True, job(shared)))
        except Exception as err:  # sent to the caller, which raises it
            outbox.put((index, False, _portable(err)))
            return


def _portable(err: Exception) -> Exception:
    """``err`` itself when it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def _run_spread(shared: Any, jobs: list[Job], processes: int, threads: int, bar: tqdm) -> list[Any]:
    context = multiprocessing.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    for item in enumerate(jobs):
        inbox.put(item)
    for _ in range(processes):
        inbox.put(None)
    workers = [
        context.Process(target=_serve, args=(shared, threads, inbox, outbox), daemon=True)
        for _ in range(processes)
    ]
    results: list[Any] = [None] * len(jobs)
    try:
        for worker in workers:
            worker.start()
        done = 0
        while done < len(jobs):
            try:
                index, ok, payload = outbox.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                _check_alive(workers)
                continue
            if not ok:
                raise payload
            results[index] = payload
            done += 1
            bar.update(1)
        return results
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join()
        inbox.cancel_join_thread()  # after a failure, jobs nobody will read must not block exit
        inbox.close()
        outbox.close()


def _check_alive(workers: list[Any]) -> None:
    for number, worker in enumerate(workers):
        if worker.exitcode not in (None, 0):
            code = worker.exitcode
            why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            hint = " (out of memory? use fewer worker processes)" if code == -9 else ""
            raise RuntimeError(f"worker process {number} died ({why}){hint}")
