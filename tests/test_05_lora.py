"""Chapter 5: LoRA and QLoRA against peft on the transformers export of the course model, and by hand."""
import json

import pytest
import torch
import torch.nn as nn

from course_lib.lora import (LoRALinear, dequantize_base, inject_lora, load_adapter, lora_layers, merge_lora,
                             quantize_base, save_adapter, trainable_parameters, unmerge_lora)
from course_lib.model import Decoder, ModelConfig, export_hf, from_hf
from course_lib.quant import Linear4bit

import peft  # required: the [hf] extra
import transformers  # required: the [hf] extra
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

CFG = ModelConfig(vocab_size=211, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64,
                  tie_embeddings=False)


def _randomise_b(model, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        with torch.no_grad(): layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


@pytest.fixture
def base_dir(tmp_path):
    torch.manual_seed(0)
    model = Decoder(CFG)
    export_hf(model, tmp_path / "base")
    return tmp_path


@pytest.mark.parametrize("targets,rslora", [(["q_proj", "v_proj"], False), (None, False), (r".*\.1\.mlp\.(up|down)_proj", True)])
def test_our_adapter_in_peft_same_logits(base_dir, targets, rslora):
    ours = from_hf(base_dir / "base")
    kw = {} if targets is None else {"targets": targets}
    names = inject_lora(ours, r=4, alpha=12, use_rslora=rslora, **kw)
    assert names
    _randomise_b(ours)
    save_adapter(ours, base_dir / "adapter")
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir / "base"), base_dir / "adapter").eval()
    idx = torch.randint(0, CFG.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), rtol=0, atol=1e-6)
        # and peft's merge equals ours
        merged_hf = hf.merge_and_unload()
        merge_lora(ours)
        for name, module in ours.named_modules():
            if name in names:
                torch.testing.assert_close(module.weight, merged_hf.get_submodule("model." + name).weight, rtol=0, atol=1e-6)


def test_peft_adapter_in_ours_same_logits(base_dir):
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir / "base"),
                        LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"], init_lora_weights=False))
    hf.save_pretrained(base_dir / "peft_adapter")
    ours = from_hf(base_dir / "base")
    names = load_adapter(ours, base_dir / "peft_adapter")
    assert len(names) == 3 * CFG.n_layers
    idx = torch.randint(0, CFG.vocab_size, (2, 24))
    with torch.no_grad(): torch.testing.assert_close(ours(idx), hf.eval()(idx).logits, rtol=0, atol=1e-6)


def test_lora_gradients_equal_peft(base_dir):
    "One backward pass: the adapters' gradients equal peft's (same weights, same loss)."
    ours = from_hf(base_dir / "base")
    inject_lora(ours, ["q_proj", "up_proj"], r=4, alpha=8)
    _randomise_b(ours)
    save_adapter(ours, base_dir / "adapter")
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir / "base"), base_dir / "adapter", is_trainable=True)
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    ours(idx).logsumexp(-1).mean().backward()
    hf(idx).logits.logsumexp(-1).mean().backward()
    for name, layer in lora_layers(ours).items():
        ref = hf.base_model.model.get_submodule("model." + name)
        torch.testing.assert_close(layer.lora_A.weight.grad, ref.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.lora_B.weight.grad, ref.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-7)


def test_layer_by_hand_merge_unmerge():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, r=3, alpha=6)
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), base(x))                  # B starts at zero
    with torch.no_grad(): layer.lora_B.weight.normal_()
    w = base.weight.detach().double() + 2.0 * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    expected = x.double() @ w.T + base.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    w0 = base.weight.detach().clone()
    layer.merge(); torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge(); torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)


def test_only_adapters_train():
    model = Decoder(CFG)
    inject_lora(model, r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    t, total = trainable_parameters(model)
    assert t == sum(2 * (m.in_features + m.out_features) for m in lora_layers(model).values())


def test_qlora_forward_and_merge_path():
    torch.manual_seed(0)
    model = Decoder(CFG)
    quantize_base(model)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 7 * CFG.n_layers
    inject_lora(model, r=4)
    _randomise_b(model, std=0.05)
    idx = torch.randint(0, CFG.vocab_size, (1, 12))
    model(idx).sum().backward()                            # gradients reach the adapters through the NF4 base
    assert all(l.lora_B.weight.grad is not None for l in lora_layers(model).values())
    with torch.no_grad(): before = model(idx)
    with pytest.raises(ValueError, match="NF4-quantised base"): merge_lora(model)
    merge_lora(dequantize_base(model))
    with torch.no_grad(): torch.testing.assert_close(model(idx), before, rtol=1e-5, atol=1e-5)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="must be in 1..min"): LoRALinear(nn.Linear(8, 4), r=5)
    with pytest.raises(ValueError, match="no linear layer matches"): inject_lora(Decoder(CFG), ["wqkv"])
    model = Decoder(CFG); inject_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA"): inject_lora(model, ["v_proj"])
    save_adapter(model, tmp_path / "a")
    torch.manual_seed(123)
    with pytest.raises(ValueError, match="was trained on base"): load_adapter(Decoder(CFG), tmp_path / "a")
    wider = ModelConfig(**{**CFG.__dict__, "d_model": 128})
    with pytest.raises(ValueError, match="another base model"): load_adapter(Decoder(wider), tmp_path / "a", check_base=False)
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"): load_adapter(Decoder(CFG), tmp_path)
    merge_lora(model, unload=False)
    with pytest.raises(ValueError, match="unmerge_lora"): save_adapter(model, tmp_path / "b")
    unmerge_lora(model)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"): load_adapter(Decoder(CFG), tmp_path / "a")
