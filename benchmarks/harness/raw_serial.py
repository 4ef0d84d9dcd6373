"""What the work itself costs, the yardstick of the front-door benchmark: the service's Preprocessor decoding one image
at a time, then the artifact's engine at the service's batch size, serially in this process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np


class RawSerial:
    """Decode ``batch`` images one after another with the service's Preprocessor, then one engine call on them, the
    engine opened with the service's CPU budget (service/cpu_budget.py: its threads, no spinning between calls).
    Loaded once; each call times that loop for ``seconds``: images/s, and each part's wall time and CPU time per image.

    Called once per round of a benchmark that interleaves its servers (the servers up but idle meanwhile), so that the
    yardstick drifts with the machine as the figures it divides do: measured once after the servers, it moved by 20 %
    between sessions of the same code and took every ratio with it.

    The CPU times are the denominator of the server's CPU per image: the engine's intra-op threads use every core, so
    its CPU per image is about ``cores ×`` its wall time, and a spinning pool would charge its spin to the decode
    that follows. Dividing server CPU by wall time would compare two different units.

    Decoding one image at a time leaves the other cores idle; a server decodes on all of them at once (its pool has a
    thread per core), and two decodes side by side each cost more CPU than one alone (shared caches and memory
    bandwidth; +5-20 % on the 2-core EPYC here). ``decode_cpu_ms_per_image_all_cores`` is that figure: the same
    decode on the service's decode threads at once, for a part of ``seconds``. The yardstick stays the serial one;
    this tells how much of a server's decode CPU above it is the machine's, not the door's."""

    def __init__(self, artifact: Path, image: bytes, batch: int):
        from service.artifact import load_artifact
        from service.cpu_budget import plan
        from service.engines import select_engine
        from service.preprocess import Preprocessor

        art = load_artifact(artifact, verify=False)
        self.budget = plan(cpu_engine=True)  # a GPU engine would not be picked here: the benchmark loads CPU artifacts
        self.engine = select_engine(art, "auto", intra_op_threads=self.budget.engine_threads, idle_spinning=self.budget.idle_spinning,
                                    check=False).engine
        self.pre = Preprocessor(art.manifest.preprocessing)
        self.image, self.batch = image, min(batch, self.engine.max_batch_size)
        self.pre.from_bytes(image, max_pixels=40_000_000)  # the codec's cold first decode stays out of the timing
        self.engine.warmup([self.batch])

    def __call__(self, seconds: float = 3.0) -> dict:
        decode_s = engine_s = decode_cpu_s = engine_cpu_s = 0.0
        images = 0
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0, c0 = time.perf_counter(), time.process_time()
            xs = [self.pre.from_bytes(self.image, max_pixels=40_000_000) for _ in range(self.batch)]
            t1, c1 = time.perf_counter(), time.process_time()
            self.engine.run(np.stack(xs))
            t2, c2 = time.perf_counter(), time.process_time()
            decode_s, engine_s, images = decode_s + t1 - t0, engine_s + t2 - t1, images + self.batch
            decode_cpu_s, engine_cpu_s = decode_cpu_s + c1 - c0, engine_cpu_s + c2 - c1
        ms = lambda s: round(s / images * 1000, 3)  # noqa: E731
        all_cores = self.decode_all_cores(seconds / 3)
        return {"engine": self.engine.name, "batch": self.batch, "engine_threads": self.budget.engine_threads,
                "images_per_s": round(images / (decode_s + engine_s), 1),
                "decode_ms_per_image": ms(decode_s), "engine_ms_per_image": ms(engine_s),
                "decode_cpu_ms_per_image": ms(decode_cpu_s), "engine_cpu_ms_per_image": ms(engine_cpu_s),
                "work_cpu_ms_per_image": ms(decode_cpu_s + engine_cpu_s),
                "decode_threads": self.budget.decode_threads, "decode_cpu_ms_per_image_all_cores": all_cores}

    def decode_all_cores(self, seconds: float) -> float:
        """Decode CPU ms per image (each thread's own CPU time) with the service's decode threads decoding at once."""
        cpu_s, images = [], []
        t_end = time.perf_counter() + seconds

        def decode() -> None:
            c0, n = time.thread_time(), 0
            while time.perf_counter() < t_end:
                self.pre.from_bytes(self.image, max_pixels=40_000_000)
                n += 1
            cpu_s.append(time.thread_time() - c0)
            images.append(n)

        threads = [threading.Thread(target=decode) for _ in range(self.budget.decode_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return round(sum(cpu_s) / max(1, sum(images)) * 1000, 3)


def median_of(runs: list[dict]) -> dict:
    """One figure per field, the median over rounds; ``images_per_s_by_round`` keeps the spread."""
    out = {k: round(float(np.median([r[k] for r in runs])), 3) if isinstance(v, float) else v for k, v in runs[0].items()}
    return {**out, "rounds": len(runs), "images_per_s_by_round": [r["images_per_s"] for r in runs]}
