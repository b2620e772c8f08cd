#!/usr/bin/python3
"""Writes tests/data/golden.txt: reference values computed by PyTorch, the
oracle the C++ tests compare against. The tests read only the output file;
run this again (Debian: apt-get install python3-torch) to regenerate it.

Every computation mirrors how PEFT's LoRA Linear layer does it:
    result = F.linear(x, W, b) + lora_B(lora_A(dropout(x))) * scaling
and uses torch's own autograd, optimizers and functional ops, in float64.

File format, one tensor per record:
    <name> <rows> <cols>
    <rows*cols values, row-major, %.17g>
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

torch.manual_seed(20261129)
torch.set_default_dtype(torch.float64)
records = []


def put(name, t):
    # clone: a later in-place op (clip_grad_norm_ scales p.grad) must not change what was recorded
    t = torch.as_tensor(t, dtype=torch.float64).detach().clone()
    if t.dim() == 0:
        t = t.reshape(1, 1)
    elif t.dim() == 1:
        t = t.reshape(1, -1)
    records.append((name, t))


def lora_forward(x, W, b, A, B, scaling):
    return F.linear(x, W, b) + F.linear(F.linear(x, A), B) * scaling


# ---- one LoRA layer: forward, backward --------------------------------------
N, I, O, R = 6, 5, 4, 3
alpha = 6.0
scaling = alpha / R
x = torch.randn(N, I, requires_grad=True)
W = torch.randn(O, I)  # frozen: no grad
b = torch.randn(O, requires_grad=True)
A = torch.randn(R, I, requires_grad=True)
B = torch.randn(O, R, requires_grad=True)  # nonzero so every gradient path is exercised
dy = torch.randn(N, O)
for name, t in [("x", x), ("W", W), ("b", b), ("A", A), ("B", B), ("dy", dy)]:
    put("linear." + name, t)
y = lora_forward(x, W, b, A, B, scaling)
y.backward(dy)
put("linear.y", y)
put("linear.dx", x.grad)
put("linear.dA", A.grad)
put("linear.dB", B.grad)
put("linear.db", b.grad)

# rsLoRA scaling: alpha / sqrt(r)
with torch.no_grad():
    put("linear.y_rslora", lora_forward(x, W, b, A, B, alpha / math.sqrt(R)))

# ---- 5 AdamW steps on (A, B, b) with an MSE loss ----------------------------
target = torch.randn(N, O)
put("adamw.target", target)
params = [A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_(),
          b.detach().clone().requires_grad_()]
opt = torch.optim.AdamW(params, lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
xd = x.detach()
losses = []
for step in range(5):
    opt.zero_grad()
    loss = F.mse_loss(lora_forward(xd, W, params[2], params[0], params[1], scaling), target)
    loss.backward()
    losses.append(loss.item())
    opt.step()
put("adamw.losses", torch.tensor(losses))
put("adamw.A", params[0])
put("adamw.B", params[1])
put("adamw.b", params[2])

# ---- 3 SGD steps, momentum + nesterov + weight decay ------------------------
params = [A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()]
opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
for step in range(3):
    opt.zero_grad()
    loss = F.mse_loss(lora_forward(xd, W, b.detach(), params[0], params[1], scaling), target)
    loss.backward()
    opt.step()
put("sgd.A", params[0])
put("sgd.B", params[1])

# ---- a two-layer model: LoRA -> GELU(tanh) -> LoRA, cross-entropy -----------
H, C = 7, 4
W1, b1 = torch.randn(H, I), torch.randn(H)
A1, B1 = torch.randn(R, I, requires_grad=True), torch.randn(H, R, requires_grad=True)
W2, b2 = torch.randn(C, H), torch.randn(C)
A2, B2 = torch.randn(R, H, requires_grad=True), torch.randn(C, R, requires_grad=True)
labels = torch.tensor([0, 3, 1, -100, 2, 3])
xm = x.detach().clone().requires_grad_()
h = F.gelu(lora_forward(xm, W1, b1, A1, B1, scaling), approximate="tanh")
logits = lora_forward(h, W2, b2, A2, B2, scaling)
loss = F.cross_entropy(logits, labels)  # ignore_index=-100 by default
loss.backward()
for name, t in [("W1", W1), ("b1", b1), ("A1", A1), ("B1", B1), ("W2", W2), ("b2", b2), ("A2", A2), ("B2", B2)]:
    put("mlp." + name, t)
put("mlp.labels", labels)
put("mlp.logits", logits)
put("mlp.loss", loss)
put("mlp.dA1", A1.grad)
put("mlp.dB1", B1.grad)
put("mlp.dA2", A2.grad)
put("mlp.dB2", B2.grad)
put("mlp.dx", xm.grad)

# ---- cross-entropy on extreme logits (stability) ----------------------------
z = torch.tensor([[1000.0, -1000.0, 0.0], [-800.0, -805.0, -790.0], [3.0, 3.0, 3.0]], requires_grad=True)
zl = torch.tensor([1, 2, 0])
ce = F.cross_entropy(z, zl)
ce.backward()
put("ce.logits", z)
put("ce.labels", zl)
put("ce.loss", ce)
put("ce.dlogits", z.grad)

# ---- GELU (tanh) and its derivative ------------------------------------------
g = torch.linspace(-6, 6, 25, requires_grad=True)
gy = F.gelu(g, approximate="tanh")
gy.sum().backward()
put("gelu.x", g)
put("gelu.y", gy)
put("gelu.dx", g.grad)

# ---- clip_grad_norm_ ---------------------------------------------------------
p1, p2 = torch.zeros(3, 2, requires_grad=True), torch.zeros(4, requires_grad=True)
p1.grad, p2.grad = torch.randn(3, 2) * 3, torch.randn(4) * 3
put("clip.g1", p1.grad)
put("clip.g2", p2.grad)
norm = torch.nn.utils.clip_grad_norm_([p1, p2], max_norm=1.5)
put("clip.norm", norm)
put("clip.g1_clipped", p1.grad)
put("clip.g2_clipped", p2.grad)

# ---- Conv1D layout (fan_in_fan_out): transformers' Conv1D with PEFT's LoRA --------------------
# transformers.pytorch_utils.Conv1D.forward: addmm(bias, x, weight) with weight (in, out). PEFT's LoRA on it adds
# lora_B(lora_A(dropout(x))) * scaling as for a Linear (A (r, in), B (out, r)), and its get_delta_weight is
# transpose(B @ A, fan_in_fan_out) * scaling, so merging adds (s B A)^T to the (in, out) weight.
N, I, O, R = 5, 4, 6, 2
alpha = 4.0
scaling = alpha / R
x = torch.randn(N, I, requires_grad=True)
W_io = torch.randn(I, O)
b = torch.randn(O)
A = torch.randn(R, I, requires_grad=True)
B = torch.randn(O, R, requires_grad=True)
dy = torch.randn(N, O)
for name, t in [("x", x), ("W", W_io), ("b", b), ("A", A), ("B", B), ("dy", dy)]:
    put("conv1d." + name, t)
y = torch.addmm(b, x, W_io) + F.linear(F.linear(x, A), B) * scaling
y.backward(dy)
put("conv1d.y", y)
put("conv1d.dx", x.grad)
put("conv1d.dA", A.grad)
put("conv1d.dB", B.grad)
put("conv1d.merged_W", W_io + (B @ A).T * scaling)

# ---- LoRA on slices of a fused q, k, v projection (loralib's MergedLinear, enable_lora=[True, False, True]) -----
# GPT-2's c_attn as a Conv1D (in, 3d). q at rank 2 (alpha 4), k frozen, v at rank 3 with rsLoRA (alpha 6):
# each adapted slice adds s_k * (x A_k^T) B_k^T to its own outputs, computed here slice by slice.
N, d = 4, 3
I, O = d, 3 * d
x = torch.randn(N, I, requires_grad=True)
W_io = torch.randn(I, O)
b = torch.randn(O)
Aq, Bq = torch.randn(2, I, requires_grad=True), torch.randn(d, 2, requires_grad=True)
Av, Bv = torch.randn(3, I, requires_grad=True), torch.randn(d, 3, requires_grad=True)
s_q, s_v = 4.0 / 2, 6.0 / math.sqrt(3)
dy = torch.randn(N, O)
for name, t in [("x", x), ("W", W_io), ("b", b), ("Aq", Aq), ("Bq", Bq), ("Av", Av), ("Bv", Bv), ("dy", dy)]:
    put("fused." + name, t)
base = torch.addmm(b, x, W_io)
q = base[:, 0:d] + F.linear(F.linear(x, Aq), Bq) * s_q
k = base[:, d : 2 * d]
v = base[:, 2 * d : 3 * d] + F.linear(F.linear(x, Av), Bv) * s_v
y = torch.cat([q, k, v], dim=1)
y.backward(dy)
put("fused.y", y)
put("fused.dx", x.grad)
put("fused.dAq", Aq.grad)
put("fused.dBq", Bq.grad)
put("fused.dAv", Av.grad)
put("fused.dBv", Bv.grad)
merged = W_io.clone()
merged[:, 0:d] += (Bq @ Aq).T * s_q
merged[:, 2 * d : 3 * d] += (Bv @ Av).T * s_v
put("fused.merged_W", merged)

# ---- embedding LoRA (PEFT's lora.Embedding), repeated ids and a padding index --------------------------------
# PEFT: result = base_layer(x) + F.embedding(x, lora_embedding_A.T, padding_idx) @ lora_embedding_B.T * scaling,
# no dropout; get_delta_weight = transpose(B @ A, True) * scaling, added to the (V, d) table.
V, d, R = 7, 3, 2
scaling = 4.0 / R
E = torch.randn(V, d)
A = torch.randn(R, V, requires_grad=True)  # PEFT starts A at zero; random here so every gradient path shows
B = torch.randn(d, R, requires_grad=True)
ids = torch.tensor([1, 4, 1, 0, 6, 4, 4])
dy = torch.randn(len(ids), d)
for name, t in [("E", E), ("A", A), ("B", B), ("ids", ids), ("dy", dy)]:
    put("embedding." + name, t)
y = F.embedding(ids, E, padding_idx=0) + F.embedding(ids, A.T, padding_idx=0) @ B.T * scaling
y.backward(dy)
put("embedding.y", y)
put("embedding.dA", A.grad)
put("embedding.dB", B.grad)
put("embedding.merged_E", E + (B @ A).T * scaling)

# ---- LoRA+: PEFT's create_loraplus_optimizer groups, torch.optim.AdamW and SGD -------------------------------
# The grouping is PEFT's (peft/optimizers/loraplus.py), written out here because importing it needs transformers:
# embedding adapters at loraplus_lr_embedding, lora_B and 1-D parameters at lr * loraplus_lr_ratio (without weight
# decay when "bias" is in the name), everything else at lr; loraplus_weight_decay replaces the optimizer's own
# weight_decay. The linear layer of "linear.*" (A, B, b) with the MSE loss of "adamw.*", and the embedding layer of
# "embedding.*" (A, B) with an MSE loss on its output, trained together by one optimizer for 4 steps.
def recorded(name):
    return dict(records)[name].clone()


lr, ratio, lr_embedding, loraplus_wd = 0.05, 4.0, 1e-3, 0.1
emb_target = torch.randn(len(ids), d)
put("loraplus.emb_target", emb_target)
for kind in ("adamw", "sgd"):
    lA = recorded("linear.A").requires_grad_()
    lB = recorded("linear.B").requires_grad_()
    lb = recorded("linear.b").reshape(-1).requires_grad_()
    eA = recorded("embedding.A").requires_grad_()
    eB = recorded("embedding.B").requires_grad_()
    groups = [
        {"params": [lA], "weight_decay": loraplus_wd, "lr": lr},                    # groupA
        {"params": [eA, eB], "weight_decay": loraplus_wd, "lr": lr_embedding},       # embedding
        {"params": [lB], "weight_decay": loraplus_wd, "lr": lr * ratio},            # groupB
        {"params": [lb], "weight_decay": 0.0, "lr": lr * ratio},                    # groupB_no_decay
    ]
    if kind == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-8)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    lx, lW = recorded("linear.x"), recorded("linear.W")
    E0 = recorded("embedding.E")
    for step in range(4):
        opt.zero_grad()
        loss = F.mse_loss(lora_forward(lx, lW, lb, lA, lB, 6.0 / 3), target)
        ye = F.embedding(ids, E0, padding_idx=0) + F.embedding(ids, eA.T, padding_idx=0) @ eB.T * (4.0 / 2)
        loss = loss + F.mse_loss(ye, emb_target)
        loss.backward()
        opt.step()
    for name, t in [("A", lA), ("B", lB), ("b", lb), ("emb_A", eA), ("emb_B", eB)]:
        put("loraplus.%s.%s" % (kind, name), t)

# ---- PiSSA and OLoRA initialisation (PEFT's pissa_init / olora_init, in float64 here) ---------------------
# pissa: V, S, Uh = svd(W); Sr = S[:r] / scaling; A = diag(sqrt(Sr)) Uh[:r]; B = V[:, :r] diag(sqrt(Sr)).
# olora: Q, R = qr(W); B = Q[:, :r]; A = R[:r]. Both then set W to W - scaling * B @ A.
# Singular vectors are unique only up to sign (the test compares each rank-1 term); Householder QR's signs
# (LAPACK geqrf) are fixed.
for tag, (O_, I_) in [("tall", (7, 5)), ("wide", (4, 9))]:
    R_, alpha_ = 3, 6.0
    s_ = alpha_ / R_
    W_ = torch.randn(O_, I_)
    put("init.%s.W" % tag, W_)
    V, S, Uh = torch.linalg.svd(W_, full_matrices=False)
    Sr = S[:R_] / s_
    A_ = torch.diag(torch.sqrt(Sr)) @ Uh[:R_]
    B_ = V[:, :R_] @ torch.diag(torch.sqrt(Sr))
    put("init.%s.pissa_A" % tag, A_)
    put("init.%s.pissa_B" % tag, B_)
    put("init.%s.pissa_W" % tag, W_ - s_ * B_ @ A_)
    Q, Rq = torch.linalg.qr(W_)
    B_, A_ = Q[:, :R_], Rq[:R_]
    put("init.%s.olora_A" % tag, A_)
    put("init.%s.olora_B" % tag, B_)
    put("init.%s.olora_W" % tag, W_ - s_ * B_ @ A_)

# ---- DoRA (PEFT's DoraLinearLayer / DoraLinearVariant, written out: importing PEFT needs transformers) ------
# get_weight_norm: norm(W + scaling * B @ A, dim=1), detached; magnitude m starts as that norm.
# forward without dropout (base_result = x W^T): result + (m/n - 1) * base_result + (m/n) * (x A^T B^T) * scaling,
# where result = x W^T + b. merge_safe: W' = (m/n)[:, None] * (W + scaling * B @ A); unmerge: W' / (m/n) - s B A.
# m is moved away from its initial value so that dm and the rescaling are exercised.
N_, I_, O_, R_, alpha_ = 6, 5, 4, 3, 6.0
s_ = alpha_ / R_
x = torch.randn(N_, I_, requires_grad=True)
W_ = torch.randn(O_, I_)
b_ = torch.randn(O_, requires_grad=True)
A_ = torch.randn(R_, I_, requires_grad=True)
B_ = torch.randn(O_, R_, requires_grad=True)
m0 = torch.linalg.norm(W_ + s_ * (B_ @ A_).detach(), dim=1)
m_ = (m0 * (1 + 0.3 * torch.randn(O_))).detach().requires_grad_()
dy = torch.randn(N_, O_)
for name, t in [("x", x), ("W", W_), ("b", b_), ("A", A_), ("B", B_), ("m0", m0), ("m", m_), ("dy", dy)]:
    put("dora." + name, t)
n_ = torch.linalg.norm(W_ + s_ * (B_ @ A_).detach(), dim=1).detach()
c_ = (m_ / n_).view(1, -1)
base = F.linear(x, W_)
y = base + b_ + (c_ - 1) * base + c_ * F.linear(F.linear(x, A_), B_) * s_
y.backward(dy)
put("dora.y", y)
put("dora.dx", x.grad)
put("dora.dA", A_.grad)
put("dora.dB", B_.grad)
put("dora.dm", m_.grad)
put("dora.db", b_.grad)
with torch.no_grad():
    c_ = (m_ / n_).view(-1, 1)
    put("dora.merged_W", c_ * (W_ + s_ * B_ @ A_))

# ---- DoRA on an embedding (PEFT's DoraEmbeddingLayer / DoraEmbeddingVariant, written out) -----------------------
# The weight is taken with fan_in_fan_out = True: (d, V) = E^T, plus scaling * (B @ A) (d, V); n = its norm over V
# per embedding dimension, detached; m starts as n. forward: mag_norm_scale = m / n,
# result = mag_norm_scale * F.embedding(ids, E) + mag_norm_scale * (F.embedding(ids, A^T) @ B^T) * scaling.
# merge_safe: E' = (m / n)[None, :] * (E + (B @ A)^T * scaling); unmerge: E' / (m / n) - (B @ A)^T * scaling.
# Repeated ids and a padding index (0: no gradient into its column of A), A random so every path shows.
V, d, R = 7, 3, 2
scaling = 4.0 / R
E = torch.randn(V, d)
A = torch.randn(R, V, requires_grad=True)
B = torch.randn(d, R, requires_grad=True)
ids = torch.tensor([1, 4, 1, 0, 6, 4, 4])
m0 = torch.linalg.norm(E.T + scaling * (B @ A).detach(), dim=1)
m = (m0 * (1 + 0.3 * torch.randn(d))).detach().requires_grad_()
dy = torch.randn(len(ids), d)
for name, t in [("E", E), ("A", A), ("B", B), ("ids", ids), ("m0", m0), ("m", m), ("dy", dy)]:
    put("dora_embedding." + name, t)
n = torch.linalg.norm(E.T + scaling * (B @ A).detach(), dim=1).detach()
c = m / n
y = c * F.embedding(ids, E, padding_idx=0) + c * (F.embedding(ids, A.T, padding_idx=0) @ B.T) * scaling
y.backward(dy)
put("dora_embedding.y", y)
put("dora_embedding.dA", A.grad)
put("dora_embedding.dB", B.grad)
put("dora_embedding.dm", m.grad)
with torch.no_grad():
    put("dora_embedding.merged_E", c.view(1, -1) * (E + (B @ A).T * scaling))

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "golden.txt")
with open(out, "w") as f:
    f.write("# PyTorch %s reference values; written by tests/golden/make_golden.py\n" % torch.__version__)
    for name, t in records:
        f.write("%s %d %d\n" % (name, t.shape[0], t.shape[1]))
        f.write(" ".join("%.17g" % v for v in t.reshape(-1).tolist()) + "\n")
print("wrote %d tensors to %s" % (len(records), os.path.normpath(out)), file=sys.stderr)
