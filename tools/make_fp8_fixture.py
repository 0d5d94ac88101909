#!/usr/bin/env python3
"""Fixtures for reading Meta's FP8 checkpoints (transformers' `fbgemm_fp8` layout).

Writes:
  fixtures/components/fp8_e4m3.safetensors  PyTorch's float8_e4m3fn decoding of all 256 codes, and
                                            its rounding of sample values (ties, subnormals,
                                            saturation) to codes
  fixtures/models/fp8/                      a tiny text Llama 4 whose MoE experts, shared experts
                                            and dense MLPs are stored as fbgemm writes them, with
                                            reference logits

fbgemm_fp8 layout (transformers 5.23.0, integrations/fbgemm_fp8.py):
  nn.Linear  X.weight F8_E4M3 [out, in],            X.weight_scale F32 [out, 1]
  experts    gate_up_proj F8_E4M3 [E, H, 2I],       gate_up_proj_scale F32 [E, 1, 2I]
             down_proj F8_E4M3 [E, I, H],           down_proj_scale F32 [E, H, 1]
  one scale per output: s = max |w| / 448 over that output's inputs, code = e4m3fn(w / s).

transformers only loads this format on a GPU, where fbgemm also rounds activations to fp8. The
reference here is the float model run on the dequantised weights (fp8 · s), which is the Rust
semantics: weights dequantised exactly, activations kept in f32. Weights left in bf16 (attention,
router, lm_head, embeddings, norms, as Meta's checkpoints keep them) are rounded to bf16 before the
reference runs, so it sees exactly the stored values.

Seeded and single-threaded. Run from the repository root:
  .venv-ref/bin/python tools/make_fp8_fixture.py
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import COMPONENTS, MODELS, greedy_with_cache, randomise, text_config, write_json  # noqa: E402

from transformers import Llama4ForCausalLM  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def make_codes():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(FP8).float()
    g = torch.Generator().manual_seed(11)
    # Random magnitudes over the whole range, every code value and the midpoints between
    # neighbours (ties), just past them, and values beyond 448 (saturation) or below 2^-10.
    finite = values[torch.isfinite(values)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    nudge = mids * (1 + 2.0 ** -20)
    samples = torch.cat([
        finite, mids, nudge, -mids,
        torch.tensor([449.0, 463.99, 464.0, 465.0, 480.0, 1e6, float("inf"), -float("inf"),
                      2.0 ** -10, 2.0 ** -11, 3 * 2.0 ** -11, 2.0 ** -30, 0.0, -0.0]),
        torch.exp(torch.empty(512).uniform_(-12, 7, generator=g)) * torch.sign(torch.randn(512, generator=g)),
    ]).float().contiguous()
    encoded = samples.to(FP8).view(torch.uint8).contiguous()
    save_file({"decoded": values.contiguous(), "encode_in": samples, "encode_out": encoded},
              os.path.join(COMPONENTS, "fp8_e4m3.safetensors"))
    print(f"fp8_e4m3: 256 codes, {samples.numel()} rounding samples")


def quantize_rows(w):
    """Per-row fp8 of an [out, in] matrix: codes [out, in], scales [out, 1]."""
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = amax / FP8_MAX
    codes = (w / torch.where(scale > 0, scale, torch.ones_like(scale))).to(FP8)
    return codes, scale


def quantize_experts(w):
    """Per-output fp8 of an [E, in, out] expert tensor: codes [E, in, out], scales [E, 1, out]."""
    codes, scale = quantize_rows(w.transpose(1, 2).reshape(-1, w.shape[1]))
    e, i, o = w.shape
    return codes.reshape(e, o, i).transpose(1, 2).contiguous(), scale.reshape(e, 1, o)


def is_converted(name):
    """What fbgemm_fp8 converts in Meta's checkpoints: the MLPs (routed experts, shared expert,
    dense MLP layers); attention, router and lm_head stay bf16."""
    return ".feed_forward." in name and ".router." not in name


def make_model():
    name = "fp8"
    out_dir = os.path.join(MODELS, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    # Maverick-like: dense and MoE layers interleaved, NoPE layer 3; expert width 24 and dense
    # width 72 leave ragged tails for 16-lane kernels.
    cfg = text_config(hidden_size=32, head_dim=8, intermediate_size=24, intermediate_size_mlp=72, vocab_size=128,
                      num_local_experts=4, interleave_moe_layer_step=2)
    model = Llama4ForCausalLM(cfg).eval()
    randomise(model, seed=5000, bf16=True)

    tensors = {}
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if not is_converted(pname):
                tensors[pname] = p.detach().to(torch.bfloat16).contiguous()
                continue
            if p.dim() == 3:
                codes, scale = quantize_experts(p.detach())
                if pname.endswith("down_proj"):
                    scale = scale.transpose(1, 2).contiguous()  # [E, H, 1], as fbgemm stores it
                deq = codes.float() * scale.reshape(p.shape[0], 1, p.shape[2])
            else:
                codes, scale = quantize_rows(p.detach())
                deq = codes.float() * scale
            assert torch.isfinite(deq).all()
            tensors[pname] = codes
            tensors[pname + "_scale"] = scale.float().contiguous()
            p.copy_(deq)  # the reference runs on exactly the dequantised weights
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    config = json.loads(cfg.to_json_string())
    config["architectures"] = ["Llama4ForCausalLM"]
    config["torch_dtype"] = "bfloat16"
    config.pop("_attn_implementation", None)
    not_converted = ["lm_head"]
    for i in range(cfg.num_hidden_layers):
        not_converted.append(f"model.layers.{i}.self_attn")
        if i in cfg.moe_layers:
            not_converted.append(f"model.layers.{i}.feed_forward.router")
    config["quantization_config"] = {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": 1200.0,
        "modules_to_not_convert": not_converted,
    }
    write_json(os.path.join(out_dir, "config.json"), config)

    prompt_len, new_tokens = 20, 4
    g = torch.Generator().manual_seed(5001)
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=g)
    generated, step_logits = greedy_with_cache(model, prompt, new_tokens)
    full = torch.cat([prompt[0], torch.tensor(generated)]).unsqueeze(0)
    with torch.no_grad():
        logits_full = model(full, use_cache=False).logits[0]
    rows = logits_full[prompt_len - 1: prompt_len - 1 + new_tokens]
    drift = ((rows - step_logits).abs().max() / rows.abs().max()).item()
    assert drift < 1e-5, f"cached and uncached logits differ by {drift}"
    ref = {
        "prompt_ids": prompt[0].to(torch.int64).contiguous(),
        "generated_ids": torch.tensor(generated, dtype=torch.int64),
        "step_logits": step_logits.float().contiguous(),
        "logits_full": logits_full.float().contiguous(),
    }
    save_file(ref, os.path.join(out_dir, "reference.safetensors"))
    fp8 = sum(1 for t in tensors.values() if t.dtype == FP8)
    print(f"{name}: {fp8} fp8 tensors, prompt {prompt_len} + {new_tokens} tokens, ids {generated}")


def main():
    os.makedirs(COMPONENTS, exist_ok=True)
    os.makedirs(MODELS, exist_ok=True)
    make_codes()
    make_model()


if __name__ == "__main__":
    main()
