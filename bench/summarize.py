#!/usr/bin/env python3
"""One table of ratios from the outputs bench/run_all.sh collects.

    summarize.py OUT_DIR

OUT_DIR holds compute-<backend>-t<T>.json (google benchmark JSON of
bench_compute), pytorch-t<T>.json (bench/peers/pytorch_lora.py --json) and
memory.txt (bench_memory's output). Prints Markdown: the issue's targets with
each configuration's ratio beside them, then the library against PyTorch
variant by variant. Ratios only come from numbers measured in the same run of
one program, except library-vs-PyTorch, which pairs two programs run one
after the other at the same thread count.
"""
import glob
import json
import os
import re
import sys

HEADLINE = "N:512/D:4096/R:8"
SINGLE_ROW = "N:1/D:4096/R:8"


def compute_medians(path):
    """{variant/shape: median real time in seconds} from google benchmark JSON."""
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        name = b.get("run_name", b["name"]).replace("/real_time", "")
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b.get("time_unit", "ns")]
        out[name] = b["real_time"] * scale
        if "mixed/single" in b:  # the paired benchmark's median per-pair ratio, kept under its own key
            out["paired:" + name] = b["mixed/single"]
    return out, data.get("context", {})


def ratio(times, a, b, shape):
    ka, kb = "%s/%s" % (a, shape), "%s/%s" % (b, shape)
    if ka in times and kb in times:
        return times[ka] / times[kb]
    return None


def fmt(v, digits=2):
    return "-" if v is None else "%.*f" % (digits, v)


def main(out_dir):
    configs = []  # (label, our times, torch times or None)
    for path in sorted(glob.glob(os.path.join(out_dir, "compute-*-t*.json"))):
        m = re.match(r"compute-(\w+)-t(\d+)\.json", os.path.basename(path))
        backend, threads = m.group(1), int(m.group(2))
        ours, ctx = compute_medians(path)
        torch_path = os.path.join(out_dir, "pytorch-t%d.json" % threads)
        torch_times = None
        if os.path.exists(torch_path):
            with open(torch_path) as f:
                torch_times = json.load(f)["median_seconds"]
        label = "%s, %d thread%s" % (ctx.get("lora_backend", backend), threads, "" if threads == 1 else "s")
        configs.append((label, ours, torch_times))
    if not configs:
        print("summarize.py: no compute-*-t*.json in %s" % out_dir, file=sys.stderr)
        return 1
    all_shapes = {k.split("/", 1)[1] for _, ours, _ in configs for k in ours if not k.startswith("paired:")}
    shapes = sorted(s for s in all_shapes if "/K:" not in s)  # K: adapters per batch, the multi-adapter runs
    headline = HEADLINE if HEADLINE in shapes else shapes[-1]
    multi_shapes = sorted({s.rsplit("/K:", 1)[0] for s in all_shapes if "/K:" in s})
    multi_headline = HEADLINE if HEADLINE in multi_shapes or not multi_shapes else multi_shapes[-1]
    single = SINGLE_ROW if SINGLE_ROW in shapes else shapes[0]

    rows = [
        ("unmerged forward / dense `x Wᵀ`", "<= 1.05", lambda o, t: ratio(o, "lora_forward", "dense_forward", headline)),
        ("merged forward / dense", "<= 1.02", lambda o, t: ratio(o, "lora_forward_merged", "dense_forward", headline)),
        ("training step / `x Wᵀ` + `dy W`", "<= 1.08",
         lambda o, t: ratio(o, "lora_train_step", "dense_two_products", headline)),
        ("full FT step / LoRA step", ">= 1.4", lambda o, t: ratio(o, "full_ft_step", "lora_train_step", headline)),
        ("full FT step + AdamW / LoRA step + AdamW", "(not a target)",
         lambda o, t: ratio(o, "full_ft_step_adamw", "lora_step_adamw", headline)),
        ("`dW = dyᵀ x` / `x Wᵀ`", "(diagnostic)", lambda o, t: ratio(o, "dense_dW", "dense_forward", headline)),
        ("`dx = dy W` / `x Wᵀ`", "(diagnostic)", lambda o, t: ratio(o, "dense_dx", "dense_forward", headline)),
        ("unmerged forward / dense at %s" % single.split("/")[0], "<= 1.10",
         lambda o, t: ratio(o, "lora_forward", "dense_forward", single)),
        ("PyTorch training step / ours", ">= 1.5",
         lambda o, t: None if t is None or ("lora_train_step/" + headline) not in t else
         t["lora_train_step/" + headline] / o["lora_train_step/" + headline]),
        ("PyTorch unmerged forward (autograd on) / ours", ">= 1.8",
         lambda o, t: None if t is None or ("lora_forward/" + headline) not in t else
         t["lora_forward/" + headline] / o["lora_forward/" + headline]),
        ("PyTorch unmerged forward (no_grad) / ours", "(stricter)",
         lambda o, t: None if t is None or ("lora_forward_nograd/" + headline) not in t else
         t["lora_forward_nograd/" + headline] / o["lora_forward/" + headline]),
    ]
    print("## Targets at %s (medians; ratios within one run)\n" % headline.replace("/", ", "))
    print("| ratio | target | " + " | ".join(label for label, _, _ in configs) + " |")
    print("|---|---|" + "---:|" * len(configs))
    for name, target, fn in rows:
        print("| %s | %s | %s |" % (name, target, " | ".join(fmt(fn(o, t)) for _, o, t in configs)))

    # Several adapters on one base (MultiLoRALinear): K adapters over the N rows of one batch.
    def over(o, a, ka, b, kb):
        x, y = o.get("%s/%s/K:%d" % (a, multi_headline, ka)), o.get("%s/%s/K:%d" % (b, multi_headline, kb))
        return None if x is None or y is None else x / y
    multi_rows = [
        ("mixed forward, 8 adapters / single-adapter forward", "<= 1.10",
         lambda o: over(o, "mixed_forward", 8, "single_adapter_forward", 1)),
        ("mixed forward, 64 adapters / single-adapter forward", "<= 1.30",
         lambda o: over(o, "mixed_forward", 64, "single_adapter_forward", 1)),
        ("the same two, alternating in one loop (median per-pair ratio), 8 adapters", "<= 1.10",
         lambda o: o.get("paired:mixed_over_single_paired/%s/K:8" % multi_headline)),
        ("the same two, alternating in one loop (median per-pair ratio), 64 adapters", "<= 1.30",
         lambda o: o.get("paired:mixed_over_single_paired/%s/K:64" % multi_headline)),
        ("mixed forward, 1 adapter / single-adapter forward", "(diagnostic)",
         lambda o: over(o, "mixed_forward", 1, "single_adapter_forward", 1)),
        ("merge-run-unmerge per adapter, 8 adapters / mixed forward", "several times",
         lambda o: over(o, "naive_merge_per_adapter", 8, "mixed_forward", 8)),
        ("merge-run-unmerge per adapter, 64 adapters / mixed forward", "several times",
         lambda o: over(o, "naive_merge_per_adapter", 64, "mixed_forward", 64)),
        ("single-adapter forward / dense `x Wᵀ`", "(diagnostic)",
         lambda o: None if ("dense_forward/" + multi_headline) not in o or
         ("single_adapter_forward/%s/K:1" % multi_headline) not in o
         else o["single_adapter_forward/%s/K:1" % multi_headline] / o["dense_forward/" + multi_headline]),
    ]
    if any(fn(o) is not None for _, _, fn in multi_rows for _, o, _ in configs):
        print("\n## Several adapters on one base at %s (medians; ratios within one run)\n" %
              multi_headline.replace("/", ", "))
        print("| ratio | target | " + " | ".join(label for label, _, _ in configs) + " |")
        print("|---|---|" + "---:|" * len(configs))
        for name, target, fn in multi_rows:
            print("| %s | %s | %s |" % (name, target, " | ".join(fmt(fn(o)) for _, o, _ in configs)))
        for path in sorted(glob.glob(os.path.join(out_dir, "compute-*-t*.json")))[:1]:
            line = compute_medians(path)[1].get("lora_adapter_memory")
            if line:
                print("\nMemory per extra adapter (%s): %s." % (os.path.basename(path), line))

    memory = os.path.join(out_dir, "memory.txt")
    if os.path.exists(memory):
        with open(memory) as f:
            text = f.read()
        values = dict(re.findall(r"^memory\.(\w+) ([\d.]+)$", text, re.M))
        model = re.search(r"^# model: (.*)$", text, re.M)
        print("\n## Training memory (%s)\n" % (model.group(1) if model else "bench_memory"))
        print("| ratio | target | measured |")
        print("|---|---|---:|")
        print("| LoRA peak RSS / (frozen weights + activations) | <= 1.15 | %s |" %
              values.get("lora_peak_over_weights_and_activations", "-"))
        print("| full fine-tuning peak RSS / LoRA peak RSS | >= 3 | %s |" % values.get("full_peak_over_lora_peak", "-"))
        print("| DoRA peak RSS / LoRA peak RSS | <= 1.05 | %s |" % values.get("dora_peak_over_lora_peak", "-"))

    print("\n## Library against PyTorch, median ms (PyTorch / library: above 1 means the library is faster)\n")
    pairs = [("dense_forward", "dense_forward"), ("lora_forward", "lora_forward"),
             ("lora_forward", "lora_forward_nograd"), ("lora_forward_merged", "lora_forward_merged"),
             ("dense_two_products", "dense_two_products"), ("lora_train_step", "lora_train_step"),
             ("full_ft_step", "full_ft_step")]
    print("| configuration | shape | library variant | PyTorch variant | library ms | PyTorch ms | PyTorch / library |")
    print("|---|---|---|---|---:|---:|---:|")
    for label, ours, torch_times in configs:
        if torch_times is None:
            continue
        for shape in shapes:
            for mine, theirs in pairs:
                a, b = ours.get(mine + "/" + shape), torch_times.get(theirs + "/" + shape)
                if a is None or b is None:
                    continue
                print("| %s | %s | %s | %s | %.3f | %.3f | %.2f |" % (label, shape, mine, theirs, a * 1e3, b * 1e3,
                                                                       b / a))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
