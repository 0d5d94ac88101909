#!/usr/bin/env python3
"""Reference fixtures for the Rust tests, computed by Hugging Face transformers 5.23.0 in float32.

Builds tiny Llama 4 checkpoints with EVERY weight randomised (transformers initialises norms to one
and some tensors to zero, which would hide bugs), runs the reference, and writes:

  fixtures/components/  per-component inputs/outputs (MoE, attention, RoPE frequencies)
  fixtures/models/NAME/ tiny checkpoints in Hugging Face layout + reference.safetensors

Configs are small enough that chunk boundaries (attention_chunk_size 8) and temperature steps
(floor_scale 4) are crossed many times. Seeded and single-threaded: rerunning reproduces the files.

Environment (not needed by `cargo test`):
  python3 -m venv .venv-ref && .venv-ref/bin/pip install torch==2.15.0 transformers==5.23.0 pillow safetensors
Run from the repository root:  .venv-ref/bin/python tools/make_fixtures.py
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

import transformers
from transformers import Llama4ForCausalLM, Llama4TextConfig
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe, Llama4TextRotaryEmbedding

assert transformers.__version__ == "5.23.0", transformers.__version__
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
COMPONENTS = os.path.join(ROOT, "components")
MODELS = os.path.join(ROOT, "models")

# Small shapes shared by the component fixtures.
H, HQ, HKV, D = 64, 4, 2, 16
CHUNK, FLOOR_SCALE, ATTN_SCALE = 8, 4, 0.1


def randomise(module, seed, bf16=False):
    """Every parameter drawn afresh: linears ~ N(0, 1/fan_in), norm weights in [0.5, 1.5],
    embeddings and 1-D tensors ~ N(0, 1). With bf16, values are rounded to bf16 (the model still
    runs in f32, on exactly the values the checkpoint stores)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in name:
                v = 0.5 + torch.rand(p.shape, generator=g)
            elif p.dim() == 1 or "embed" in name:
                v = torch.randn(p.shape, generator=g)
                if "bias" in name:
                    v = v * 0.1
            elif p.dim() == 3:
                v = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5  # [E, in, out]
            else:
                v = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5  # [out, in]
            if bf16:
                v = v.to(torch.bfloat16).float()
            p.copy_(v)


def state(module, prefix, bf16):
    out = {}
    for name, p in module.state_dict().items():
        t = p.detach().clone().contiguous()
        out[prefix + name] = t.to(torch.bfloat16) if bf16 else t
    return out


def text_config(**kw):
    base = dict(
        hidden_size=H,
        intermediate_size=32,
        intermediate_size_mlp=128,
        num_hidden_layers=4,
        num_attention_heads=HQ,
        num_key_value_heads=HKV,
        head_dim=D,
        vocab_size=512,
        num_local_experts=16,
        num_experts_per_tok=1,
        attention_chunk_size=CHUNK,
        floor_scale=FLOOR_SCALE,
        attn_scale=ATTN_SCALE,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    )
    base.update(kw)
    cfg = Llama4TextConfig(**base)
    cfg._attn_implementation = "eager"
    return cfg


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def component_json(cfg, **extra):
    rp = cfg.rope_parameters
    scaling = None
    if rp.get("rope_type", "default") != "default":
        scaling = {k: rp[k] for k in rp if k != "rope_theta"}
    out = dict(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_local_experts=cfg.num_local_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        use_qk_norm=cfg.use_qk_norm,
        attention_chunk_size=cfg.attention_chunk_size,
        floor_scale=cfg.floor_scale,
        attn_scale=cfg.attn_scale,
        attn_temperature_tuning=cfg.attn_temperature_tuning,
        attention_bias=cfg.attention_bias,
        rope_theta=rp["rope_theta"],
        rope_scaling=scaling,
    )
    out.update(extra)
    return out


def make_moe():
    for k in (1, 2):
        for bf16 in (False, True):
            name = f"moe_top{k}_{'bf16' if bf16 else 'f32'}"
            cfg = text_config(num_experts_per_tok=k)
            moe = Llama4TextMoe(cfg).eval()
            randomise(moe, seed=100 + 10 * k + bf16, bf16=bf16)
            g = torch.Generator().manual_seed(7 + k)
            tensors = state(moe, "feed_forward.", bf16)
            with torch.no_grad():
                for t in (1, 37):
                    x = torch.randn(t, H, generator=g)
                    out, logits = moe(x)
                    tensors[f"x_t{t}"] = x
                    tensors[f"router_logits_t{t}"] = logits.contiguous()
                    tensors[f"out_t{t}"] = out.contiguous()
            save_file(tensors, os.path.join(COMPONENTS, name + ".safetensors"))
            write_json(os.path.join(COMPONENTS, name + ".json"), component_json(cfg))


def capture_attention(model, layer, ids):
    """Input (already normed) and output of one layer's self-attention during a full forward."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen["hidden"] = kwargs["hidden_states"][0].detach().clone()
        seen["out"] = output[0][0].detach().clone()

    h = model.model.layers[layer].self_attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    return seen


def make_attention():
    t = 40  # 5 chunks of 8, 10 temperature steps of 4
    for name, bias, layer in (("attn_rope", False, 0), ("attn_nope", False, 3), ("attn_rope_bias", True, 0)):
        cfg = text_config(attention_bias=bias, num_local_experts=2)
        model = Llama4ForCausalLM(cfg).eval()
        randomise(model, seed=200 + layer + 5 * bias)
        ids = torch.randint(0, cfg.vocab_size, (1, t), generator=torch.Generator().manual_seed(3))
        seen = capture_attention(model, layer, ids)
        tensors = state(model.model.layers[layer].self_attn, "self_attn.", False)
        tensors["hidden"] = seen["hidden"].contiguous()
        tensors["out"] = seen["out"].contiguous()
        save_file(tensors, os.path.join(COMPONENTS, name + ".safetensors"))
        is_rope = bool(cfg.no_rope_layers[layer])
        write_json(os.path.join(COMPONENTS, name + ".json"), component_json(cfg, is_rope_layer=is_rope, layer=layer))


def make_rope():
    variants = {
        "default": dict(rope_type="default", rope_theta=10000.0),
        "llama3": dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        # Scout-Instruct ships low = high, where the smoothing formula would divide by zero.
        "llama3_low_eq_high": dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=16.0,
            low_freq_factor=1.0,
            high_freq_factor=1.0,
            original_max_position_embeddings=8192,
        ),
        "llama3_small": text_config().rope_parameters,
    }
    tensors, meta = {}, {}
    for name, rp in variants.items():
        head_dim = D if name in ("default", "llama3_small") else 128
        heads = 4 if head_dim == D else 40
        cfg = text_config(head_dim=head_dim, num_attention_heads=heads, hidden_size=head_dim * heads,
                          rope_parameters=dict(rp))
        rope = Llama4TextRotaryEmbedding(cfg)
        tensors[f"inv_freq_{name}"] = rope.inv_freq.float().contiguous()
        scaling = None if rp["rope_type"] == "default" else {k: v for k, v in rp.items() if k != "rope_theta"}
        meta[name] = dict(head_dim=head_dim, rope_theta=rp["rope_theta"], rope_scaling=scaling)
    save_file(tensors, os.path.join(COMPONENTS, "rope.safetensors"))
    write_json(os.path.join(COMPONENTS, "rope.json"), meta)


# ---------------------------------------------------------------------------------------------
# Whole models


def greedy_with_cache(model, prompt, n):
    """Greedy decoding through transformers' own cache: one prefill, then one token per step.
    Returns generated ids and the logits row that chose each of them."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache = out.past_key_values
        logits = [out.logits[0, -1]]
        ids = [int(logits[-1].argmax())]
        for _ in range(n - 1):
            out = model(torch.tensor([[ids[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
            ids.append(int(logits[-1].argmax()))
    return ids, torch.stack(logits)


def shard(tensors, n):
    """Splits a state dict into n shards in name order, as save_pretrained would by size."""
    names = sorted(tensors)
    per = (len(names) + n - 1) // n
    return [{k: tensors[k] for k in names[i * per:(i + 1) * per]} for i in range(n)]


def make_model(name, cfg, seed, bf16=False, shards=1, config_edits=None, prompt_len=21, new_tokens=12):
    out_dir = os.path.join(MODELS, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    model = Llama4ForCausalLM(cfg).eval()
    randomise(model, seed=seed, bf16=bf16)
    if cfg.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tensors = state(model, "", bf16)
    if cfg.tie_word_embeddings:
        del tensors["lm_head.weight"]
    if shards == 1:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, part in enumerate(shard(tensors, shards)):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": weight_map})

    config = json.loads(cfg.to_json_string())
    config["architectures"] = ["Llama4ForCausalLM"]
    config["torch_dtype"] = "bfloat16" if bf16 else "float32"
    config.pop("_attn_implementation", None)
    for key, value in (config_edits or {}).items():
        if value is None and key.startswith("-"):
            config.pop(key[1:], None)
        else:
            config[key] = value
    write_json(os.path.join(out_dir, "config.json"), config)

    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=g)
    generated, step_logits = greedy_with_cache(model, prompt, new_tokens)
    full = torch.cat([prompt[0], torch.tensor(generated)]).unsqueeze(0)
    with torch.no_grad():
        out = model(full, use_cache=False, output_hidden_states=True)
    logits_full = out.logits[0]
    # Cross-check transformers against itself: cached steps vs one full forward.
    rows = logits_full[prompt_len - 1: prompt_len - 1 + new_tokens]
    drift = ((rows - step_logits).abs().max() / rows.abs().max()).item()
    assert drift < 1e-5, f"{name}: transformers' cached and uncached logits differ by {drift}"
    assert torch.equal(rows.argmax(-1), torch.tensor(generated)), name

    hidden = torch.stack([h[0, :prompt_len] for h in out.hidden_states])
    ref = {
        "prompt_ids": prompt[0].to(torch.int64).contiguous(),
        "generated_ids": torch.tensor(generated, dtype=torch.int64),
        "step_logits": step_logits.float().contiguous(),
        "logits_full": logits_full.float().contiguous(),
        "hidden_states": hidden.float().contiguous(),
    }
    save_file(ref, os.path.join(out_dir, "reference.safetensors"))
    print(f"{name}: prompt {prompt_len} + {new_tokens} tokens, cache drift {drift:.2e}, ids {generated}")


def make_scout_layer_variant():
    """The scout fixture's weights with layer 1 (a RoPE layer) attending over everything
    (`layer_types[1] = "full_attention"`) instead of its chunk: the reference for changing one
    layer's chunking through the library's API. Only the reference logits are written, beside
    the scout fixture; the weights are checked to be the same."""
    cfg = scout_config()
    assert cfg.layer_types[1] == "chunked_attention" and cfg.no_rope_layers[1] == 1
    cfg.layer_types = list(cfg.layer_types)
    cfg.layer_types[1] = "full_attention"
    model = Llama4ForCausalLM(cfg).eval()
    randomise(model, seed=1000)
    out_dir = os.path.join(MODELS, "scout")
    stored = load_file(os.path.join(out_dir, "model.safetensors"))
    for name, t in state(model, "", False).items():
        assert torch.equal(stored[name], t), name
    g = torch.Generator().manual_seed(1000 + 1)
    prompt = torch.randint(3, cfg.vocab_size, (1, 21), generator=g)
    generated, step_logits = greedy_with_cache(model, prompt, 12)
    full = torch.cat([prompt[0], torch.tensor(generated)]).unsqueeze(0)
    with torch.no_grad():
        logits_full = model(full, use_cache=False).logits[0]
    ref = {
        "prompt_ids": prompt[0].to(torch.int64).contiguous(),
        "generated_ids": torch.tensor(generated, dtype=torch.int64),
        "step_logits": step_logits.float().contiguous(),
        "logits_full": logits_full.float().contiguous(),
    }
    save_file(ref, os.path.join(out_dir, "reference_layer1_global.safetensors"))
    print(f"scout, layer 1 global: ids {generated}")


def scout_config():
    """Scout-like: every layer MoE, NoPE every 4th layer, QK norm, llama3 RoPE with low = high
    (as Scout-Instruct)."""
    return text_config(
        num_hidden_layers=5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=16.0, low_freq_factor=1.0,
                             high_freq_factor=1.0, original_max_position_embeddings=64),
    )


def make_models():
    # Scout-like (see scout_config), with the published checkpoints' integer
    # `attn_temperature_tuning`, an empty `no_rope_layers` (meaning: the default interval), f32,
    # one file.
    make_model("scout", scout_config(), seed=1000,
               config_edits={"attn_temperature_tuning": 4, "no_rope_layers": [], "-layer_types": None})

    # Maverick-like: dense and MoE layers interleaved, no QK norm, bf16 weights in three shards,
    # RoPE written in the transformers 4.x spelling (rope_theta + rope_scaling), eos as a list.
    maverick = text_config(num_local_experts=32, interleave_moe_layer_step=2, use_qk_norm=False,
                           eos_token_id=[2, 5])
    rp = maverick.rope_parameters
    make_model("maverick", maverick, seed=2000, bf16=True, shards=3, config_edits={
        "-rope_parameters": None,
        "rope_theta": rp["rope_theta"],
        "rope_scaling": {k: v for k, v in rp.items() if k != "rope_theta"},
        "-moe_layers": None,
    })

    # Top-2 routing, tied embeddings, no chunking (attention_chunk_size null: plain causal),
    # explicit no_rope_layers, default RoPE, head_dim absent (hidden / heads).
    top2 = text_config(num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=True,
                       no_rope_layers=[1, 0, 1, 0],
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                       # transformers 5.23 cannot run a null chunk size (it always builds the chunked
                       # mask and raises); a chunk longer than every sequence here is the same
                       # computation, and config.json says null.
                       attention_chunk_size=4096)
    make_model("top2_tied", top2, seed=3000,
               config_edits={"-head_dim": None, "-layer_types": None, "attention_chunk_size": None})


def main():
    os.makedirs(COMPONENTS, exist_ok=True)
    os.makedirs(MODELS, exist_ok=True)
    what = sys.argv[1:] or ["components", "models"]
    if "components" in what:
        make_rope()
        make_moe()
        make_attention()
    if "models" in what:
        make_models()
    if "models" in what or "variants" in what:
        make_scout_layer_variant()


if __name__ == "__main__":
    main()
