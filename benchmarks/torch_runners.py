"""PyTorch eager runners (benchmarks/torch_mobilefan.py) and the thread and memory-format
probes that pick PyTorch's best setting."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.harness import Config, Json, core_count, time_interleaved, version
from benchmarks.jax_runners import random_batch


def torch_thread_candidates(cfg: Config) -> tuple[int, ...]:
    """Thread counts to try: the configured one, else one per core (as XLA uses) and 1."""
    if cfg.torch_threads is not None:
        return (cfg.torch_threads,)
    return tuple(dict.fromkeys((core_count(), 1)))


class TorchStudentTrainer:
    """Eager MobileFAN train step mirroring JaxStudentTrainer (targets rendered inside the step)."""

    def __init__(
        self,
        torch: Any,
        num_landmarks: int,
        batch: int,
        image_size: int,
        memory_format: str,
        threads: int,
        seed: int = 0,
        lr: float = 1e-3,
    ):
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
            targets = self.tm.render_gaussians(
                (self.landmarks + 0.5) / 4 - 0.5, self.heatmap_size, 1.0
            )
            self.opt.zero_grad(set_to_none=True)
            heatmaps, _ = self.model(self.images)
            loss = torch.nn.functional.mse_loss(heatmaps, targets)
            loss.backward()
            self.opt.step()
        self.loss = float(loss.detach())


class TorchStudentPredictor:
    def __init__(
        self,
        torch: Any,
        num_landmarks: int,
        batch: int,
        image_size: int,
        memory_format: str,
        threads: int,
        seed: int = 0,
    ):
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


def torch_runners(
    cfg: Config, make: Callable[[str, int], Any], units: int
) -> tuple[dict[int, Any], Json]:
    """PyTorch runners, one per thread setting (``torch_thread_candidates``), all in one memory
    format: the faster one when cfg.torch_format is 'auto' (median of 3 interleaved calls at
    the first setting).

    There is no separate thread probe: the caller times every runner in its own interleaved
    loop, as many repeats as fan_jax, and compares against the faster (``best_torch``), so the
    setting reported is the one timed. A single-call probe picked 1 thread in one run and 2 in
    the next on the same machine.
    """
    candidates = torch_thread_candidates(cfg)
    formats = ("contiguous", "channels_last") if cfg.torch_format == "auto" else (cfg.torch_format,)
    info: Json = {"torch_version": version("torch"), "torch_thread_candidates": list(candidates)}
    best = formats[0]
    if len(formats) > 1:
        probe = {fmt: make(fmt, candidates[0]) for fmt in formats}
        times = time_interleaved(
            {k: (lambda r=r: r.run(units)) for k, r in probe.items()}, repeats=3, warmup=1
        )
        info["torch_format_probe_s"] = {k: statistics.median(t) for k, t in times.items()}
        best = min(info["torch_format_probe_s"], key=info["torch_format_probe_s"].get)
    info["torch_memory_format"] = best
    return {t: make(best, t) for t in candidates}, info


def torch_key(threads: int) -> str:
    return f"torch_{threads}_threads"


def best_torch(summaries: dict[int, Json], faster: Callable[[Json], float]) -> int:
    """The thread setting whose timed summary is best by ``faster`` (larger is better)."""
    return max(summaries, key=lambda t: faster(summaries[t]))
