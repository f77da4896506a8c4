"""bench/bench_sd_step.py's FLOP count against torch's FlopCounterMode on real micro-steps of the
tiny Qwen3 with LoRA (CPU, fp32), its parameter counts against Qwen3-1.7B's modules (on the meta
device), and its peak table against torch.cuda.get_device_name() strings. No timings.

FlopCounterMode counts 2 FLOPs per multiply-add of aten.mm / addmm / bmm, as step_flops does. It has
no formula for CPU's fused attention op, so the model runs eager attention: two bmm per layer over
the full L×L scores, the causal mask added rather than skipped. Its attention count is therefore the
full square, and step_flops's causal count is that × (pairs j ≤ i) / L², the pairs counted here from
torch.ones(L, L).tril(). Every other matmul (projections, LoRA, head) is an aten.mm.
"""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen3ForCausalLM

import lora
import rollout
from sd_loss import chunked_self_distillation_loss

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_sd_step.py"
ATEN = torch.ops.aten
ATTENTION_OPS = {ATEN.bmm, ATEN.baddbmm}  # eager attention's QKᵀ and AV
LINEAR_OPS = {ATEN.mm, ATEN.addmm}  # nn.Linear / F.linear and the head's h Wᵀ


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the script imports random_qwen3 from there
    spec = importlib.util.spec_from_file_location("bench_sd_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counted(run) -> tuple[int, int]:
    """(linear FLOPs, attention FLOPs) that FlopCounterMode counts while run() runs."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    ops = counter.get_flop_counts().get("Global", {})  # no "Global" when nothing was counted
    assert set(ops) <= LINEAR_OPS | ATTENTION_OPS, f"unexpected ops {set(ops)}"
    return (sum(n for op, n in ops.items() if op in LINEAR_OPS),
            sum(n for op, n in ops.items() if op in ATTENTION_OPS))


def full_square(causal: int, L: int) -> int:
    """The counter's full L×L attention FLOPs for step_flops's causal count at sequence length L."""
    pairs = int(torch.ones(L, L).tril().sum())  # query-key pairs j ≤ i: L(L+1)/2
    full, rest = divmod(causal * L * L, pairs)
    assert rest == 0
    return full


def test_each_phase_of_a_step_matches_the_flop_counter(bench):
    """Teacher forward, student forward, the loss's forward and the backward, each counted apart on
    a model without gradient checkpointing: exactly step_flops's phases, plus in the backward the
    chunked loss's recompute of both heads (uncounted_flops), nothing else."""
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(bench.qwen3_config(True))
    lora.add_lora(model, r=bench.R, alpha=bench.ALPHA)
    model.config.use_cache = False
    model.set_attn_implementation("eager")
    B, prompt, context, T = 2, 5, 3, 7
    V, cfg = model.config.vocab_size, model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, prompt), generator=g).tolist()
    c = torch.randint(0, V, (B, context), generator=g).tolist()
    y = torch.randint(0, V, (B, T), generator=g).tolist()
    student = rollout.score_positions(x, y, pad_id=0)
    teacher = rollout.score_positions([a + b for a, b in zip(x, c)], y, pad_id=0)
    W = model.get_output_embeddings().weight  # (V, D)
    hidden = {}

    def teacher_forward():
        with torch.no_grad(), lora.adapters_disabled(model):
            hidden["t"] = rollout.final_hidden(model, teacher)  # (B, T, D)

    def student_forward():
        hidden["s"] = rollout.final_hidden(model, student)  # (B, T, D)

    def loss_forward():
        hidden["loss"], _ = chunked_self_distillation_loss(
            hidden["s"], hidden["t"], W, student.tokens, student.mask, chunk_size=4)

    f = bench.step_flops(cfg, bench.R, prompt, context, T, B)
    extra = bench.uncounted_flops(cfg, bench.R, prompt, T, B, checkpointing=False)
    L_t, L_s = prompt + context + T, prompt + T
    tf, sf, sb = f["teacher forward"], f["student forward"], f["student backward"]
    assert tf["lora"] == 0
    assert counted(teacher_forward) == (tf["dense"], full_square(tf["attention"], L_t))
    assert counted(student_forward) == (sf["dense"] + sf["lora"], full_square(sf["attention"], L_s))
    assert counted(loss_forward) == (tf["lm_head"] + sf["lm_head"], 0)
    assert counted(lambda: hidden["loss"].backward()) == (
        sb["dense"] + sb["lora"] + sb["lm_head"] + extra["lm_head"],
        full_square(sb["attention"], L_s))
    assert extra["dense"] == extra["lora"] == extra["attention"] == 0
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("early_stop", [True, False])
def test_the_bench_micro_step_matches_the_flop_counter(bench, early_stop):
    """bench.micro_step on bench.build's model (gradient checkpointing on, as the bench runs it):
    all of it is step_flops's model FLOPs plus uncounted_flops(checkpointing=True). Its recompute
    stops before each layer's last matmul, down_proj's B (torch's checkpoint early stop, on by
    default); with early stop off it runs that one too, one r × D matmul more per layer and token."""
    torch.manual_seed(0)
    model, _ = bench.build(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    assert model.is_gradient_checkpointing and model.training
    model.set_attn_implementation("eager")
    B, prompt, context, T, chunk = 2, 16, 32, 64, 32  # the bench's --tiny sizes
    cfg, cpu = model.config, torch.device("cpu")
    with set_checkpoint_early_stop(early_stop):
        linear, attention = counted(
            lambda: bench.micro_step(model, B, prompt, context, T, chunk, cpu))
    f = bench.step_flops(cfg, bench.R, prompt, context, T, B)
    extra = bench.uncounted_flops(cfg, bench.R, prompt, T, B, checkpointing=True)
    terms = bench.by_term(f)
    N_s = B * (prompt + T)
    down_B = 0 if early_stop else cfg.num_hidden_layers * 2 * bench.R * cfg.hidden_size * N_s
    assert linear == (terms["dense"] + terms["lora"] + terms["lm_head"]
                      + extra["dense"] + extra["lora"] + extra["lm_head"] + down_B)
    L_t, L_s = prompt + context + T, prompt + T
    student = f["student forward"]["attention"] + f["student backward"]["attention"]
    assert attention == (full_square(f["teacher forward"]["attention"], L_t)
                         + full_square(student + extra["attention"], L_s))
    assert extra["attention"] == f["student forward"]["attention"]  # one more student forward


def test_full_size_parameter_counts(bench):
    """At Qwen3-1.7B's sizes (built on the meta device: shapes, no memory), step_flops's P and P_A
    are the projection and LoRA weights of the real modules; LoRA is 4.05 % of the base's size."""
    cfg = bench.qwen3_config(False)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    n_base = sum(p.numel() for p in model.parameters())
    lora.add_lora(model, r=bench.R, alpha=bench.ALPHA)
    layers = lora.lora_layers(model).values()
    P = sum(m.weight.numel() for m in layers)
    P_A = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in layers)
    f = bench.step_flops(cfg, bench.R, prompt=3, context=0, T=2, B=1)["student forward"]  # N_s = 5
    assert (f["dense"], f["lora"]) == (2 * P * 5, 2 * P_A * 5)
    assert (P, P_A, n_base) == (1_409_286_144, 69_730_304, 1_720_574_976)
    assert round(P_A / n_base, 4) == 0.0405


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12),  # SXM5
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA GeForce RTX 4090", None),
    ("cpu", None),
])
def test_peak_bf16_by_device_name(bench, name, peak):
    assert bench.peak_bf16(name) == peak
