"""The policy π_θ: the base model with a LoRA adapter and its AdamW, identical on every rank; merged while the
transformers engine samples from it; its adapter pushed to the vLLM engine after each optimizer step (step 7).

The self-teacher π_base is this same model with the adapter disabled (lora.adapters_disabled): no second copy.
"""
from __future__ import annotations

import contextlib
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import lora
import rollout
from infra.dist import Dist
from infra.logs import inside


def build_model(cfg, d: Dist):
    """The model in --dtype on this rank's device with a fresh LoRA adapter (B = 0: the base policy), its A drawn
    from torch's global generator seeded by --seed right before: loading the model may draw from it (the demo
    model's first load, which fills the cache, builds it from a config with random weights), and the adapter, so
    the run, must not depend on whether the cache was there."""
    if d.device.type == "cuda":  # fp32 matmuls (the LoRA branch, the loss's fp32 parts) on TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    model, tokenizer = rollout.load_model(cfg.model, dtype=rollout.DTYPES[cfg.dtype], device=d.device)
    torch.manual_seed(cfg.seed)  # here, after the load, so that A depends on --seed alone (see above)
    lora.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets.split(",")))
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, tokenizer


def make_vllm_engine(cfg, d: Dist) -> rollout.VLLMEngine:
    """One vLLM engine per process, shared by the runs of one invocation (--feedback all): under torchrun each rank
    holds its own (external_launcher, rollout.py), and vLLM's teardown ends the process group, so it is built
    once and closed last."""
    return rollout.make_engine("vllm", cfg.model, dtype=cfg.dtype, seed=cfg.seed, max_lora_rank=cfg.lora_r,
                               gpu_memory_utilization=cfg.vllm_gpu_memory, kv_cache_gib=cfg.vllm_kv_cache_gib,
                               world_size=d.world, stop_at_boxed=cfg.stop_at_boxed,
                               enforce_eager=cfg.vllm_enforce_eager, model_runner=cfg.vllm_model_runner)


def start_policy(cfg, d: Dist):
    """The model with a fresh adapter, identical on every rank, and its AdamW; then the per-rank RNG offsets.
    Returns (model, tokenizer, LoRA parameters, optimizer)."""
    model, tokenizer = build_model(cfg, d)  # the same LoRA initialization on every rank (one seed)...
    params = [p for p in model.parameters() if p.requires_grad]
    if d.world > 1:
        for p in params:  # ...and rank 0's copy, as DDP does, so the ranks cannot drift apart
            dist.broadcast(p.data, src=0)
    torch.manual_seed(cfg.seed + d.rank)  # per-rank offset: only dropout would use it; sampling has its own seeds
    random.seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)
    return model, tokenizer, params, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def push_adapter(cfg, d: Dist, model, engine, step: int) -> None:
    """Step 7: the generation engine samples from the current policy. The transformers engine shares the module
    (`sampling` merges it); vLLM gets the adapter under a fresh name and id (rollout.VLLMEngine.set_adapter)."""
    if cfg.engine != "vllm":
        return
    # the ranks hold identical LoRA weights: rank 0 writes one copy, every rank's engine loads it
    root = inside(cfg.out_dir, Path(cfg.out_dir) / "adapters")  # (never through a link out of the out-dir)
    adapter_dir = inside(cfg.out_dir, root / f"step_{step:06d}")
    if d.master:
        lora.save_adapter(model, str(adapter_dir), base_model_name_or_path=cfg.model)
    if d.world > 1:
        dist.barrier()
    engine.set_adapter(str(adapter_dir))
    if d.world > 1:
        dist.barrier()
    if d.master:  # older adapters were loaded by the engines already and are never used again
        for old in root.glob("step_*"):
            if old != adapter_dir:
                shutil.rmtree(inside(cfg.out_dir, old))


@contextlib.contextmanager
def sampling(cfg, model):
    """The transformers engine samples from this very module: merged, the same policy runs faster. The merge is in
    fp32 (lora.py, departure 7): merged into bf16 weights, a small ΔW would round away and the rollouts and
    evaluations would come from roughly the base policy. vLLM holds its own weights (push_adapter): nothing to do."""
    if cfg.engine != "transformers":
        yield
        return
    lora.merge(model, dtype=torch.float32)
    try:
        yield
    finally:
        lora.unmerge(model)
