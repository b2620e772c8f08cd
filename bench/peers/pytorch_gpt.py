#!/usr/bin/env python3
"""Training throughput of a small GPT-2 in PyTorch, the peer of the C++ GPT-2 example.

The model is GPT-2 as transformers' modeling_gpt2.py computes GPT2LMHeadModel
(written out here, no transformers; the same formulas as
tests/golden/make_gpt_golden.py, which checks them against HF's source):
wte + wpe, per layer ln_1 -> Conv1D c_attn (weight (C, 3C)) -> q|k|v ->
causal softmax attention with scale 1/sqrt(C/n_head) -> Conv1D c_proj ->
residual -> ln_2 -> Conv1D c_fc (C, 4C) -> gelu_new (tanh approximation) ->
Conv1D c_proj (4C, C) -> residual; ln_f; logits = h wteᵀ (tied head). Dropout
is off (train mode changes nothing else in this model).

Variants (one line each):

    lora   the base frozen (requires_grad False on every base parameter), LoRA on
           the q and v slices of every c_attn as loralib's
           MergedLinear(enable_lora=[True, False, True]):
               q = (x W + b)[:, 0:C]   + s (x A_qᵀ) B_qᵀ
               v = (x W + b)[:, 2C:3C] + s (x A_vᵀ) B_vᵀ,   s = lora_alpha / r
           A kaiming-uniform (a = sqrt 5) and B zero, as PEFT initialises them;
           AdamW(lr 1e-3, weight_decay 0) over the LoRA parameters only.
    full   (--full) every parameter trained, no LoRA: full fine-tuning, for reference.

One training step = forward, mean cross-entropy over the B*T next-token
targets, backward, optimizer.step(), optimizer.zero_grad(set_to_none=True).
Token batches are random ids in [0, vocab) from a fixed seed (a few batches,
cycled). Each repetition runs the step for at least --min-time seconds after
warm-up; the median of the repetitions' mean step times is reported, with
tokens/s = B*T / median step time.

    /usr/bin/python3 bench/peers/pytorch_gpt.py --threads 1 --json out.json
    /usr/bin/python3 bench/peers/pytorch_gpt.py --full            # full fine-tuning instead
    /usr/bin/python3 bench/peers/pytorch_gpt.py --both            # both, interleaved per repetition
"""
import argparse
import json
import math
import os
import random
import statistics
import sys

# Debian's torch runs its own loops on libgomp and its GEMMs on OpenBLAS's pthreads: with libgomp's default
# spin-waiting, its idle threads keep the cores OpenBLAS's threads need, and 2 threads ran a step 2x SLOWER than
# 1 (measured: 167 ms vs 81 ms). Passive waiting (read when libgomp loads, so set before importing torch) gives
# PyTorch its best multi-thread time; an OMP_WAIT_POLICY already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# The timing loop and the OpenBLAS / CPU report are pytorch_lora.py's, so both peers measure alike.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_lora import cpu_model, openblas_core, set_threads, time_once  # noqa: E402


def gelu_new(x):
    """transformers' NewGELUActivation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: weight (in, out), y = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class QVLoraConv1D(Conv1D):
    """c_attn with loralib's MergedLinear(enable_lora=[True, False, True]) LoRA on the q and v slices."""

    def __init__(self, nf, nx, r, alpha):
        super().__init__(nf, nx)
        self.c = nx
        self.scaling = alpha / r
        self.lora_A_q = nn.Parameter(torch.empty(r, nx))
        self.lora_B_q = nn.Parameter(torch.zeros(nx, r))
        self.lora_A_v = nn.Parameter(torch.empty(r, nx))
        self.lora_B_v = nn.Parameter(torch.zeros(nx, r))
        nn.init.kaiming_uniform_(self.lora_A_q, a=math.sqrt(5))  # PEFT / loralib: A kaiming, B zero
        nn.init.kaiming_uniform_(self.lora_A_v, a=math.sqrt(5))

    def forward(self, x):
        y = super().forward(x)
        q, k, v = y.split(self.c, dim=-1)
        q = q + F.linear(F.linear(x, self.lora_A_q), self.lora_B_q) * self.scaling
        v = v + F.linear(F.linear(x, self.lora_A_v), self.lora_B_v) * self.scaling
        return q, k, v


class Block(nn.Module):
    def __init__(self, c, n_head, n_positions, lora):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(c, eps=1e-5)
        self.c_attn = QVLoraConv1D(3 * c, c, *lora) if lora else Conv1D(3 * c, c)
        self.attn_c_proj = Conv1D(c, c)
        self.ln_2 = nn.LayerNorm(c, eps=1e-5)
        self.c_fc = Conv1D(4 * c, c)
        self.mlp_c_proj = Conv1D(c, 4 * c)
        self.register_buffer("bias", torch.tril(torch.ones((n_positions, n_positions), dtype=torch.bool)),
                             persistent=False)

    def attention(self, x):
        b, t, c = x.shape
        hd = c // self.n_head
        qkv = self.c_attn(x)
        q, k, v = qkv if isinstance(qkv, tuple) else qkv.split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, hd).permute(0, 2, 1, 3) for z in (q, k, v))
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
        w = torch.where(self.bias[:t, :t], w, torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype))
        o = torch.matmul(F.softmax(w, dim=-1), v)
        return self.attn_c_proj(o.permute(0, 2, 1, 3).contiguous().view(b, t, c))

    def forward(self, h):
        h = h + self.attention(self.ln_1(h))
        return h + self.mlp_c_proj(gelu_new(self.c_fc(self.ln_2(h))))


class GPT2(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, n_positions, vocab, lora=None):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)
        self.h = nn.ModuleList([Block(n_embd, n_head, n_positions, lora) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)

    def forward(self, tokens):
        h = self.wte(tokens) + self.wpe(torch.arange(tokens.size(1)))
        for block in self.h:
            h = block(h)
        return F.linear(self.ln_f(h), self.wte.weight)  # lm_head tied to wte


def make_variant(name, args):
    torch.manual_seed(0)
    lora = (args.rank, args.alpha) if name == "lora" else None
    model = GPT2(args.n_layer, args.n_head, args.n_embd, args.n_positions, args.vocab, lora)
    model.train()
    if name == "lora":
        for pname, p in model.named_parameters():
            p.requires_grad_("lora_" in pname)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen) for _ in range(8)]
    state = {"i": 0, "loss": None}

    def step():
        data = batches[state["i"] % len(batches)]
        state["i"] += 1
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), data[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = loss.item()

    total = sum(p.numel() for p in model.parameters())
    return step, sum(p.numel() for p in trainable), total, state


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-positions", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (<= --n-positions)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 * rank)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds per timed loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--full", action="store_true", help="full fine-tuning (every parameter) instead of LoRA")
    parser.add_argument("--both", action="store_true", help="LoRA and full fine-tuning, interleaved")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one short repetition (CI)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    if args.smoke:
        args.n_layer, args.n_head, args.n_embd, args.batch, args.seq = 1, 2, 32, 2, 16
        args.repetitions, args.min_time, args.warmup = 1, 0.05, 1
    if args.seq > args.n_positions:
        parser.error("--seq %d exceeds --n-positions %d" % (args.seq, args.n_positions))
    if args.n_embd % args.n_head:
        parser.error("--n-embd must be a multiple of --n-head")

    blas = set_threads(args.threads)
    context = {
        "backend": "PyTorch %s" % torch.__version__,
        "kernel": openblas_core(blas),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu": cpu_model(),
    }
    config = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab", "batch", "seq",
                                            "rank", "alpha")}
    for key, value in context.items():
        print("# %-8s %s" % (key + ":", value))
    print("# config:  " + " ".join("%s=%s" % kv for kv in config.items()))

    names = ["lora", "full"] if args.both else (["full"] if args.full else ["lora"])
    variants = {}
    for name in names:
        step, trainable, total, state = make_variant(name, args)
        for _ in range(args.warmup):
            step()
        variants[name] = (step, trainable, total, state, state["loss"])
    samples = {name: [] for name in names}
    rng = random.Random(0)
    for _ in range(args.repetitions):
        order = list(names)
        rng.shuffle(order)
        for name in order:
            samples[name].append(time_once(variants[name][0], args.min_time))

    tokens = args.batch * args.seq
    results = {}
    print("\n%-6s %14s %12s %12s %14s %5s %s" % ("variant", "median ms/step", "tokens/s", "min ms", "trainable",
                                                  "reps", "loss after warm-up -> end"))
    for name in names:
        step, trainable, total, state, first_loss = variants[name]
        median = statistics.median(samples[name])
        results[name] = {
            "median_seconds_per_step": median,
            "tokens_per_second": tokens / median,
            "samples_seconds_per_step": samples[name],
            "steps": state["i"],
            "trainable_parameters": trainable,
            "total_parameters": total,
            "loss_after_warmup": first_loss,
            "loss_last": state["loss"],
        }
        print("%-7s %14.2f %12.0f %12.2f %14d %5d %.4f -> %.4f" % (
            name, median * 1e3, tokens / median, min(samples[name]) * 1e3, trainable, len(samples[name]),
            first_loss, state["loss"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"context": context, "config": config, "tokens_per_step": tokens,
                       "min_time": args.min_time, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
