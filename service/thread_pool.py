"""Threads that hand their results straight to the event loop: where images are decoded and engine batches run.

    decoders = LoopThreads("vitserve-decode", 2)
    pixels = await decoders.run(decode, data)

Hand-written rather than ``loop.run_in_executor`` on a ``concurrent.futures.ThreadPoolExecutor``: that wraps every
call in a concurrent Future chained to an asyncio one (a condition variable, callbacks and a copy of the state on each
side), which measured 41 µs of the event loop's CPU and 34 µs of the pool thread's per call on the 2-core EPYC here,
against 16 and 22 µs for a job queue and one ``call_soon_threadsafe`` per result; every image's decode pays it.

Each OS thread carries its role as its name (Linux's ``comm``, 15 bytes), so that ``top -H``, ``ps -L``, perf and the
benchmarks' CPU budget per thread (benchmarks/harness/measure.py) tell decode from the engine: Python before 3.14
names only its own thread objects, and every OS thread is otherwise called after the process.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any


class LoopThreads:
    """``workers`` daemon threads taking jobs in order; ``run`` returns an asyncio future of the caller's loop."""

    def __init__(self, role: str, workers: int):
        self.role = role
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{role}_{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Call ``fn(*args)`` on a pool thread; must be called on the event loop that awaits the result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on a pool thread, from any thread; nothing comes back: ``fn`` delivers its own result (the
        decoder queueing pixels for the engine, service/batcher.py ``offer``) and must not raise."""
        self._jobs.put((None, None, fn, args))

    def shutdown(self) -> None:
        """Threads exit once the jobs already queued are done; nothing waits for them (they are daemons)."""
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        name_os_thread(self.role)
        while (job := self._jobs.get()) is not None:
            if job[1] is None:  # posted
                _run_posted(job[2], job[3])
            else:
                _run_job(*job)
            job = None  # hold nothing of a finished job (a request's bytes) while waiting for the next


def _run_job(loop: asyncio.AbstractEventLoop, future: asyncio.Future, fn: Callable[..., Any], args: tuple) -> None:
    if future.cancelled():  # the caller gave up before the job started (a read of a flag: safe off the loop)
        return
    try:
        result, error = fn(*args), None
    except BaseException as e:  # noqa: BLE001 - delivered to the awaiting caller, as run_in_executor does
        result, error = None, e
    try:
        loop.call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:
        pass  # the loop is closed: nobody is waiting any more


def _run_posted(fn: Callable[..., Any], args: tuple) -> None:
    try:
        fn(*args)
    except BaseException:  # noqa: BLE001 - a bug in fn: logged, and the thread goes on serving the others
        logging.getLogger("vitserve").exception("a job posted to a pool thread raised")


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def name_os_thread(name: str) -> None:
    """Name the calling OS thread (Linux; elsewhere, or with /proc read-only, nothing happens)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass
