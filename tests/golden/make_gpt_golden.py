#!/usr/bin/python3
"""Writes tests/data/gpt/golden/: a tiny random GPT-2 saved as Hugging Face
transformers saves a GPT2LMHeadModel, a LoRA adapter for it saved as PEFT
saves one, and what PyTorch computes from them: the independent oracle for the
C++ GPT-2 example (forward, loss, LoRA and full fine-tuning gradients, the
F16/BF16 loader conversion, a q/v-slice LoRA on the fused c_attn, greedy
decoding). The tests read only the output files.

Regenerate (Debian: apt-get install python3-torch; no transformers, no PEFT,
no network):

    /usr/bin/python3 tests/golden/make_gpt_golden.py

The output is deterministic: parameters come from fixed-seed torch.Generators,
every computation runs in float64 on one thread (torch and OpenBLAS), and the
files are written by peft_files.save_file / json.dumps with sorted keys. Two
runs give identical bytes (checked with sha256sum); a different BLAS kernel
could change the last bits of the F64 outputs.

The model (written here as functions of a dict of tensors, float64)
-------------------------------------------------------------------
GPT-2 as transformers' modeling_gpt2.py computes GPT2LMHeadModel in eval mode
(dropout off), config n_layer=2, n_head=3, n_embd=C=24, n_positions=16,
vocab_size=V=37, batch B=2, T=11:

    h   = wte[tokens] + wpe[0..T-1]
    per layer N:
      a = ln_1(h)                                   LayerNorm eps 1e-5, weight and bias
      q|k|v = a @ c_attn.weight (C, 3C) + c_attn.bias   Conv1D; split in that order on the last dim
      heads of size C/n_head; w = q kᵀ / sqrt(C/n_head); causal mask (torch.where(mask, w,
      finfo.min), as HF does); softmax; o = w v; heads merged
      h = h + o @ attn.c_proj.weight (C, C) + attn.c_proj.bias
      m = ln_2(h); m = gelu_new(m @ mlp.c_fc.weight (C, 4C) + bias)
      h = h + m @ mlp.c_proj.weight (4C, C) + bias
    h = ln_f(h); logits = h @ wteᵀ                  (tied lm_head)
    loss = mean cross-entropy of logits (B*T, V) against `targets` (B*T), given
           explicitly (no shift inside: targets[b, t] is the id after tokens[b, t]).
    gelu_new(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

Parameters are drawn in float32 (std 0.2 for wte, wpe and every Conv1D weight,
0.1 for Conv1D biases, LayerNorm weight 1 + 0.2 N(0,1), LayerNorm bias 0.1 N(0,1))
and stored as F32; every output is computed in float64 from those F32 values
upcast (from the F16/BF16-rounded values upcast for logits_f16/logits_bf16).

Sources checked (with the code-search tool; the versions it had stored)
-----------------------------------------------------------------------
huggingface/transformers
  src/transformers/models/gpt2/modeling_gpt2.py (stored commit 0010f602...):
    GPT2Attention.forward: `query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)`,
      `_split_heads`: view (..., num_heads, head_dim).permute(0, 2, 1, 3); `_merge_heads` the inverse;
      then `attn_output = self.c_proj(attn_output)`.
    GPT2Attention._attn: `attn_weights = torch.matmul(query, key.transpose(-1, -2))`,
      `attn_weights / torch.full([], value.size(-1) ** 0.5, ...)` (scale_attn_weights defaults True;
      scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn default False),
      `causal_mask = self.bias[:, :, key_length - query_length : key_length, :key_length]`,
      `mask_value = torch.finfo(attn_weights.dtype).min`, `torch.where(causal_mask, attn_weights, mask_value)`,
      `nn.functional.softmax(attn_weights, dim=-1)`, `torch.matmul(attn_weights, value)`.
    GPT2MLP.forward: c_fc -> ACT2FN[config.activation_function] -> c_proj -> dropout.
    GPT2Block.forward: residual = h; h = ln_1(h); attn; h = attn_output + residual;
      residual = h; h = ln_2(h); h = residual + mlp(h). ln_1/ln_2: nn.LayerNorm(hidden_size,
      eps=config.layer_norm_epsilon); inner_dim = 4 * hidden_size when n_inner is None.
    GPT2Model.forward: position_ids = arange(past_length, T + past_length);
      `hidden_states = inputs_embeds + position_embeds`; blocks; `self.ln_f(hidden_states)`.
    GPT2LMHeadModel: `self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)`, tied to
      wte (lm_head.weight in _keys_to_ignore_on_load_missing, so not saved); base_model_prefix "transformer".
      (HF's own loss shifts labels by one; here the targets are given already shifted.)
  src/transformers/pytorch_utils.py, Conv1D(nf, nx): weight torch.empty(nx, nf) i.e. (in, out),
    bias (nf,), forward `torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)`.
  src/transformers/activations.py: ACT2CLS "gelu_new": NewGELUActivation, whose forward is
    `0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))`.
  src/transformers/models/gpt2/configuration_gpt2.py: GPT2Config defaults (vocab_size 50257, n_positions
    1024, n_inner None, activation_function "gelu_new", resid/embd/attn_pdrop 0.1, layer_norm_epsilon 1e-5,
    initializer_range 0.02, summary_* fields, scale_attn_weights True, use_cache True, bos/eos 50256,
    scale_attn_by_inverse_layer_idx False, reorder_and_upcast_attn False), model_type "gpt2".
  src/transformers/configuration_utils.py: to_json_string = json.dumps(to_diff_dict(), indent=2,
    sort_keys=True) + "\\n"; the diff keeps every GPT2-specific key and drops values equal to
    PretrainedConfig's defaults, so save_pretrained would OMIT tie_word_embeddings (default True); it is
    written here anyway, explicitly true, as the brief asks (a reader must treat a missing one as true).
huggingface/peft (git snapshot 5d602fdb, 0.20.1.dev0), src/peft/tuners/lora/layer.py:
    LoraLayer.update_layer: `self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)`,
      `self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)`,
      `self.scaling[adapter_name] = lora_alpha / r` (not rslora); dropout nn.Identity() when 0.
    reset_lora_parameters (init_lora_weights True): `nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))`,
      `nn.init.zeros_(lora_B.weight)`.
    Linear.forward: `result = self.base_layer(x)`, then `result = result + lora_B(lora_A(dropout(x))) * scaling`
      (no transpose in the forward: fan_in_fan_out only matters for merging).
    Linear.get_delta_weight: `transpose(weight_B @ weight_A, self.fan_in_fan_out) * self.scaling[adapter]`.
    dispatch_default: a Conv1D target becomes `Linear(target, ..., is_target_conv_1d_layer=True)` with
      fan_in_fan_out forced True.
  src/peft/tuners/tuners_utils.py _get_in_out_features: for Conv1D `in_features, out_features =
    module.weight.shape`, i.e. (in, out): lora_A (r, in), lora_B (out, r).
  src/peft/utils/save_and_load.py get_peft_model_state_dict: the adapter name is removed from the keys
    ("...lora_A.default.weight" -> "...lora_A.weight"); peft_model.py save_pretrained:
    safe_save_file(..., metadata={"format": "pt"}); config.py: json.dumps(output_dict, indent=2,
    sort_keys=True) (target_modules, a set inside PEFT, is written as a list in set order).
  The adapter_config.json fields are PEFT 0.13's LoraConfig (tests/golden/peft_files.py, lora_config).
loralib MergedLinear(enable_lora=[True, False, True]) (microsoft/LoRA loralib/layers.py, as in
  make_sliced_golden.py): one LoRA per enabled slice, added only to that slice's output columns.

Outputs (all under tests/data/gpt/golden/)
------------------------------------------
model/config.json            GPT2Config as save_pretrained writes it (json indent 2, sorted keys, "\\n" at
                             the end) plus "tie_word_embeddings": true; torch_dtype "float32"
model/model.safetensors      F32, metadata {"format": "pt"}, keys as GPT2LMHeadModel.save_pretrained writes
                             them (no lm_head.weight: tied):
                               transformer.wte.weight (37, 24), transformer.wpe.weight (16, 24),
                               transformer.h.N.ln_1.weight / .bias (24), h.N.attn.c_attn.weight (24, 72) /
                               .bias (72), h.N.attn.c_proj.weight (24, 24) / .bias (24), h.N.ln_2.weight / .bias
                               (24), h.N.mlp.c_fc.weight (24, 96) / .bias (96), h.N.mlp.c_proj.weight (96, 24) /
                               .bias (24) for N = 0, 1; transformer.ln_f.weight / .bias (24)
model_f16/                   the same config (torch_dtype "float16") and weights rounded to F16 (torch .half())
model_bf16/                  the same config (torch_dtype "bfloat16") and weights rounded to BF16 (.bfloat16())
adapter/adapter_config.json  PEFT LoraConfig: r 4, lora_alpha 8 (scaling 2), target_modules
                             ["c_attn", "c_proj", "c_fc"], fan_in_fan_out true, task_type "CAUSAL_LM",
                             base_model_name_or_path "tiny-gpt2-golden", lora_dropout 0, inference_mode true
adapter/adapter_model.safetensors  F32, metadata {"format": "pt"}, for N = 0, 1:
                             base_model.model.transformer.h.N.attn.c_attn.lora_A.weight (4, 24), .lora_B.weight (72, 4)
                             base_model.model.transformer.h.N.attn.c_proj.lora_A.weight (4, 24), .lora_B.weight (24, 4)
                             base_model.model.transformer.h.N.mlp.c_fc.lora_A.weight (4, 24), .lora_B.weight (96, 4)
                             base_model.model.transformer.h.N.mlp.c_proj.lora_A.weight (4, 96), .lora_B.weight (24, 4)
                             A and B both N(0, 0.2^2): B nonzero so the adapter changes the output.
golden.safetensors           (no metadata)
  tokens (2, 11) I64, targets (2, 11) I64     ids in [0, 37), with repeated ids in tokens and in targets
  logits (2, 11, 37) F64, loss () F64         base model (F32 weights upcast)
  logits_f16, logits_bf16 (2, 11, 37) F64     base model from the model_f16 / model_bf16 weights upcast
  logits_adapter (2, 11, 37), loss_adapter () F64   base + the adapter/ LoRA (PEFT forward, eval)
  grad.transformer.h.N.{attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj}.lora_A / .lora_B   F64, the adapter's
                                              shapes: d loss_adapter / d A, d B (base frozen)
  grad.<every model/ key>  F64, the parameter's shape: d loss / d parameter of the BASE model (full
                           fine-tuning, no adapter); grad.transformer.wte.weight includes the tied head's part
  slices.transformer.h.N.attn.c_attn.q.lora_A (2, 24), .q.lora_B (24, 2), .v.lora_A (2, 24), .v.lora_B (24, 2)
                           F32: a q,v-slice LoRA on c_attn, r 2, alpha 4 (scaling 2) per slice:
                           q += s (a A_qᵀ) B_qᵀ on columns [0, C), v += s (a A_vᵀ) B_vᵀ on columns [2C, 3C)
  logits_slices (2, 11, 37), loss_slices () F64     base + only the slice LoRAs
  grad_slices.transformer.h.N.attn.c_attn.{q,v}.lora_{A,B}  F64, shapes as slices.*: d loss_slices / d ·
  generate.prompt (4,) I64   a prompt
  generate.greedy (5,) I64   the next 5 ids by greedy argmax of the base model's (F32 weights, float64)
                             last-position logits, re-running the whole sequence each step (no KV cache);
                             prompt + greedy = 9 <= n_positions. The smallest top-1/top-2 logit margin of
                             the 5 steps is printed (the prompt is chosen so that it is > 0.05).

Self-checks (asserts): the vectorised attention against a per-position loop; the PEFT adapter forward against
the base model with merged weights W + transpose(B @ A) * s (PEFT's get_delta_weight); the slice LoRAs against
one fused LoRA with A = [A_q; A_v], B block-placed; two LoRA gradients against central finite differences.
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peft_files import lora_config, save_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "gpt", "golden")

N_LAYER, N_HEAD, C, N_POS, V = 2, 3, 24, 16, 37
B, T = 2, 11
EPS = 1e-5
R, ALPHA = 4, 8  # the PEFT adapter: scaling 2
SLICE_R, SLICE_ALPHA = 2, 4  # each q / v slice LoRA: scaling 2
N_GENERATE = 5
TARGETS = ["c_attn", "c_proj", "c_fc"]
ADAPTED = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def single_thread():
    torch.set_num_threads(1)
    try:  # Debian's torch calls OpenBLAS, whose own pool ignores torch.set_num_threads
        import ctypes
        ctypes.CDLL("libopenblas.so.0").openblas_set_num_threads(1)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- parameters


def param_shapes():
    """(name, shape, kind) in GPT2LMHeadModel.state_dict() order."""
    shapes = [("transformer.wte.weight", (V, C), "w"), ("transformer.wpe.weight", (N_POS, C), "w")]
    for n in range(N_LAYER):
        p = f"transformer.h.{n}."
        shapes += [
            (p + "ln_1.weight", (C,), "lnw"), (p + "ln_1.bias", (C,), "lnb"),
            (p + "attn.c_attn.weight", (C, 3 * C), "w"), (p + "attn.c_attn.bias", (3 * C,), "b"),
            (p + "attn.c_proj.weight", (C, C), "w"), (p + "attn.c_proj.bias", (C,), "b"),
            (p + "ln_2.weight", (C,), "lnw"), (p + "ln_2.bias", (C,), "lnb"),
            (p + "mlp.c_fc.weight", (C, 4 * C), "w"), (p + "mlp.c_fc.bias", (4 * C,), "b"),
            (p + "mlp.c_proj.weight", (4 * C, C), "w"), (p + "mlp.c_proj.bias", (C,), "b"),
        ]
    shapes += [("transformer.ln_f.weight", (C,), "lnw"), ("transformer.ln_f.bias", (C,), "lnb")]
    return shapes


def make_params(gen):
    params = {}
    for name, shape, kind in param_shapes():
        z = torch.randn(shape, generator=gen, dtype=torch.float32)
        if kind == "w":
            params[name] = z * 0.2
        elif kind == "b":
            params[name] = z * 0.1
        elif kind == "lnw":
            params[name] = 1.0 + 0.2 * z
        else:
            params[name] = z * 0.1
    return params


# --------------------------------------------------------------------- model


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def conv1d(x, weight, bias):
    """transformers.pytorch_utils.Conv1D: addmm(bias, x.view(-1, in), weight), weight (in, out)."""
    size_out = x.size()[:-1] + (weight.size(1),)
    return torch.addmm(bias, x.reshape(-1, x.size(-1)), weight).view(size_out)


def lora_delta(x, A, B, scaling):
    """PEFT's lora_B(lora_A(x)) * scaling: nn.Linear weights A (r, in), B (out, r)."""
    return F.linear(F.linear(x, A), B) * scaling


def attention(q, k, v):
    """GPT2Attention._attn + _split_heads/_merge_heads, q, k, v (B, T, C)."""
    b, t, c = q.shape
    hd = c // N_HEAD

    def split(x):
        return x.view(b, t, N_HEAD, hd).permute(0, 2, 1, 3)

    q, k, v = split(q), split(k), split(v)
    w = torch.matmul(q, k.transpose(-1, -2))
    w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype)
    mask = torch.tril(torch.ones((t, t), dtype=torch.bool)).view(1, 1, t, t)
    w = torch.where(mask, w, torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype))
    w = F.softmax(w, dim=-1)
    o = torch.matmul(w, v)
    return o.permute(0, 2, 1, 3).contiguous().view(b, t, c)


def attention_loop(q, k, v):
    """The same attention, one query position and head at a time (a check of the vectorised one)."""
    b, t, c = q.shape
    hd = c // N_HEAD
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(N_HEAD):
            cols = slice(h * hd, (h + 1) * hd)
            for i in range(t):
                scores = torch.stack([(q[bi, i, cols] * k[bi, j, cols]).sum() / math.sqrt(hd) for j in range(i + 1)])
                p = torch.exp(scores - scores.max())
                p = p / p.sum()
                out[bi, i, cols] = sum(p[j] * v[bi, j, cols] for j in range(i + 1))
    return out


def forward(params, tokens, lora=None, slices=None, attn=attention):
    """GPT2LMHeadModel logits (B, T, V). lora: {module path: (A, B, scaling)} (PEFT LoRA on a Conv1D);
    slices: {c_attn path: (A_q, B_q, A_v, B_v, scaling)} (loralib MergedLinear, q and v enabled)."""
    lora = lora or {}
    slices = slices or {}
    t = tokens.size(-1)

    def proj(path, x):
        y = conv1d(x, params[path + ".weight"], params[path + ".bias"])
        if path in lora:
            y = y + lora_delta(x, *lora[path])
        if path in slices:
            aq, bq, av, bv, s = slices[path]
            zero = torch.zeros(x.size()[:-1] + (C,), dtype=y.dtype)
            y = y + torch.cat([lora_delta(x, aq, bq, s), zero, lora_delta(x, av, bv, s)], dim=-1)
        return y

    h = params["transformer.wte.weight"][tokens] + params["transformer.wpe.weight"][torch.arange(t)]
    for n in range(N_LAYER):
        p = f"transformer.h.{n}."
        a = F.layer_norm(h, (C,), params[p + "ln_1.weight"], params[p + "ln_1.bias"], EPS)
        q, k, v = proj(p + "attn.c_attn", a).split(C, dim=2)
        h = proj(p + "attn.c_proj", attn(q, k, v)) + h
        m = F.layer_norm(h, (C,), params[p + "ln_2.weight"], params[p + "ln_2.bias"], EPS)
        h = h + proj(p + "mlp.c_proj", gelu_new(proj(p + "mlp.c_fc", m)))
    h = F.layer_norm(h, (C,), params["transformer.ln_f.weight"], params["transformer.ln_f.bias"], EPS)
    return F.linear(h, params["transformer.wte.weight"])  # lm_head tied to wte


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def upcast(tensors):
    return {k: v.to(torch.float64) for k, v in tensors.items()}


# --------------------------------------------------------------------- files


def hf_config(torch_dtype):
    """GPT2Config(...).to_json_string() as save_pretrained writes it (transformers 4.46-style diff dict)."""
    config = {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": V - 1,
        "embd_pdrop": 0.1,
        "eos_token_id": V - 1,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": N_POS,
        "n_embd": C,
        "n_head": N_HEAD,
        "n_inner": None,
        "n_layer": N_LAYER,
        "n_positions": N_POS,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,  # save_pretrained omits it (the default); written for explicitness
        "torch_dtype": torch_dtype,
        "transformers_version": "4.46.3",
        "use_cache": True,
        "vocab_size": V,
    }
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def write_model(directory, params, torch_dtype):
    path = os.path.join(OUT, directory)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(hf_config(torch_dtype))
    save_file(params, os.path.join(path, "model.safetensors"), {"format": "pt"})


# ---------------------------------------------------------------------- main


def finite_difference(loss_of, tensor, index, h=1e-6):
    saved = tensor[index].item()
    with torch.no_grad():
        tensor[index] = saved + h
        up = loss_of().item()
        tensor[index] = saved - h
        down = loss_of().item()
        tensor[index] = saved
    return (up - down) / (2 * h)


def main():
    single_thread()
    gen = torch.Generator().manual_seed(20260310)
    params32 = make_params(gen)
    params = upcast(params32)

    tokens = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    targets = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    tokens[1, 7] = tokens[0, 3]  # make sure of repeated ids (the embedding gradient accumulates)
    tokens[1, 2] = tokens[1, 9]
    targets[1, 4] = targets[0, 4]
    assert tokens.unique().numel() < tokens.numel() and targets.unique().numel() < targets.numel()

    golden = {"tokens": tokens, "targets": targets}

    # Base model: logits, loss, full fine-tuning gradients.
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    logits = forward(leaves, tokens)
    loss = cross_entropy(logits, targets)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    golden["logits"] = logits.detach()
    golden["loss"] = loss.detach()
    for name, g in zip(leaves, grads):
        golden["grad." + name] = g

    with torch.no_grad():
        # The vectorised attention against a per-position loop.
        looped = forward(params, tokens, attn=attention_loop)
        assert torch.allclose(looped, golden["logits"], rtol=0, atol=1e-12), "attention loop mismatch"
        # F16 / BF16 models.
        params16 = {k: v.half() for k, v in params32.items()}
        paramsbf = {k: v.bfloat16() for k, v in params32.items()}
        golden["logits_f16"] = forward(upcast(params16), tokens)
        golden["logits_bf16"] = forward(upcast(paramsbf), tokens)

    # The PEFT adapter.
    adapter32, lora = {}, {}
    for n in range(N_LAYER):
        for module in ADAPTED:
            path = f"transformer.h.{n}.{module}"
            w = params32[path + ".weight"]  # (in, out)
            a = torch.randn((R, w.size(0)), generator=gen) * 0.2
            b = torch.randn((w.size(1), R), generator=gen) * 0.2
            adapter32[f"base_model.model.{path}.lora_A.weight"] = a
            adapter32[f"base_model.model.{path}.lora_B.weight"] = b
            lora[path] = (a.double().requires_grad_(True), b.double().requires_grad_(True), ALPHA / R)
    logits_a = forward(params, tokens, lora=lora)
    loss_a = cross_entropy(logits_a, targets)
    lora_leaves = [t for path in lora for t in lora[path][:2]]
    grads = torch.autograd.grad(loss_a, lora_leaves)
    golden["logits_adapter"] = logits_a.detach()
    golden["loss_adapter"] = loss_a.detach()
    i = 0
    for path in lora:
        golden[f"grad.{path}.lora_A"] = grads[i]
        golden[f"grad.{path}.lora_B"] = grads[i + 1]
        i += 2
    with torch.no_grad():
        merged = dict(params)  # PEFT's merge: W += transpose(B @ A, fan_in_fan_out=True) * scaling
        for path, (a, b, s) in lora.items():
            merged[path + ".weight"] = params[path + ".weight"] + (b @ a).T * s
        assert torch.allclose(forward(merged, tokens), golden["logits_adapter"], rtol=0, atol=1e-11)
        assert (golden["logits_adapter"] - golden["logits"]).abs().max() > 0.1, "the adapter must matter"
    path0 = "transformer.h.0.mlp.c_fc"
    for which, index in ((0, (1, 5)), (1, (17, 2))):
        tensor = lora[path0][which]
        fd = finite_difference(lambda: cross_entropy(forward(params, tokens, lora=lora), targets), tensor, index)
        g = golden[f"grad.{path0}.lora_{'AB'[which]}"][index].item()
        assert abs(fd - g) < 1e-7 * max(1.0, abs(g)), (fd, g)

    # The q,v-slice LoRA on c_attn (no other adapter).
    slices = {}
    for n in range(N_LAYER):
        path = f"transformer.h.{n}.attn.c_attn"
        t32 = {
            "q.lora_A": torch.randn((SLICE_R, C), generator=gen) * 0.2,
            "q.lora_B": torch.randn((C, SLICE_R), generator=gen) * 0.2,
            "v.lora_A": torch.randn((SLICE_R, C), generator=gen) * 0.2,
            "v.lora_B": torch.randn((C, SLICE_R), generator=gen) * 0.2,
        }
        for k, v in t32.items():
            golden[f"slices.{path}.{k}"] = v
        leaves = (t32[k].double().requires_grad_(True) for k in ("q.lora_A", "q.lora_B", "v.lora_A", "v.lora_B"))
        slices[path] = tuple(leaves) + (SLICE_ALPHA / SLICE_R,)
    logits_s = forward(params, tokens, slices=slices)
    loss_s = cross_entropy(logits_s, targets)
    slice_leaves = [t for path in slices for t in slices[path][:4]]
    grads = torch.autograd.grad(loss_s, slice_leaves)
    golden["logits_slices"] = logits_s.detach()
    golden["loss_slices"] = loss_s.detach()
    i = 0
    for path in slices:
        for k in ("q.lora_A", "q.lora_B", "v.lora_A", "v.lora_B"):
            golden[f"grad_slices.{path}.{k}"] = grads[i]
            i += 1
    with torch.no_grad():  # the same as one fused LoRA, A = [A_q; A_v], B block-placed (make_sliced_golden.py)
        fused = {}
        for path, (aq, bq, av, bv, s) in slices.items():
            a = torch.cat([aq, av])
            b = torch.zeros((3 * C, 2 * SLICE_R), dtype=torch.float64)
            b[0:C, 0:SLICE_R] = bq
            b[2 * C:, SLICE_R:] = bv
            fused[path] = (a, b, s)
        assert torch.allclose(forward(params, tokens, lora=fused), golden["logits_slices"], rtol=0, atol=1e-12)

    # Greedy generation from the base model: the first prompt whose top-1/top-2 margins all exceed 0.05.
    with torch.no_grad():
        for attempt in range(100):
            prompt = torch.randint(0, V, (4,), generator=gen, dtype=torch.int64)
            ids, margins = prompt.clone(), []
            for _ in range(N_GENERATE):
                last = forward(params, ids.view(1, -1))[0, -1]
                top = torch.topk(last, 2).values
                margins.append((top[0] - top[1]).item())
                ids = torch.cat([ids, last.argmax().view(1)])
            if min(margins) > 0.05:
                break
        else:
            raise RuntimeError("no prompt with clear greedy margins")
        assert ids.numel() <= N_POS
        golden["generate.prompt"] = prompt
        golden["generate.greedy"] = ids[prompt.numel():].clone()

    write_model("model", params32, "float32")
    write_model("model_f16", params16, "float16")
    write_model("model_bf16", paramsbf, "bfloat16")
    config = lora_config(base_model_name_or_path="tiny-gpt2-golden", r=R, lora_alpha=ALPHA, target_modules=TARGETS)
    os.makedirs(os.path.join(OUT, "adapter"), exist_ok=True)
    save_file(adapter32, os.path.join(OUT, "adapter", "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(OUT, "adapter", "adapter_config.json"), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))
    golden = {k: (v.detach().contiguous()) for k, v in golden.items()}
    save_file(golden, os.path.join(OUT, "golden.safetensors"))

    print("wrote", os.path.normpath(OUT))
    print("loss %.12f  loss_adapter %.12f  loss_slices %.12f" % (loss.item(), loss_a.item(), loss_s.item()))
    print("max |logits_f16 - logits| %.3g, max |logits_bf16 - logits| %.3g" % (
        (golden["logits_f16"] - golden["logits"]).abs().max(), (golden["logits_bf16"] - golden["logits"]).abs().max()))
    print("generate: prompt %s greedy %s (prompt attempt %d, smallest margin %.4f)" % (
        prompt.tolist(), golden["generate.greedy"].tolist(), attempt, min(margins)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
