"""PyTorch eager runners (benchmarks/torch_mobilefan.py) and the thread and memory-format
probes that pick PyTorch's best setting."""

from __future__ import annotations

import functools
import statistics
from typing import Any, Callable


from benchmarks import harness
from benchmarks.harness import Config, Json, core_count, time_interleaved, version
from benchmarks.jax_runners import random_batch


def torch_thread_candidates(cfg: Config) -> tuple[int, ...]:
    """Thread counts to try: the configured one, else one per core (as XLA uses) and 1."""
    if cfg.torch_threads is not None:
        return (cfg.torch_threads,)
    return tuple(dict.fromkeys((core_count(), 1)))


@functools.lru_cache(maxsize=None)
def pick_torch_threads(candidates: tuple[int, ...], num_landmarks: int, image_size: int) -> tuple[int, Json]:
    """(threads, median forward seconds per candidate): a cheap batch-1 forward probe, once per run.

    Thread scaling is a property of the machine's current load more than of the workload, and
    a slow candidate costs seconds per train step, so the sections share this probe.
    """
    torch = harness.load_torch()
    if len(candidates) == 1 or torch is None:
        return candidates[0], {}
    runners = {str(t): TorchStudentPredictor(torch, num_landmarks, 1, image_size, "contiguous", t) for t in candidates}
    times = time_interleaved({k: (lambda r=r: r.run(1)) for k, r in runners.items()}, repeats=3, warmup=1)
    probe = {k: statistics.median(v) for k, v in times.items()}
    return int(min(probe, key=probe.get)), probe


class TorchStudentTrainer:
    """Eager MobileFAN train step mirroring JaxStudentTrainer (targets rendered inside the step)."""

    def __init__(self, torch: Any, num_landmarks: int, batch: int, image_size: int, memory_format: str,
                 threads: int, seed: int = 0, lr: float = 1e-3):
        from benchmarks import torch_mobilefan

        self.torch, self.tm, self.threads = torch, torch_mobilefan, threads
        torch.manual_seed(seed)
        fmt = _torch_memory_format(torch, memory_format)
        self.model = torch_mobilefan.TorchMobileFAN(num_landmarks).to(memory_format=fmt).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        images, landmarks = random_batch(batch, image_size, num_landmarks, seed)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
        self.landmarks = torch.from_numpy(landmarks)
        self.heatmap_size = image_size // 4

    def run(self, steps: int) -> None:
        torch = self.torch
        torch.set_num_threads(self.threads)
        for _ in range(steps):
            targets = self.tm.render_gaussians((self.landmarks + 0.5) / 4 - 0.5, self.heatmap_size, 1.0)
            self.opt.zero_grad(set_to_none=True)
            heatmaps, _ = self.model(self.images)
            loss = torch.nn.functional.mse_loss(heatmaps, targets)
            loss.backward()
            self.opt.step()
        self.loss = float(loss.detach())


class TorchStudentPredictor:
    def __init__(self, torch: Any, num_landmarks: int, batch: int, image_size: int, memory_format: str,
                 threads: int, seed: int = 0):
        from benchmarks import torch_mobilefan

        self.torch, self.threads = torch, threads
        torch.manual_seed(seed)
        fmt = _torch_memory_format(torch, memory_format)
        self.model = torch_mobilefan.TorchMobileFAN(num_landmarks).to(memory_format=fmt).eval()
        images, _ = random_batch(batch, image_size, num_landmarks, seed)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=fmt)

    def run(self, iters: int) -> None:
        self.torch.set_num_threads(self.threads)
        with self.torch.inference_mode():
            for _ in range(iters):
                self.model(self.images)


def _torch_memory_format(torch: Any, name: str) -> Any:
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    if name not in formats:
        raise ValueError(f"unknown torch memory format {name!r}; expected one of {sorted(formats)}")
    return formats[name]


def pick_torch_runner(cfg: Config, make: Callable[[str, int], Any], units: int) -> tuple[Any, Json]:
    """The fastest PyTorch runner: thread count from ``pick_torch_threads``, then the faster
    memory format when cfg.torch_format is 'auto'.

    Returns (runner, info) with the chosen 'torch_memory_format', 'torch_threads' and the
    probes' median times ('torch_threads_probe_s', 'torch_format_probe_s').
    """
    threads, thread_probe = pick_torch_threads(torch_thread_candidates(cfg), cfg.num_landmarks, cfg.image_size)
    formats = ("contiguous", "channels_last") if cfg.torch_format == "auto" else (cfg.torch_format,)
    runners = {fmt: make(fmt, threads) for fmt in formats}
    info: Json = {"torch_threads": threads, "torch_version": version("torch")}
    if thread_probe:
        info["torch_threads_probe_s"] = thread_probe
    if len(runners) > 1:
        times = time_interleaved({k: (lambda r=r: r.run(units)) for k, r in runners.items()}, repeats=1, warmup=1)
        info["torch_format_probe_s"] = {k: statistics.median(t) for k, t in times.items()}
        best = min(info["torch_format_probe_s"], key=info["torch_format_probe_s"].get)
    else:
        best = formats[0]
    info["torch_memory_format"] = best
    return runners[best], info
