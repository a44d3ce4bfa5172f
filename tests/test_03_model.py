"""Chapter 3: the decoder against Hugging Face transformers (independent reference) and by hand."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.model import (PRESETS, Decoder, ModelConfig, apply_rope, count_params, export_hf, filter_logits,
                              flops_per_token, from_hf, generate, get_config, hf_config, load_checkpoint_tensors,
                              load_hf_state_dict, reference_attention, rope_cos_sin, sdpa_attention)

import transformers  # noqa: E402  (required: the [hf] extra; missing, it must fail the suite, not skip it)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64, rope_theta=1234.0)
    return ModelConfig(**(base | kw))


def small_hf_llama() -> LlamaForCausalLM:
    "A randomly initialised transformers Llama with GQA (6 query heads, 2 kv heads) and an untied head."
    config = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=128, rope_theta=20000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied,kv", [(True, 2), (False, 4), (False, 1)])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tied, kv):
    torch.manual_seed(0)
    ours = Decoder(tiny(tie_embeddings=tied, n_kv_heads=kv)).eval()
    export_hf(ours, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, dtype=torch.float32).eval()
    assert isinstance(hf, LlamaForCausalLM)
    idx = torch.randint(0, 97, (3, 40))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-5, diff
    # tied heads are stored once, as transformers does
    keys = load_checkpoint_tensors(tmp_path).keys()
    assert ("lm_head.weight" in keys) == (not tied)


def test_export_with_tokenizer_files(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir(); tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    export_hf(Decoder(tiny(vocab_size=3)), tmp_path / "model", tokenizer=tmp_path / "tok" / "tokenizer.json")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "model", local_files_only=True)
    assert loaded("hello world")["input_ids"] == [1, 2]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        export_hf(Decoder(tiny()), tmp_path / "m2", tokenizer=tmp_path / "nowhere")


def test_import_a_checkpoint_written_by_transformers(tmp_path):
    torch.manual_seed(1)
    hf = small_hf_llama()
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert ours.cfg.n_kv_heads == 2 and ours.cfg.rope_theta == 20000.0 and ours.cfg.norm_eps == 1e-6
    idx = torch.randint(0, 101, (2, 50))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-5


def _internlm2_folder(hf: "LlamaForCausalLM", path):
    "Write `hf`'s weights as InternLM2 does (renamed; q, k, v of each layer packed into one wqkv, grouped per kv head)."
    c = hf.config
    hd, group = c.hidden_size // c.num_attention_heads, c.num_attention_heads // c.num_key_value_heads
    names = {"embed_tokens": "tok_embeddings", "self_attn.o_proj": "attention.wo", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2"}
    sd = {}
    for name, w in hf.state_dict().items():
        if "q_proj" in name or "k_proj" in name or "v_proj" in name: continue
        if name == "lm_head.weight": sd["output.weight"] = w; continue
        for llama, internlm in names.items(): name = name.replace(f".{llama}.", f".{internlm}.")
        sd[name] = w
    for i in range(c.num_hidden_layers):
        attn = hf.model.layers[i].self_attn
        rows = []
        for j in range(c.num_key_value_heads):                   # InternLM2 reads rows as (kv head, [queries.., key, value], hd)
            for h in range(j * group, (j + 1) * group): rows.append(attn.q_proj.weight[h * hd:(h + 1) * hd])
            rows.append(attn.k_proj.weight[j * hd:(j + 1) * hd]); rows.append(attn.v_proj.weight[j * hd:(j + 1) * hd])
        sd[f"model.layers.{i}.attention.wqkv.weight"] = torch.cat(rows)
    from safetensors.torch import save_file
    path.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False, "hidden_act": "silu",
              "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "num_hidden_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
              "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps, "rope_theta": 20000.0,
              "rope_scaling": {"type": "dynamic", "factor": 2.0}, "tie_word_embeddings": False, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    return sd


def test_import_an_internlm2_checkpoint(tmp_path):
    torch.manual_seed(4)
    hf = small_hf_llama()
    sd = _internlm2_folder(hf, tmp_path / "internlm2")
    ours = from_hf(tmp_path / "internlm2")
    assert (ours.cfg.n_heads, ours.cfg.n_kv_heads, ours.cfg.rope_theta, ours.cfg.max_seq_len) == (6, 2, 20000.0, 128)
    idx = torch.randint(0, 101, (2, 50))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-5
    assert from_hf(tmp_path / "internlm2", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    # a wqkv packed for another head count is named in the error
    sd["model.layers.1.attention.wqkv.weight"] = sd["model.layers.1.attention.wqkv.weight"][:-8]
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "internlm2" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.layers.1.attention.wqkv.weight: shape \(72, 48\), expected \(80, 48\)"):
        from_hf(tmp_path / "internlm2")
    cfg = json.loads((tmp_path / "internlm2" / "config.json").read_text())
    (tmp_path / "internlm2" / "config.json").write_text(json.dumps(cfg | {"rope_scaling": {"type": "linear", "factor": 2.0}}))
    with pytest.raises(ValueError, match="RoPE scaling 'linear' is not supported"):
        from_hf(tmp_path / "internlm2")


def test_import_a_sharded_pytorch_bin_checkpoint(tmp_path):
    "pytorch_model-0000k-of-0000n.bin shards under pytorch_model.bin.index.json, as older checkpoints ship."
    hf = small_hf_llama()
    sd = hf.state_dict()
    names = sorted(sd)
    shards = {f"pytorch_model-0000{k + 1}-of-00003.bin": names[k::3] for k in range(3)}
    for shard, keys in shards.items(): torch.save({k: sd[k] for k in keys}, tmp_path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    idx = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        assert (from_hf(tmp_path)(idx) - hf(idx).logits).abs().max().item() < 1e-5


def test_gradients_match_transformers(tmp_path):
    torch.manual_seed(2)
    ours = Decoder(tiny())
    export_hf(ours, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, dtype=torch.float32)
    idx = torch.randint(0, 97, (2, 30))
    F.cross_entropy(ours(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).backward()
    hf(idx, labels=idx).loss.backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        hf_name = name if name == "lm_head.weight" else "model." + name
        torch.testing.assert_close(p.grad, hf_grads[hf_name].grad, atol=1e-6, rtol=1e-4)


def test_greedy_generation_matches_transformers(tmp_path):
    torch.manual_seed(3)
    ours = Decoder(tiny(init_std=0.2)).eval()
    export_hf(ours, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, dtype=torch.float32).eval()
    prompt = torch.randint(0, 97, (1, 5))
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert generate(ours, prompt, 12, greedy=True).tolist() == ref.tolist()


def test_import_rejects_a_checkpoint_from_another_config(tmp_path):
    export_hf(Decoder(tiny()), tmp_path)
    with pytest.raises(ValueError, match=r"shape mismatch .*mlp.gate_proj.weight"):
        load_hf_state_dict(Decoder(tiny(d_ff=128)), load_checkpoint_tensors(tmp_path))
    with pytest.raises(ValueError, match="missing"):
        load_hf_state_dict(Decoder(tiny(n_layers=3)), load_checkpoint_tensors(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path / "nothing")


def test_rope_matches_transformers_with_explicit_positions():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0)
    rotary = LlamaRotaryEmbedding(config)
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    positions = torch.arange(100, 107)[None].repeat(2, 1)               # a KV-cache style offset
    positions[1] += 13
    cos_hf, sin_hf = rotary(q, positions)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = rope_cos_sin(positions, 16, 500.0)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_hf)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_hf)


def test_forward_with_positions_is_position_shift_of_default():
    torch.manual_seed(4)
    model = Decoder(tiny()).eval()
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        a = model(idx)
        b = model(idx, positions=torch.arange(10)[None])
        c = model(idx, positions=torch.arange(5, 15)[None])              # RoPE is relative: a uniform shift changes nothing
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_attention_reference_vs_sdpa_vs_float64():
    q, k, v = (torch.randn(2, 8, 9, 16, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    # an independent float64 computation with an explicit loop over heads
    out = torch.empty_like(q)
    for h in range(8):
        kv = h // 4
        s = q[:, h] @ k[:, kv].transpose(-1, -2) / 4.0
        s = s + torch.full((9, 9), float("-inf"), dtype=torch.float64).triu(1)
        out[:, h] = torch.softmax(s, -1) @ v[:, kv]
    torch.testing.assert_close(reference_attention(q, k, v), out)
    torch.testing.assert_close(sdpa_attention(q.float(), k.float(), v.float()), out.float(), atol=1e-5, rtol=1e-5)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="d_model=100 is not divisible by n_heads=3"):
        ModelConfig(d_model=100, n_heads=3, n_kv_heads=1)
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="must be positive"):
        ModelConfig(n_layers=0)
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        get_config("nope")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"d_model": 8, "heads": 2})


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_on_meta_match_transformers_counts(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = Decoder(cfg)
        hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")}))
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in hf.parameters()) == count_params(cfg)["total"]
    assert all(p.device.type == "meta" for p in ours.parameters())


def test_internlm2_preset_sizes_match_published():
    # published totals: InternLM2-7B 7.74 B, InternLM2-1.8B 1.89 B parameters (model cards)
    assert abs(count_params(PRESETS["internlm2-7b"])["total"] / 1e9 - 7.74) < 0.01
    assert abs(count_params(PRESETS["internlm2-1.8b"])["total"] / 1e9 - 1.89) < 0.01
    assert 0.8e6 < count_params(PRESETS["cpu-1m"])["total"] < 1.3e6


def test_flops_match_torch_counter():
    from torch.utils.flop_counter import FlopCounterMode
    cfg = tiny()
    model = Decoder(cfg)
    model.set_reference_attention(True)
    idx = torch.randint(0, 97, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(idx).sum().backward()
    assert counter.get_total_flops() / idx.numel() == pytest.approx(flops_per_token(cfg, 32)["total"], rel=1e-6)


def test_sampling_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    torch.manual_seed(5)
    for temperature, k, p in [(1.0, 5, 1.0), (0.5, 0, 0.9), (1.3, 20, 0.5), (0.7, 3, 0.99)]:
        scores = torch.randn(4, 64) * 3
        ref = TemperatureLogitsWarper(temperature)(None, scores.clone())
        if k: ref = TopKLogitsWarper(k)(None, ref)
        if p < 1: ref = TopPLogitsWarper(p)(None, ref)
        ours = filter_logits(scores, temperature, k or None, p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(scores, 0.0)
