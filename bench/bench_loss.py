"""Memory and time of the SD loss: the chunked path (sd_loss.chunked_self_distillation_loss) against the plain
path (full (B, T, V) logits for student and teacher, then sd_loss.self_distillation_loss), in the same run.

    python bench/bench_loss.py                       # CPU: Qwen3's vocabulary, T = 512 (a minute or two)
    python bench/bench_loss.py --T 2048 --device cuda   # the paper's rollout length on a GPU

Memory: on CUDA the peak of torch.cuda.max_memory_allocated during forward + backward above what the inputs
already hold; on CPU the bytes autograd saves for backward (saved-tensor hooks), each storage counted once and
the inputs' own storages (h, W: held by the caller anyway) not at all. That is the term that grows with T × V;
transient per-chunk logits are not counted on CPU. Ratios are chunked / plain.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sd_loss import chunked_self_distillation_loss, self_distillation_loss  # noqa: E402


def inputs(B, T, D, V, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h_s = (torch.randn(B, T, D, generator=g) * 0.5).to(device, dtype).requires_grad_()
    h_t = (torch.randn(B, T, D, generator=g) * 0.5).to(device, dtype)
    W = (torch.randn(V, D, generator=g) * 0.02).to(device, dtype)
    y = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, device=device)
    return h_s, h_t, W, y, mask


def plain(h_s, h_t, W, y, mask, chunk):
    return self_distillation_loss(h_s @ W.T, h_t @ W.T, y, mask)[0]


def chunked(h_s, h_t, W, y, mask, chunk):
    return chunked_self_distillation_loss(h_s, h_t, W, y, mask, chunk_size=chunk)[0]


def measure(fn, args, chunk, device):
    """(seconds, peak extra bytes) of one forward + backward."""
    h_s = args[0]
    h_s.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn(*args, chunk).backward()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    held = {t.untyped_storage().data_ptr() for t in args if torch.is_tensor(t)}  # the inputs' storages
    saved = {}  # storage -> bytes: a tensor saved by several ops (W by every chunk) is held once

    def pack(x):
        ptr = x.untyped_storage().data_ptr()
        if ptr not in held:
            saved[ptr] = x.untyped_storage().nbytes()
        return x

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn(*args, chunk)
    loss.backward()
    return time.perf_counter() - t0, sum(saved.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--D", type=int, default=2048, help="hidden size (Qwen3-1.7B: 2048)")
    ap.add_argument("--V", type=int, default=151936, help="vocabulary (Qwen3: 151,936)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    args = inputs(a.B, a.T, a.D, a.V, device, dtype)
    rows = {}
    for name, fn in (("plain", plain), ("chunked", chunked)):
        measure(fn, args, a.chunk, device)  # warm-up
        runs = [measure(fn, args, a.chunk, device) for _ in range(a.repeats)]
        rows[name] = (min(r[0] for r in runs), max(r[1] for r in runs))
    print(f"B={a.B} T={a.T} D={a.D} V={a.V} chunk={a.chunk} device={a.device} dtype={a.dtype}")
    print("| path | seconds (fwd+bwd) | extra memory | time ratio | memory ratio |")
    print("|---|---|---|---|---|")
    for name, (sec, mem) in rows.items():
        print(f"| {name} | {sec:.3f} | {mem / 2**20:.0f} MiB | {sec / rows['plain'][0]:.2f} | "
              f"{mem / rows['plain'][1]:.3f} |")


if __name__ == "__main__":
    main()
