# GGUF fixtures made by llama.cpp's own tools, and llama.cpp's logits on them.
#
#   python make_gguf_fixtures.py LLAMA_CPP_DIR LLAMA_QUANTIZE TOKENIZER_MODEL [--work DIR]
#
# LLAMA_CPP_DIR: a llama.cpp source tree (the copy in the llama-cpp-python 0.3.36 sdist) for its
# converter; LLAMA_QUANTIZE: its llama-quantize built for this CPU (see compare.sh);
# TOKENIZER_MODEL: Meta's Llama 4 tiktoken file (llama_models/llama4/tokenizer.model in the
# llama-models package). llama-cpp-python 0.3.36, built from the same sdist, must be installed in
# this Python (the reference venv). Seeded: reruns give the same checkpoints; llama.cpp's logits
# depend on its build (the committed ones: AVX2, no AVX-512, no AVX-VNNI, Zen 3).
#
# Two random Llama 4 checkpoints (every weight randomised and rounded to bf16, so the F32 and
# BF16 files hold the same values), both 4 layers (layer 3 NoPE), MoE layers with a shared
# expert (tiny: layers 1 and 3; k: layer 3) and dense ones, QK norm, llama3 RoPE scaling, and
# llama.cpp's fixed chunk size (8192) and temperature constants (floor 8192, scale 0.1):
# - `tiny`: hidden 32 (rows of 32: the 32-value block types), 4 experts of width 32, top 1;
#   files F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (`--pure`: every matrix in the type).
# - `k`: hidden 256 (rows of 256 for the k-quants), 2 experts of width 256; files Q4_K_M
#   (llama-quantize's own mixture) and `mixed`, whose matrices cycle through Q2_K, Q3_K, Q4_K,
#   Q5_K and Q6_K by tensor kind, so one small file holds every k-quant.
# The vocabulary is Llama 4's cut to its 512 first BPE ranks and 16 special tokens
# (make_llama4_tokenizer.py), pre-tokenizer `llama4`.
#
# reference.safetensors holds, for each file NAME (e.g. `tiny-Q8_0`), from llama-cpp-python with
# an f32 KV cache, 2 threads, no flash attention:
#   NAME.logits           [T, V] logits of the prompt evaluated in one batch (llama.cpp's gemm paths)
#   NAME.stepwise_spread  [T] max |logit difference| per position between that and the same
#                         prompt one token per batch (its gemv paths): llama.cpp's own rounding
#                         noise, the scale for a tolerance
#   NAME.greedy_ids       [N] greedy continuation, NAME.decode_logits [N, V] the logits that chose it
# and `prompt_ids` [T] (shared). For tiny-F32 and tiny-Q8_0 also NAME.long_logits [8, V]: the
# last 8 positions of `long_ids` (8,200 ids), past the 8,192 chunk boundary where the NoPE
# layer's temperature first differs from 1. `hf.tiny.logits` / `hf.k.logits` [T, V] are
# transformers' float32 logits of the same checkpoints on the prompt.
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, '..', '..')
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, '..'))
from hf_to_gguf import convert  # noqa: E402
from make_fixtures import randomise, text_config  # noqa: E402
from transformers import Llama4ForCausalLM  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument('llama_cpp')
ap.add_argument('quantize')
ap.add_argument('tokenizer_model')
ap.add_argument('--work', default='/tmp/gguf-fixtures')
ap.add_argument('--out', default=os.path.join(ROOT, 'fixtures', 'gguf'))
args = ap.parse_args()

PROMPT_LEN, NEW_TOKENS, LONG_LEN, LONG_KEEP = 32, 4, 8200, 8
shutil.rmtree(args.work, ignore_errors=True)
os.makedirs(args.work)
shutil.rmtree(args.out, ignore_errors=True)
os.makedirs(args.out)

tok_dir = os.path.join(args.work, 'tokenizer')
subprocess.run([sys.executable, os.path.join(HERE, 'make_llama4_tokenizer.py'), args.llama_cpp,
                args.tokenizer_model, tok_dir, '--ranks', '512', '--specials', '16'], check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
vocab = json.load(open(os.path.join(tok_dir, 'config.json')))['vocab_size']
bos = json.load(open(os.path.join(tok_dir, 'config.json')))['bos_token_id']
eot = json.load(open(os.path.join(tok_dir, 'config.json')))['eos_token_id']

COMMON = dict(num_hidden_layers=4, num_experts_per_tok=1, use_qk_norm=True,
              attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1, attn_temperature_tuning=True,
              vocab_size=vocab, bos_token_id=bos, eos_token_id=eot, pad_token_id=None,
              max_position_embeddings=16384,
              rope_parameters=dict(rope_type='llama3', rope_theta=500000.0, factor=8.0,
                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192))
MODELS = {
    'tiny': dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4,
                 interleave_moe_layer_step=2),
    'k': dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
              intermediate_size=256, intermediate_size_mlp=256, num_local_experts=2,
              interleave_moe_layer_step=4),
}
# `mixed`: each kind of matrix in one k-quant (llama-quantize's --tensor-type patterns).
# The first pattern that matches a name wins: the expert tensors come before their dense kin.
MIXED = ['ffn_gate_exps=q2_K', 'ffn_up_exps=q3_K', 'ffn_down_exps=q4_K', 'ffn_gate_shexp=q3_K',
         'ffn_up_shexp=q4_K', 'ffn_down_shexp=q5_K', 'attn_q=q2_K', 'attn_k=q3_K', 'attn_v=q6_K',
         'attn_output=q5_K', 'ffn_gate=q4_K', 'ffn_up=q5_K', 'ffn_down=q6_K', 'token_embd=q4_K',
         'output=q6_K']

rng = np.random.default_rng(20260522)
prompt = np.concatenate([[bos], rng.integers(16, 512, PROMPT_LEN - 1)]).astype(np.int64)
long_ids = np.concatenate([[bos], rng.integers(16, 512, LONG_LEN - 1)]).astype(np.int64)
ref = {'prompt_ids': prompt, 'long_ids': long_ids}
files = {}

for seed, (name, dims) in enumerate(MODELS.items()):
    cfg = text_config(**COMMON, **dims)
    model = Llama4ForCausalLM(cfg).eval()
    randomise(model, seed=100 + seed, bf16=True)
    hf_dir = os.path.join(args.work, f'hf-{name}')
    model.save_pretrained(hf_dir, safe_serialization=True)
    conf = json.load(open(os.path.join(hf_dir, 'config.json')))
    conf['architectures'] = ['Llama4ForCausalLM']
    json.dump(conf, open(os.path.join(hf_dir, 'config.json'), 'w'), indent=1)
    for f in ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'):
        shutil.copy(os.path.join(tok_dir, f), hf_dir)
    with torch.no_grad():
        ref[f'hf.{name}.logits'] = model(torch.tensor(prompt).unsqueeze(0)).logits[0].float().numpy()
    f32 = os.path.join(args.work, f'{name}-F32.gguf')
    convert(args.llama_cpp, hf_dir, f32, 'f32')
    if name == 'tiny':
        files['tiny-F32'] = f32
        for t in ('f16', 'bf16'):
            out = os.path.join(args.work, f'tiny-{t.upper()}.gguf')
            convert(args.llama_cpp, hf_dir, out, t)
            files[f'tiny-{t.upper()}'] = out
        for t in ('Q8_0', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1'):
            out = os.path.join(args.work, f'tiny-{t}.gguf')
            subprocess.run([args.quantize, '--pure', f32, out, t], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            files[f'tiny-{t}'] = out
    else:
        out = os.path.join(args.work, 'k-Q4_K_M.gguf')
        subprocess.run([args.quantize, f32, out, 'Q4_K_M'], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        files['k-Q4_K_M'] = out
        out = os.path.join(args.work, 'k-mixed.gguf')
        extra = [a for t in MIXED for a in ('--tensor-type', t)]
        subprocess.run([args.quantize, *extra, f32, out, 'Q4_K'], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        files['k-mixed'] = out

from llama_cpp import Llama  # noqa: E402  (after conversion: it loads its own ggml)


def run(path, ids, batch, n_ctx):
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=batch, n_ubatch=batch, n_threads=2,
                n_threads_batch=2, logits_all=True, type_k=0, type_v=0, flash_attn=False, verbose=False)
    llm.eval(list(int(i) for i in ids))
    return llm, np.array(llm.scores[:llm.n_tokens], dtype=np.float32)


for name, path in files.items():
    llm, logits = run(path, prompt, 512, 64)
    greedy, decode = [], []
    for _ in range(NEW_TOKENS):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        decode.append(row)
        greedy.append(int(row.argmax()))
        llm.eval([greedy[-1]])
    _, stepwise = run(path, prompt, 1, 64)
    ref[f'{name}.logits'] = logits
    ref[f'{name}.stepwise_spread'] = np.abs(logits - stepwise).max(axis=1)
    ref[f'{name}.greedy_ids'] = np.array(greedy, dtype=np.int64)
    ref[f'{name}.decode_logits'] = np.stack(decode)
    spread = np.abs(logits - stepwise).max() / np.abs(logits).max()
    msg = f'{name}: greedy {greedy}, batch vs one-by-one {spread:.2e}'
    if name in ('tiny-F32', 'tiny-Q8_0'):
        _, long = run(path, long_ids, 512, LONG_LEN + 8)
        ref[f'{name}.long_logits'] = long[-LONG_KEEP:]
    if name.startswith('tiny-F32') or name == 'k-Q4_K_M':
        hf = ref[f"hf.{name.split('-')[0]}.logits"]
        msg += f', vs transformers {np.abs(logits - hf).max() / np.abs(hf).max():.2e}'
    print(msg)
    shutil.copy(path, os.path.join(args.out, f'{name}.gguf'))

save_file({k: np.ascontiguousarray(v) for k, v in ref.items()}, os.path.join(args.out, 'reference.safetensors'),
          metadata={'prompt_len': str(PROMPT_LEN), 'new_tokens': str(NEW_TOKENS),
                    'llama_cpp_python': '0.3.36', 'kv_cache': 'f32', 'threads': '2', 'flash_attn': 'off'})
total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
print('wrote', args.out, total, 'bytes')
