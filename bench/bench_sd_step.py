"""Throughput, peak memory and MFU of one SD training micro-step at the paper's sizes, on a GPU.

Qwen3-1.7B is built from its config with random weights (no download), in bf16, with LoRA r=64 on
all seven projections and gradient checkpointing; one micro-step is: teacher forward (adapter
disabled, no grad) on x + c + y, student forward and backward on x + y, the chunked Eq. 3 loss from
final hidden states, as train.py does it.

    python bench/bench_sd_step.py                      # GPU: T = 2048 rollout tokens, batch 1..4
    python bench/bench_sd_step.py --tiny --device cpu  # a smoke run of the same code on a CPU

MFU = model FLOPs / (seconds × the GPU's dense bf16 peak, `peak_bf16`). Model FLOPs (`step_flops`)
count each matmul the math needs once, 2 FLOPs per multiply-add, over B full rows (no padding) of
N_t = B(|x|+|c|+T) teacher, N_s = B(|x|+T) student and N_y = B·T scored tokens:
  teacher forward    2P·N_t + B·A(|x|+|c|+T) + H·N_y                    (adapter off: no LoRA)
  student forward    2(P + P_A)·N_s + B·A(|x|+T) + H·N_y
  student backward   2(P − P_0)·N_s + (4P_A − 6rD)·N_s + 2B·A(|x|+T) + H·N_y
    P     Σ in·out of q, k, v, o, gate, up, down over all layers (embedding, norms: no matmul)
    P_A   Σ r·(in + out) of their LoRA A and B; Qwen3-1.7B, r = 64: 69.7M, 4.05 % of 1.72B
    P_0   the first layer's q, k, v, whose input (the frozen embedding) needs no gradient;
          6rD: the same input gradient through their A's
    A(L)  2·layers·heads·head_dim·L(L+1): QKᵀ and AV of a row, over the L(L+1)/2 pairs j ≤ i
    H     2·V·D: the tied head, applied only to the T hidden states per row that the loss reads
In the backward a frozen W computes input gradients only, A and B input and weight gradients,
attention four matmuls, the head dh only. Recompute is not counted, as in PaLM's model FLOPs
utilization (Chowdhery et al. 2022, Sec. 4.1 and App. B); `uncounted_flops` lists what the step
runs besides (a second student forward under gradient checkpointing, a second pass through both
heads under the chunked loss's checkpoint, a first-layer input gradient that transformers'
checkpointing asks for), and a fused attention kernel recomputes QKᵀ inside its backward.
tokens/s counts the rollout tokens y scored by both models (teacher + student) per second; the
ratio column compares each batch size's tokens/s with batch 1 measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import rollout  # noqa: E402
from random_qwen3 import qwen3_config  # noqa: E402  (bench/, this script's folder)
from sd_loss import chunked_self_distillation_loss  # noqa: E402

R, ALPHA = 64, 128  # LoRA rank and α on the seven projections: config.py's lora_r, lora_alpha
# Dense bf16 tensor-core peak per GPU by a substring of torch.cuda.get_device_name(), first match
# first: PCIe and NVL precede the plain "H100" / "H200" of the SXM parts ("NVIDIA H100 80GB HBM3").
# NVIDIA's datasheets give bf16 with sparsity, twice the dense rate: H100 SXM 1,979, PCIe 1,513,
# NVL 1,671 (per GPU), H200 SXM 1,979, H200 NVL 1,671 TFLOP/s; Hopper whitepaper: SXM5 dense
# 989.4; A100: 312 dense.
PEAK_BF16 = (("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989.4e12),
             ("H200 NVL", 835e12), ("H200", 989.4e12), ("A100", 312e12))


def peak_bf16(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPU called `device_name`; None if it is not in PEAK_BF16."""
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


def projections(cfg) -> list[tuple[int, int]]:
    """(in, out) of q, k, v, o, gate, up, down in one decoder layer of a Qwen3 config."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return [(D, q), (D, kv), (D, kv), (q, D), (D, I), (D, I), (I, D)]


def step_flops(cfg, r: int, prompt: int, context: int, T: int, B: int) -> dict[str, dict[str, int]]:
    """Model FLOPs of one micro-step, the module docstring's count, on B rows of `prompt` student
    prompt tokens, `context` more teacher tokens and T rollout tokens: {phase: {term: FLOPs}} for
    the phases "teacher forward", "student forward", "student backward" and the terms "dense",
    "lora", "attention", "lm_head"."""
    shapes = projections(cfg)
    layers, D = cfg.num_hidden_layers, cfg.hidden_size
    P = layers * sum(i * o for i, o in shapes)  # frozen projection weights
    P_A = layers * sum(r * (i + o) for i, o in shapes)  # LoRA A (r × in) and B (out × r)
    P_0 = sum(i * o for i, o in shapes[:3])  # first layer's q, k, v: no input gradient needed
    N_t, N_s, N_y = B * (prompt + context + T), B * (prompt + T), B * T
    qw = cfg.num_attention_heads * cfg.head_dim

    def attention(L: int) -> int:  # B·A(L): QKᵀ and AV, 2·qw FLOPs each per causal pair j ≤ i
        return B * layers * 2 * (2 * qw) * (L * (L + 1) // 2)

    H = 2 * cfg.vocab_size * D * N_y  # z = h Wᵀ at the scored positions only
    return {
        "teacher forward": {"dense": 2 * P * N_t, "lora": 0,
                            "attention": attention(prompt + context + T), "lm_head": H},
        "student forward": {"dense": 2 * P * N_s, "lora": 2 * P_A * N_s,
                            "attention": attention(prompt + T), "lm_head": H},
        # frozen W: dx only; A, B: dx and dW; attention: dQ, dK, dV, dP; head: dh (W is frozen)
        "student backward": {"dense": 2 * (P - P_0) * N_s, "lora": (4 * P_A - 6 * r * D) * N_s,
                             "attention": 2 * attention(prompt + T), "lm_head": H},
    }


def uncounted_flops(cfg, r: int, prompt: int, T: int, B: int,
                    checkpointing: bool) -> dict[str, int]:
    """Matmul FLOPs the micro-step runs besides its model FLOPs (not in MFU), by term. The chunked
    loss's checkpoint runs both heads again. With gradient checkpointing each decoder layer's
    student forward runs again up to its last matmul, down_proj's B (torch's non-reentrant
    checkpoint stops once the last tensor saved for the backward is back), and transformers'
    gradient_checkpointing_enable makes the embedding output require grad, so the first layer's
    q, k, v (W and A) compute an input gradient too. A fused attention kernel's own recompute of
    QKᵀ is not a torch op and is not here."""
    f = step_flops(cfg, r, prompt, 0, T, B)["student forward"]
    out = {"dense": 0, "lora": 0, "attention": 0, "lm_head": 2 * f["lm_head"]}
    if checkpointing:
        layers, D, N_s = cfg.num_hidden_layers, cfg.hidden_size, B * (prompt + T)
        P_0 = sum(i * o for i, o in projections(cfg)[:3])
        down_B = layers * 2 * r * D * N_s  # not recomputed
        out |= {"dense": f["dense"] + 2 * P_0 * N_s, "lora": f["lora"] - down_B + 6 * r * D * N_s,
                "attention": f["attention"]}
    return out


def by_term(flops: dict[str, dict[str, int]]) -> dict[str, int]:
    """{term: FLOPs summed over the phases} of step_flops's answer."""
    terms = next(iter(flops.values()))
    return {term: sum(phase[term] for phase in flops.values()) for term in terms}


def build(tiny: bool, device, dtype):
    from transformers import Qwen3ForCausalLM
    cfg = qwen3_config(tiny)  # Qwen3-1.7B (DESIGN.md), or a tiny one for a CPU
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    lora.add_lora(model, r=R, alpha=ALPHA)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, n_params


def micro_step(model, B, prompt, context, T, chunk, device):
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    student = rollout.score_positions([torch.randint(0, V, (prompt,), generator=g).tolist()] * B,
                                      [torch.randint(0, V, (T,), generator=g).tolist()] * B, pad_id=0)
    teacher = rollout.score_positions([torch.randint(0, V, (prompt + context,), generator=g).tolist()] * B,
                                      student.tokens.tolist(), pad_id=0)
    W = model.get_output_embeddings().weight
    with torch.no_grad(), lora.adapters_disabled(model):
        h_t = rollout.final_hidden(model, teacher)
    h_s = rollout.final_hidden(model, student)
    loss, _ = chunked_self_distillation_loss(h_s, h_t, W, student.tokens.to(device), student.mask.to(device),
                                             chunk_size=chunk)
    loss.backward()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=2048, help="rollout tokens")
    ap.add_argument("--prompt", type=int, default=256, help="student prompt tokens")
    ap.add_argument("--context", type=int, default=1024, help="extra teacher tokens (the critique c)")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny --device cpu for a smoke run")
    if a.tiny:
        a.T, a.prompt, a.context, a.chunk = 64, 16, 32, 32
    model, n_params = build(a.tiny, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_bf16(gpu) if device.type == "cuda" else None
    print(f"{gpu}: {n_params / 1e9:.2f}B parameters, T={a.T}, prompt={a.prompt}, context={a.context}, "
          f"chunk={a.chunk}, dense bf16 peak "
          + (f"{peak / 1e12:.1f} TFLOP/s" if peak else "unknown (MFU n/a)"))
    terms = by_term(step_flops(model.config, R, a.prompt, a.context, a.T, 1))
    total = sum(terms.values())
    print(f"model FLOPs of a batch-1 micro-step: {total / 1e12:.3g} TFLOP = "
          + ", ".join(f"{term} {n / total:.1%}" for term, n in terms.items()))
    print("| batch | rollout tokens/s | seconds/micro-step | peak memory | MFU | tokens/s ratio vs batch 1 |")
    print("|---|---|---|---|---|---|")
    base = None
    for B in [int(b) for b in a.batches.split(",")]:
        try:
            micro_step(model, B, a.prompt, a.context, a.T, a.chunk, device)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                micro_step(model, B, a.prompt, a.context, a.T, a.chunk, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError:
            print(f"| {B} | out of memory | | | | |")
            break
        sec = min(times)
        tps = B * a.T / sec  # rollout tokens y per second
        base = base or tps
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
        flops = sum(by_term(step_flops(model.config, R, a.prompt, a.context, a.T, B)).values())
        mfu = f"{flops / sec / peak:.1%}" if peak else "n/a"
        print(f"| {B} | {tps:,.0f} | {sec:.2f} | {mem} | {mfu} | {tps / base:.2f} |")


if __name__ == "__main__":
    main()
