"""Equivalence tests for lora.py on tiny random models (CPU, no downloads).

PEFT 0.21 is used as an independent oracle in two tests (skipped if PEFT is not importable).
"""
import copy
import json
import math
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

import lora
from conftest import fp32_rounding, logit_rounding, tiny_llama

# PEFT 0.21 calls a transformers method that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
VOCAB = 97


def tiny_qwen3(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, intermediate_size=64)
    return transformers.Qwen3ForCausalLM(config).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))  # (B, T)


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits  # (B, T, V)


def randomize_b(model: nn.Module, seed: int = 3) -> None:
    """Give every B a nonzero value so that the adapter changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))


def train_steps(model: nn.Module, n: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(n):
        x = ids(10 + step)
        loss = nn.functional.cross_entropy(model(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_lora_linear_equals_dense_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(base, r=3, alpha=12, dropout=0.0, dtype=torch.float64)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)  # (B, in)
    W, b = base.weight.double(), base.bias.double()
    A, B = layer.lora_A.weight, layer.lora_B.weight  # (r, in), (out, r)
    # LoRA Eq. 3: h = W x + (α/r)·B A x, with α/r = 12/3 = 4
    expected = x.double() @ W.T + b + 4.0 * (x.double() @ A.T @ B.T)  # (B, out)
    # fp32's W x + b (6 + 1 terms) and the sum with the float64 LoRA term, each term's magnitude bounded
    xa, Wa, ba = x.double().abs(), W.abs(), b.abs()
    lora_abs = 4.0 * (xa @ A.abs().T @ B.abs().T)  # (B, out)
    bound = fp32_rounding(6 + 2, xa @ Wa.T + ba + lora_abs)  # (B, out)
    assert ((layer(x).double() - expected).abs() <= bound).all()
    # merged dense weight W + (α/r)·B A gives the same output: each merged weight rounds once more to fp32
    with torch.no_grad():
        layer.merge()
        bound = fp32_rounding(6 + 2, xa @ (Wa + 4.0 * B.abs() @ A.abs()).T + ba)
        assert ((layer(x).double() - expected).abs() <= bound).all()


def test_init_is_identity_and_only_lora_is_trainable():
    base = tiny_qwen3()
    model = lora.add_lora(copy.deepcopy(base), r=4, alpha=8)
    x = ids()
    assert torch.equal(logits(model, x), logits(base, x))
    layers = lora.lora_layers(model)
    assert len(layers) == 2 * 7
    for m in layers.values():
        assert m.lora_A.weight.dtype == torch.float32 and torch.count_nonzero(m.lora_B.weight) == 0
        # kaiming_uniform_(a=√5) draws from U(-1/√in, 1/√in)
        assert m.lora_A.weight.abs().max() <= 1 / math.sqrt(m.in_features)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    # the base state_dict keys are unchanged; the only new keys are the adapter's
    extra = set(model.state_dict()) - set(base.state_dict())
    assert set(base.state_dict()) <= set(model.state_dict())
    assert extra == {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}

    loss = model(x).logits.square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        if name.endswith(".lora_B.weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif name.endswith(".lora_A.weight"):
            assert p.grad is not None, name  # zero at init because B = 0
        else:
            assert p.grad is None, name


def test_add_lora_errors():
    model = lora.add_lora(tiny_qwen3(), r=2, alpha=4)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(model)
    with pytest.raises(ValueError, match="no nn.Linear module named"):
        lora.add_lora(tiny_qwen3(), targets=("nope",))
    with pytest.raises(ValueError, match="no LoRA layers"):
        with lora.adapters_disabled(tiny_qwen3()):
            pass


def test_adapters_disabled_is_exactly_the_base_model_after_training():
    base = tiny_qwen3()
    model = lora.add_lora(copy.deepcopy(base), r=4, alpha=8, dropout=0.1)
    train_steps(model)
    x = ids()
    # the trained adapter moves a logit by more than any rounding (logit_rounding, the bound test_merge_unmerge
    # allows this model): what makes the exact equalities below say that the adapter is off, not that it is small
    dz = logit_rounding(model, x.shape[1], per_layer=8)
    assert (logits(model, x) - logits(base, x)).abs().max() > dz
    for train_mode in (False, True):  # dropout acts only on the LoRA branch, which is off
        model.train(train_mode)
        with lora.adapters_disabled(model):
            assert torch.equal(logits(model, x), logits(base, x))
    model.eval()
    after = logits(model, x)
    assert not torch.equal(after, logits(base, x))  # restored on exit
    with lora.adapters_disabled(model):
        with lora.adapters_disabled(model):
            pass
        assert torch.equal(logits(model, x), logits(base, x))  # nesting keeps the outer state
    assert torch.equal(logits(model, x), after)


def test_merge_unmerge():
    base = tiny_qwen3()
    model = lora.add_lora(copy.deepcopy(base), r=4, alpha=8)
    randomize_b(model)
    x = ids()
    unmerged = logits(model, x)
    base_weights = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}

    lora.merge(model)
    once = {n: p.clone() for n, p in model.named_parameters()}
    lora.merge(model)  # idempotent
    assert all(torch.equal(p, once[n]) for n, p in model.named_parameters())
    assert all(m.merged for m in lora.lora_layers(model).values())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(once[q], base_weights[q])
    torch.testing.assert_close(logits(model, x), unmerged, rtol=0, atol=logit_rounding(model, x.shape[1], per_layer=8))
    # the model's ordinary state_dict now holds the merged dense weights under the base keys
    assert torch.equal(model.state_dict()[q], once[q]) and "weight_unmerged" not in str(model.state_dict().keys())
    with lora.adapters_disabled(model):  # exact base output while merged
        assert torch.equal(logits(model, x), logits(base, x))
    model.train()  # merge state is not tied to train()/eval()
    assert all(m.merged for m in lora.lora_layers(model).values())
    with pytest.raises(RuntimeError, match="unmerge"):
        model(x)  # gradients would silently miss A and B

    lora.unmerge(model)
    lora.unmerge(model)  # idempotent
    model.eval()
    assert all(torch.equal(p, base_weights[n]) for n, p in model.named_parameters() if "lora_" not in n)
    assert torch.equal(logits(model, x), unmerged)


def test_save_load_round_trip_and_format(tmp_path):
    base = tiny_qwen3()
    model = lora.add_lora(copy.deepcopy(base), r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    train_steps(model)
    lora.save_adapter(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, ["down_proj", "q_proj", "v_proj"])
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    assert len(tensors) == 2 * 3 * 2

    loaded = lora.load_adapter(copy.deepcopy(base), str(tmp_path))  # no LoRA yet: added from the config
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))
    fresh = lora.add_lora(copy.deepcopy(base), r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    lora.load_adapter(fresh, str(tmp_path))  # into existing LoRA layers
    assert torch.equal(logits(fresh, x), logits(model, x))


def test_load_adapter_validation(tmp_path):
    base = tiny_qwen3()
    model = lora.add_lora(copy.deepcopy(base), r=4, alpha=8, targets=("q_proj", "v_proj"))
    lora.save_adapter(model, str(tmp_path))
    weights = str(tmp_path / "adapter_model.safetensors")
    good = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    with pytest.raises(ValueError, match="r = 4 but the model's LoRA layers have 2"):
        lora.load_adapter(lora.add_lora(copy.deepcopy(base), r=2, alpha=8, targets=("q_proj", "v_proj")),
                          str(tmp_path))
    with pytest.raises(ValueError, match="lora_alpha = 8 but"):
        lora.load_adapter(lora.add_lora(copy.deepcopy(base), r=4, alpha=16, targets=("q_proj", "v_proj")),
                          str(tmp_path))
    with pytest.raises(ValueError, match="missing keys.*k_proj"):
        lora.load_adapter(lora.add_lora(copy.deepcopy(base), r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj")),
                          str(tmp_path))
    merged = lora.merge(lora.add_lora(copy.deepcopy(base), r=4, alpha=8, targets=("q_proj", "v_proj")))
    with pytest.raises(ValueError, match="merged"):
        lora.load_adapter(merged, str(tmp_path))

    save_file({k: v for k, v in good.items() if k != key}, weights)
    with pytest.raises(ValueError, match=f"adapter_model.safetensors: 1 missing keys.*{key}"):
        lora.load_adapter(copy.deepcopy(base), str(tmp_path))
    save_file({**good, "base_model.model.extra.lora_A.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="unexpected keys.*extra"):
        lora.load_adapter(copy.deepcopy(base), str(tmp_path))
    save_file({**good, key: torch.zeros(16, 3)}, weights)
    with pytest.raises(ValueError, match=f"{key} has shape \\(16, 3\\), the model expects \\(16, 4\\)"):
        lora.load_adapter(copy.deepcopy(base), str(tmp_path))

    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="adapter_config.json: use_dora = True is not supported"):
        lora.load_adapter(copy.deepcopy(base), str(tmp_path))
    config_path.write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(ValueError, match="init_lora_weights = 'pissa_niter_4' modifies the base weights"):
        lora.load_adapter(copy.deepcopy(base), str(tmp_path))


def test_bf16_base_with_fp32_adapter():
    base = tiny_qwen3().to(torch.bfloat16)
    model = lora.add_lora(copy.deepcopy(base), r=4, alpha=8)
    m = lora.lora_layers(model)["model.layers.0.mlp.up_proj"]
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.weight.dtype == torch.float32
    x = ids()
    assert torch.equal(logits(model, x), logits(base, x))
    train_steps(model, n=1)
    out = logits(model, x)
    assert out.dtype == torch.bfloat16 and not torch.equal(out, logits(base, x))
    with lora.adapters_disabled(model):
        assert torch.equal(logits(model, x), logits(base, x))
    lora.merge(model)
    with lora.adapters_disabled(model):
        assert torch.equal(logits(model, x), logits(base, x))
    lora.unmerge(model)
    assert torch.equal(logits(model, x), out)  # exact restore even in bf16


def test_fp32_merge_of_a_bf16_base_keeps_a_small_delta():
    """merge(dtype=fp32) on bf16 weights: the layer computes x·(W + ΔW)ᵀ in fp32 and rounds once, W is untouched,
    and a ΔW far below half a bf16 ulp of W still changes the output, where an in-place bf16 merge drops it."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(64, 32).to(torch.bfloat16), r=4, alpha=8, dropout=0.0, dtype=torch.float32)
    nn.init.normal_(layer.lora_B.weight, std=1e-5)  # ΔW ~ 1e-5 against |W| ~ 0.07: half an ulp is ~1.5e-4
    w_before = layer.weight.detach().clone()
    x = torch.randn(8, 64).to(torch.bfloat16)  # (B, in)
    W, dW = layer.weight.float(), layer.delta_weight()  # (out, in)
    expected = (x.float() @ (W + dW).T + layer.bias.float()).to(torch.bfloat16)  # (B, out)  one rounding
    with torch.no_grad():
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)  # (B, out)  W alone
        layer.merge(torch.float32)
        layer.merge(torch.float32)  # idempotent
        assert layer.weight_merged.dtype == torch.float32 and torch.equal(layer.weight, w_before)
        assert torch.equal(layer(x), expected) and not torch.equal(layer(x), base)
        layer.disabled = True
        assert torch.equal(layer(x), base)  # the base output, exactly
        layer.disabled = False
        layer.unmerge()
        assert layer.weight_merged is None and torch.equal(layer.weight, w_before) and not layer.merged
        layer.merge()  # in place, in bf16: this ΔW rounds away except on the few smallest weights
        assert (layer.weight == w_before).float().mean() > 0.95
        layer.unmerge()
    layer.merge(torch.float32)
    with pytest.raises(RuntimeError, match="merged LoRA model"):
        layer(x)  # gradients enabled on a merged layer: refused as before
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}


def test_llama():
    base = tiny_llama(VOCAB)
    model = lora.add_lora(copy.deepcopy(base), r=4, alpha=8)
    assert len(lora.lora_layers(model)) == 2 * 7
    x = ids()
    assert torch.equal(logits(model, x), logits(base, x))
    train_steps(model, n=2)
    # the trained adapter moves a logit by more than the rounding the merge check below allows
    assert (logits(model, x) - logits(base, x)).abs().max() > logit_rounding(model, x.shape[1])
    with lora.adapters_disabled(model):
        assert torch.equal(logits(model, x), logits(base, x))
    with torch.no_grad():
        lora.merge(model)
        merged = logits(model, x)
        torch.testing.assert_close(merged, logits(lora.unmerge(model), x), rtol=0, atol=logit_rounding(model, x.shape[1]))


def test_peft_loads_our_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_qwen3()
    model = lora.add_lora(copy.deepcopy(base), r=4, alpha=16)
    randomize_b(model)
    lora.save_adapter(model, str(tmp_path))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = ids()
    dz = logit_rounding(model, x.shape[1], per_layer=8)
    torch.testing.assert_close(logits(peft_model, x), logits(model, x), rtol=0, atol=dz)
    assert (logits(model, x) - logits(base, x)).abs().max() > dz  # the adapter matters beyond that rounding


def test_we_load_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_qwen3()
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "o_proj", "up_proj"],
                             lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False)  # B random too
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    peft_model.save_pretrained(str(tmp_path))
    model = lora.load_adapter(copy.deepcopy(base), str(tmp_path))
    assert {n.rsplit(".", 1)[-1] for n in lora.lora_layers(model)} == {"q_proj", "o_proj", "up_proj"}
    x = ids()
    dz = logit_rounding(model, x.shape[1], per_layer=8)
    torch.testing.assert_close(logits(model, x), logits(peft_model, x), rtol=0, atol=dz)
    assert (logits(model, x) - logits(base, x)).abs().max() > dz  # the adapter matters beyond that rounding
    assert os.path.isfile(tmp_path / "adapter_config.json")
