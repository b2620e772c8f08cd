#!/usr/bin/env python3
"""The layer of bench/compute.cpp in PyTorch, computed the way PEFT and loralib do.

    x (N, I), W (O, I), A (R, I), B (O, R), y (N, O); here I = O = D.

PEFT's LoraLayer (and loralib's Linear) forward is

    result = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling

with dropout an nn.Identity when lora_dropout = 0, base_layer a frozen
nn.Linear and lora_A / lora_B bias-free nn.Linears. The variants carry the
names of bench/compute.cpp so bench/run_all.sh can pair them:

    dense_forward        y = x Wᵀ (F.linear, no autograd)
    lora_forward         PEFT's forward, training mode (autograd records the graph)
    lora_forward_nograd  PEFT's forward under torch.no_grad() (unmerged inference)
    lora_forward_merged  F.linear with W + s B A merged once
    dense_two_products   y = x Wᵀ and dx = dy W
    lora_train_step      forward + backward: dA, dB and dx
    full_ft_step         forward + backward with W trainable: dW and dx

Each variant runs its loop for at least --min-time seconds, --repetitions
times, in an order shuffled per repetition (as google benchmark's random
interleaving); the median of the per-iteration times is reported.

    /usr/bin/python3 bench/peers/pytorch_lora.py --threads 1 --json out.json
"""
import argparse
import ctypes
import json
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoraLinear(nn.Module):
    """PEFT's lora.Linear reduced to what the forward and backward touch."""

    def __init__(self, d, r, alpha):
        super().__init__()
        self.base_layer = nn.Linear(d, d, bias=False)
        self.base_layer.weight.requires_grad_(False)  # mark_only_lora_as_trainable
        self.lora_dropout = nn.Identity()  # PEFT: nn.Identity() when lora_dropout == 0
        self.lora_A = nn.Linear(d, r, bias=False)
        self.lora_B = nn.Linear(r, d, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.uniform_(self.lora_B.weight, -0.1, 0.1)  # nonzero, as bench/compute.cpp's B
        self.scaling = alpha / r

    def forward(self, x):
        result = self.base_layer(x)
        result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return result


def variants(n, d, r):
    torch.manual_seed(0)
    layer = LoraLinear(d, r, 2 * r)
    x = torch.rand(n, d) * 2 - 1
    dy = torch.rand(n, d) * 2 - 1
    W = layer.base_layer.weight.detach()
    merged = (W + layer.scaling * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()).contiguous()
    x_train = x.clone().requires_grad_(True)
    W_full = W.clone().requires_grad_(True)

    def dense_forward():
        with torch.no_grad():
            return F.linear(x, W)

    def lora_forward():
        return layer(x)

    def lora_forward_nograd():
        with torch.no_grad():
            return layer(x)

    def lora_forward_merged():
        with torch.no_grad():
            return F.linear(x, merged)

    def dense_two_products():
        with torch.no_grad():
            F.linear(x, W)
            return dy @ W

    def lora_train_step():
        x_train.grad = None  # dx is written, not accumulated; dA and dB accumulate as in the library
        layer(x_train).backward(dy)
        return x_train.grad

    def full_ft_step():
        x_train.grad = None
        F.linear(x_train, W_full).backward(dy)
        return W_full.grad

    return {
        "dense_forward": dense_forward,
        "lora_forward": lora_forward,
        "lora_forward_nograd": lora_forward_nograd,
        "lora_forward_merged": lora_forward_merged,
        "dense_two_products": dense_two_products,
        "lora_train_step": lora_train_step,
        "full_ft_step": full_ft_step,
    }


def time_once(fn, min_time):
    """Mean seconds per call over a loop that runs at least min_time seconds."""
    fn()  # warm-up: allocator, autograd graph, OpenBLAS buffers
    iters = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return elapsed / iters
        iters = max(iters + 1, int(iters * min(10.0, 1.4 * min_time / max(elapsed, 1e-9))))


def openblas():
    """The OpenBLAS that torch loaded (the same soname resolves to the loaded copy), or None."""
    for name in ("libopenblas.so.0", "libblas.so.3"):
        try:
            lib = ctypes.CDLL(name)
            lib.openblas_get_corename.restype = ctypes.c_char_p
            lib.openblas_get_config.restype = ctypes.c_char_p
            lib.openblas_get_num_threads.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


def openblas_core(lib):
    if lib is None:
        return "unknown"
    return "core %s (OPENBLAS_CORETYPE=%s), config: %s, OpenBLAS threads: %d" % (
        lib.openblas_get_corename().decode(), os.environ.get("OPENBLAS_CORETYPE", "unset"),
        lib.openblas_get_config().decode(), lib.openblas_get_num_threads())


def set_threads(n):
    """Runs torch's own loops and OpenBLAS's GEMMs on n threads; returns the OpenBLAS library, or None.

    Debian's torch calls OpenBLAS (pthreads), whose own pool ignores torch.set_num_threads and would use every
    core: without this, "1 thread" ran its GEMMs on 2."""
    torch.set_num_threads(n)
    blas = openblas()
    if blas is not None:
        blas.openblas_set_num_threads(n)
    return blas


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", nargs="*", default=["512:4096:8", "1:4096:8"],
                        help="N:D:R triples (default: the issue's headline shapes)")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timed loop")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one short repetition (CI)")
    parser.add_argument("--json", help="also write the medians (seconds) to this file")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.repetitions, args.min_time = ["32:64:8"], 1, 0.01

    blas = set_threads(args.threads)
    context = {
        "backend": "PyTorch %s" % torch.__version__,
        "kernel": openblas_core(blas),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
    }
    for key, value in context.items():
        print("# %-8s %s" % (key + ":", value))

    jobs = []
    for shape in args.shapes:
        n, d, r = (int(v) for v in shape.split(":"))
        for name, fn in variants(n, d, r).items():
            jobs.append(("%s/N:%d/D:%d/R:%d" % (name, n, d, r), fn))
    samples = {name: [] for name, _ in jobs}
    rng = random.Random(0)
    for _ in range(args.repetitions):
        order = list(jobs)
        rng.shuffle(order)
        for name, fn in order:
            samples[name].append(time_once(fn, args.min_time))
    medians = {name: statistics.median(v) for name, v in samples.items()}

    print("\n%-42s %12s %10s" % ("variant", "median ms", "reps"))
    for name, _ in jobs:
        print("%-42s %12.3f %10d" % (name, medians[name] * 1e3, len(samples[name])))
    print("\n%-22s %-16s %-20s %8s" % ("variant", "shape", "relative to", "ratio"))
    pairs = [("lora_forward", "dense_forward"), ("lora_forward_nograd", "dense_forward"),
             ("lora_forward_merged", "dense_forward"), ("lora_train_step", "dense_two_products"),
             ("full_ft_step", "lora_train_step")]
    for variant, base in pairs:
        for shape in args.shapes:
            n, d, r = (int(v) for v in shape.split(":"))
            suffix = "/N:%d/D:%d/R:%d" % (n, d, r)
            print("%-22s %-16s %-20s %8.3f" % (variant, suffix[1:], base,
                                               medians[variant + suffix] / medians[base + suffix]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"context": context, "median_seconds": medians}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
