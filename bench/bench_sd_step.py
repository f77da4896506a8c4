"""Throughput, peak memory and MFU of one SD training micro-step at the paper's sizes, on a GPU.

Qwen3-1.7B is built from its config with random weights (no download), in bf16, with LoRA r=64 on all seven
projections; one micro-step is: teacher forward (adapter disabled, no grad) on x + c + y, student forward and
backward on x + y, the chunked Eq. 3 loss from final hidden states, as train.py does it.

    python bench/bench_sd_step.py                      # GPU: T = 2048 rollout tokens, batch 1..4
    python bench/bench_sd_step.py --tiny --device cpu  # a smoke run of the same code on a CPU

MFU = model FLOPs / (seconds × the GPU's dense bf16 peak, `peak_bf16`), with model FLOPs =
2·P·N_teacher (teacher forward) + 2·P·N_student (student forward) + 2·P·N_student (student backward: with frozen
base weights only activation gradients are computed; LoRA's own FLOPs are < 1 % and not counted), i.e. the
issue's ≈ 6 × P × tokens. P = all parameters (the tied embedding counted once, as the lm_head), N = tokens.
tokens/s counts the rollout tokens y scored by both models (teacher + student) per second.
The ratio column compares each batch size's tokens/s with batch 1 measured in the same run.
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


def build(tiny: bool, device, dtype):
    from transformers import Qwen3ForCausalLM
    cfg = qwen3_config(tiny)  # Qwen3-1.7B (DESIGN.md), or a tiny one for a CPU
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    lora.add_lora(model, r=64, alpha=128)
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
    return B * (prompt + T), B * (prompt + context + T), B * T


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
                n_s, n_t, n_y = micro_step(model, B, a.prompt, a.context, a.T, a.chunk, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError:
            print(f"| {B} | out of memory | | | | |")
            break
        sec = min(times)
        tps = n_y / sec
        base = base or tps
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
        flops = 2 * n_params * n_t + 4 * n_params * n_s
        mfu = f"{flops / sec / peak:.1%}" if peak else "n/a"
        print(f"| {B} | {tps:,.0f} | {sec:.2f} | {mem} | {mfu} | {tps / base:.2f} |")


if __name__ == "__main__":
    main()
