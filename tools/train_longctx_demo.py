#!/usr/bin/env python3
"""Train the length-generalisation demo: a tiny Llama 4 that retrieves a key's value at contexts far
longer than any it was trained on.

Task (key-value retrieval in a haystack; ids, not text: see ID SCHEME below):

    <bos> f k₁ v₁ f d f f k₂ v₂ d f … f d <query> kⱼ   →   vⱼ

P key/value pairs (distinct keys, distinct values) sit at random places in a haystack of filler
tokens f and decoys d (D values that no pair has, half of the haystack); the prompt ends with
<query> and one of the keys; the answer is that key's value. Contexts of every length from 32 to
1024 tokens (the training length), the pairs anywhere in them.

Why decoys: without them a model whose attention to the pair is diluted by a long haystack still
answers right (what leaks to the filler carries no value, so the right value stays the largest
part of what is read; a first model without decoys answered 16/16 at 256K with temperature tuning
off). With decoys the leak reads wrong values, as a real haystack full of plausible answers does,
and a diluted match shows as a wrong answer. Decoys come once retrieval is learnt (from half of
the steps, growing to the held-out share over a quarter of them): with decoys from the start
nothing was learnt in 3000 steps.

Why the Llama 4 text architecture should carry this far beyond 1024 tokens:
  - the RoPE layers attend within chunks of `attention_chunk_size` tokens only, so they never see a
    distance they did not see in training, whatever the context (each value learns its key there:
    a previous-token head; pairs never straddle a chunk boundary, see below);
  - the one NoPE layer (the last) is the only path from a pair to the query once the pair is more
    than a chunk away, and it has no positions at all: a content match (query key = the key a value
    position remembers) works at any distance;
  - what does change with the context is the number of keys in that layer's softmax: N filler keys
    of score s₀ against one match of score s₁ give the match a weight 1 / (1 + N·e^(s₀−s₁)), which
    falls as N grows. Temperature tuning multiplies the NoPE queries by
    1 + attn_scale · ln(1 + ⌊(p+1)/floor_scale⌋), which for p ≫ floor_scale is close to
    attn_scale · ln p when attn_scale = 1/ln(floor_scale): every score gap then grows like ln N, as
    fast as ln N filler keys need, and the match keeps its weight at any length (the argument of
    scalable softmax, arXiv 2501.19399). Training at every length from 32 to 1024 ties the model
    to this scaling instead of to one length.

Controls, same budget (steps, batch, data):
  - the same model evaluated with temperature tuning off (nothing to train);
  - the same architecture trained without temperature tuning (models/longctx-demo-notemp): does a
    model that never had it find another way to keep its match at long range?
  - an all-RoPE model with full causal attention in every layer (no chunks, no NoPE layer).

ID SCHEME (no tokenizer; the Rust generator in models/longctx-demo/task.rs is the same rule):
  0 <bos>, 1 <query>, 2 <pad> (unused), then FILLER filler ids, KEYS key ids, VALUES value ids.
  A prompt of N tokens (N even): position 0 <bos>, position 1 filler, then N/2 − 2 two-token slots
  (slot s holds positions 2s and 2s+1, s = 1 … N/2 − 2), then <query> kⱼ at N − 2, N − 1. P slots
  hold the pairs (key at 2s, value at 2s + 1), the others two haystack tokens. Pairs start at even
  positions and the chunk is even, so a key and its value are always in the same chunk.

HELD-OUT SET: context c of length N is drawn by SplitMix64 seeded with
  HELDOUT_SEED ^ (N << 32) ^ c, one `next()` discarded, `below(n) = next() % n` (the bias of the
  modulo is below 2⁻⁵⁰ here): P slots (1 + below(N/2 − 2), redrawn when taken), then P keys
  (below(KEYS), redrawn when taken), then P values (below(VALUES), likewise), then D decoys
  (below(VALUES), redrawn when taken or a pair's value), then per remaining position in
  increasing order t = below(2 · FILLER): filler t if t < FILLER, else decoy (t − FILLER) % D
  (D = 0: t = below(FILLER), filler only). Sample j of length N is context
  j / P asked for its pair j % P (key order = draw order). Training draws its data with torch's
  generator instead (a batch at a time); a training context equal to a held-out one has
  probability below 10⁻⁵⁰.

Seeded, deterministic algorithms, a fixed number of threads: rerunning reproduces the files.
From the repository root:

    .venv-ref/bin/python tools/train_longctx_demo.py            # every variant, about an hour
    .venv-ref/bin/python tools/train_longctx_demo.py --only allrope   # one variant, same files
    .venv-ref/bin/python tools/train_longctx_demo.py --explore '{"steps": 300}'   # nothing written
    .venv-ref/bin/python tools/train_longctx_demo.py --compare DUMP --context N [--model DIR] [--no-temperature]

Writes models/longctx-demo/, models/longctx-demo-notemp/ and models/longctx-demo-allrope/
(config.json, model.safetensors in bf16, task.json, and reference.safetensors: transformers'
logits on held-out context 0 at the training length, for the Rust test), and the training log
and figures in models/longctx-demo/ (train_log.txt, training.json). `--compare` checks the logits
of examples/needle.rs --dump-logits against transformers on the same samples.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import transformers
from transformers import Llama4ForCausalLM, Llama4TextConfig

assert transformers.__version__ == "5.23.0", transformers.__version__

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_demo import config_json, round_to_bf16, write_json  # noqa: E402  (the digit demo's helpers)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# ---------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------

BOS, QUERY, PAD = 0, 1, 2
FILLER, KEYS, VALUES = 32, 64, 64
FILLER_BASE = 3
KEY_BASE = FILLER_BASE + FILLER
VALUE_BASE = KEY_BASE + KEYS
VOCAB = VALUE_BASE + VALUES
HELDOUT_SEED = 0x4C4F4E47  # "LONG"
MASK64 = (1 << 64) - 1


class SplitMix64:
    """The held-out generator (same rule in models/longctx-demo/task.rs)."""

    def __init__(self, seed):
        self.state = seed & MASK64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n):
        return self.next() % n


def distinct(rng, n, count, offset=0, taken=()):
    """count distinct numbers of offset … offset + n − 1, none in `taken`, in draw order."""
    out = []
    while len(out) < count:
        x = offset + rng.below(n)
        if x not in out and x not in taken:
            out.append(x)
    return out


def heldout_context(n, c, pairs, decoys):
    """Context c of length n: (the first n − 2 token ids, [(key id, value id)] in draw order)."""
    assert n % 2 == 0 and n // 2 - 2 >= pairs, (n, pairs)
    rng = SplitMix64(HELDOUT_SEED ^ (n << 32) ^ c)
    rng.next()
    slots = distinct(rng, n // 2 - 2, pairs, offset=1)
    keys = distinct(rng, KEYS, pairs)
    values = distinct(rng, VALUES, pairs)
    decoy = distinct(rng, VALUES, decoys, taken=values)
    toks = [None] * (n - 2)
    toks[0] = BOS
    for s, k, v in zip(slots, keys, values):
        toks[2 * s] = KEY_BASE + k
        toks[2 * s + 1] = VALUE_BASE + v
    for i in range(1, n - 2):
        if toks[i] is None:
            toks[i] = haystack(rng.below(FILLER * (2 if decoys else 1)), decoy)
    return toks, [(KEY_BASE + k, VALUE_BASE + v) for k, v in zip(keys, values)]


def haystack(t, decoy):
    """The haystack token for a draw t: filler id t below FILLER, else decoy value (t − FILLER) % D."""
    return FILLER_BASE + t if t < FILLER else VALUE_BASE + decoy[(t - FILLER) % len(decoy)]


def heldout_samples(n, samples, pairs, decoys):
    """[(prompt ids, answer id)]: sample j is context j // pairs asked for its pair j % pairs."""
    out, ctx = [], None
    for j in range(samples):
        c, q = divmod(j, pairs)
        if q == 0:
            ctx = heldout_context(n, c, pairs, decoys)
        toks, kv = ctx
        out.append((toks + [QUERY, kv[q][0]], kv[q][1]))
    return out


def train_batch(g, batch, n, max_pairs, queries, decoys, share):
    """A batch of training sequences of length n: ids [B, n], the positions whose next token is
    an answer [Q], and the answers [B, Q].

    The body is a held-out-style context (random pairs at random aligned slots among filler);
    the tail asks `queries` of its keys: Q − 1 triples <query> k v, then <query> k at the end, so
    every sequence teaches Q retrievals (the last one is exactly the held-out format; Q = 1 is
    the held-out format itself). Each row has its own number of pairs (Q … max_pairs). Each
    haystack position is a decoy value (one of `decoys` values no pair has) with probability
    `share`, else filler (the held-out set has share 1/2)."""
    body = n - 3 * (queries - 1) - 2
    slots = (body - 2) // 2  # slot s (1 … slots) holds positions 2s, 2s + 1 of the body
    p_max = min(max_pairs, slots)
    assert p_max >= queries, (n, queries)
    npairs = torch.randint(queries, p_max + 1, (batch,), generator=g)
    slot = 1 + torch.rand(batch, slots, generator=g).argsort(dim=1)[:, :p_max]  # [B, p_max]
    key = KEY_BASE + torch.rand(batch, KEYS, generator=g).argsort(dim=1)[:, :p_max]
    perm = VALUE_BASE + torch.rand(batch, VALUES, generator=g).argsort(dim=1)
    val, decoy = perm[:, :p_max], perm[:, p_max:p_max + decoys]  # decoys: values no pair has
    toks = FILLER_BASE + torch.randint(0, FILLER, (batch, n), generator=g)
    if decoys and share > 0:
        pick = decoy.gather(1, torch.randint(0, decoys, (batch, n), generator=g))
        toks = torch.where(torch.rand(batch, n, generator=g) < share, pick, toks)
    toks[:, 0] = BOS
    used = torch.arange(p_max)[None, :] < npairs[:, None]  # [B, p_max]
    rows = torch.arange(batch)[:, None].expand(-1, p_max)
    toks[rows[used], 2 * slot[used]] = key[used]
    toks[rows[used], 2 * slot[used] + 1] = val[used]
    # Pairs 0 … Q − 1 are asked (their slots are random, so this is a random choice of pairs).
    qpos = torch.tensor([body + 3 * t + 1 for t in range(queries)])  # positions of the asked keys
    toks[:, qpos - 1] = QUERY
    toks[:, qpos] = key[:, :queries]
    toks[:, qpos[:-1] + 1] = val[:, :queries - 1]
    assert qpos[-1] == n - 1
    return toks, qpos, val[:, :queries]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

DEFAULTS = dict(
    hidden=64, layers=4, heads=2, kv_heads=1, head_dim=32, mlp=128,
    nope_interval=4, chunk=8, floor_scale=16, attn_scale=None,  # None: 1 / ln(floor_scale)
    rope_theta=10000.0,
    train_context=1024, min_context=32, curriculum=0.4, max_pairs=16, max_queries=4, eval_pairs=16,
    decoys=4, decoy_start=0.5, decoy_ramp=0.25,
    steps=4000, tokens_per_step=4096, lr=1e-3, min_lr_frac=0.05, warmup=100, weight_decay=0.0,
    seed=42, data_seed=1234, threads=1,
)


def model_config(h, variant):
    """variant: "irope" (chunked RoPE layers, NoPE layers, temperature tuning), "irope-notemp" (the
    same trained without temperature tuning) or "allrope" (RoPE and full causal attention everywhere)."""
    attn_scale = h["attn_scale"] if h["attn_scale"] is not None else 1.0 / math.log(h["floor_scale"])
    if variant in ("irope", "irope-notemp"):
        no_rope = [int((i + 1) % h["nope_interval"] != 0) for i in range(h["layers"])]
        layer_types = ["chunked_attention" if r else "full_attention" for r in no_rope]
    else:
        no_rope = [1] * h["layers"]
        layer_types = ["full_attention"] * h["layers"]
    cfg = Llama4TextConfig(
        vocab_size=VOCAB,
        hidden_size=h["hidden"],
        intermediate_size=h["mlp"],  # expert width: unused, no MoE layer
        intermediate_size_mlp=h["mlp"],
        num_hidden_layers=h["layers"],
        num_attention_heads=h["heads"],
        num_key_value_heads=h["kv_heads"],
        head_dim=h["head_dim"],
        num_local_experts=1,
        num_experts_per_tok=1,
        moe_layers=[],  # every layer dense
        no_rope_layers=no_rope,
        layer_types=layer_types,
        attention_chunk_size=h["chunk"],
        attn_temperature_tuning=variant == "irope",
        floor_scale=h["floor_scale"],
        attn_scale=attn_scale,
        use_qk_norm=True,
        rope_parameters=dict(rope_type="default", rope_theta=h["rope_theta"]),
        max_position_embeddings=h["train_context"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=PAD,
        pad_token_id=PAD,
    )
    return cfg


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def sample_length(g, h, step):
    """An even context length, log-uniform between min_context and a maximum that grows
    geometrically from min_context to train_context over the first `curriculum` of the steps:
    retrieval is found on short contexts first (a long one hides the few tokens that matter)."""
    lo, hi = math.log(h["min_context"]), math.log(h["train_context"])
    top = lo + (hi - lo) * progress(h, step)
    n = int(math.exp(lo + (top - lo) * torch.rand((), generator=g).item()))
    return max(h["min_context"], min(h["train_context"], n - n % 2))


def progress(h, step):
    """0 → 1 over the first `curriculum` of the steps, then 1."""
    grow = h["curriculum"] * h["steps"]
    return 1.0 if grow <= 0 else min(1.0, step / grow)


def max_pairs_at(h, step):
    """Pairs per context grow too, from 2 to max_pairs: with few pairs, copying the value that is
    there already pays, and the key match is then a refinement rather than a search."""
    return round(2 + (h["max_pairs"] - 2) * progress(h, step))


def decoy_share_at(h, step):
    """Decoys come once retrieval is learnt: none before `decoy_start` of the steps, then a share
    of the haystack growing to the held-out 1/2 over `decoy_ramp` of the steps. With decoys from
    the start nothing is learnt (copying any value of the context, the first step towards
    retrieval, then mostly copies a decoy)."""
    if not h["decoys"]:
        return 0.0
    t = (step / h["steps"] - h["decoy_start"]) / max(h["decoy_ramp"], 1e-9)
    return 0.5 * min(1.0, max(0.0, t))


def lr_at(h, step):
    if step < h["warmup"]:
        return h["lr"] * (step + 1) / h["warmup"]
    t = (step - h["warmup"]) / max(1, h["steps"] - h["warmup"])
    return h["lr"] * (h["min_lr_frac"] + (1 - h["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t)))


def block_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Training attention, the same function as transformers' eager one without a [T, T] mask:
    causal flash attention over the whole sequence (NoPE and full layers) or over each chunk
    (chunked layers: the sequence is cut into chunks, padded at the end, and each chunk is one
    causal block). `query [B, Hq, T, D]`, `key`/`value [B, Hkv, T, D]` → `[B, T, Hq, D]`."""
    b, hq, t, d = query.shape
    groups = hq // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    cfg = module.config
    c = cfg.attention_chunk_size
    if cfg.layer_types[module.layer_idx] == "chunked_attention" and t > c:
        pad = (-t) % c
        blocks = lambda x: F.pad(x, (0, 0, 0, pad)).reshape(b, hq, (t + pad) // c, c, d)  # noqa: E731
        out = F.scaled_dot_product_attention(blocks(query), blocks(key), blocks(value), is_causal=True,
                                             scale=scaling)
        out = out.reshape(b, hq, t + pad, d)[:, :, :t]
    else:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("block", block_attention)


def last_logits(model, toks):
    return model(input_ids=toks, use_cache=False, logits_to_keep=1).logits[:, -1]


def train(h, variant, log=print):
    cfg = model_config(h, variant)
    cfg._attn_implementation = "block"
    torch.manual_seed(h["seed"])
    model = Llama4ForCausalLM(cfg)
    g = torch.Generator().manual_seed(h["data_seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=h["lr"], betas=(0.9, 0.98),
                            weight_decay=h["weight_decay"])
    model.train()
    t0 = time.time()
    ema = None
    for step in range(h["steps"]):
        n = sample_length(g, h, step)
        batch = max(1, h["tokens_per_step"] // n)
        pairs = max_pairs_at(h, step)
        queries = int(torch.randint(1, min(h["max_queries"], pairs) + 1, (), generator=g))
        share = decoy_share_at(h, step)
        toks, qpos, ans = train_batch(g, batch, n, pairs, queries, h["decoys"], share)
        for group in opt.param_groups:
            group["lr"] = lr_at(h, step)
        keep = n - int(qpos[0])
        logits = model(input_ids=toks, use_cache=False, logits_to_keep=keep).logits[:, qpos - int(qpos[0])]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ans.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc = (logits.argmax(-1) == ans).float().mean().item()
        ema = acc if ema is None else 0.98 * ema + 0.02 * acc
        if step % 100 == 0 or step == h["steps"] - 1:
            log(f"[{variant}] step {step:5d}  n {n:5d}  pairs<={pairs:2d}  decoys {share:.2f}  loss {loss.item():.4f}  acc(ema) {ema:.3f}  "
                f"lr {lr_at(h, step):.2e}  {time.time() - t0:6.1f}s")
    model.eval()
    return model, time.time() - t0


@torch.no_grad()
def evaluate(model, n, samples, task, batch=8):
    """Accuracy on the first `samples` held-out samples of length n (sdpa; for exploration and
    the lengths the reference can hold in memory)."""
    data = heldout_samples(n, samples, task["pairs"], task["decoys"])
    correct = 0
    for i in range(0, len(data), batch):
        part = data[i:i + batch]
        toks = torch.tensor([p for p, _ in part])
        ans = torch.tensor([a for _, a in part])
        correct += int((last_logits(model, toks).argmax(-1) == ans).sum())
    return correct / len(data)


def with_temperature(model, on):
    for layer in model.model.layers:
        layer.self_attn.attn_temperature_tuning = on and not layer.self_attn.use_rope


def explore(h, variants, eval_lengths, eval_samples, save):
    results = {}
    for variant in variants:
        model, secs = train(h, variant)
        round_to_bf16(model)
        if save:
            write_model(os.path.join(save, variant), model, h)
        rows = {}
        for n in eval_lengths:
            acc = evaluate(model, n, eval_samples, task_json(h), batch=max(1, 8192 // n))
            row = {"acc": acc}
            if variant == "irope":
                with_temperature(model, False)
                row["acc_no_temp"] = evaluate(model, n, eval_samples, task_json(h),
                                              batch=max(1, 8192 // n))
                with_temperature(model, True)
            rows[n] = row
            print(f"[{variant}] n {n:6d}: {row}", flush=True)
        results[variant] = dict(train_s=secs, eval=rows)
    print(json.dumps(dict(hparams=h, results=results)), flush=True)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def task_json(h):
    return dict(
        task="key-value retrieval: <bos> filler and pairs (key value) ... <query> key -> value",
        bos=BOS, query=QUERY, pad=PAD,
        filler_base=FILLER_BASE, filler=FILLER, key_base=KEY_BASE, keys=KEYS,
        value_base=VALUE_BASE, values=VALUES,
        heldout_seed=HELDOUT_SEED, pairs=h["eval_pairs"], decoys=h["decoys"], train_context=h["train_context"],
    )


def write_model(dir_, model, h):
    """config.json, model.safetensors (bf16, the values the model was evaluated with) and task.json."""
    os.makedirs(dir_, exist_ok=True)
    write_json(os.path.join(dir_, "config.json"), config_json(model.config))
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(dir_, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(dir_, "task.json"), task_json(h))


def write_reference(dir_, h, variants):
    """reference.safetensors for the Rust test: context 0 at the training length, its queries,
    and transformers' logits at each answer position, per temperature setting in `variants`."""
    n, pairs = h["train_context"], h["eval_pairs"]
    toks, kv = heldout_context(n, 0, pairs, h["decoys"])
    out = {
        "context": torch.tensor(toks, dtype=torch.int64),
        "queries": torch.tensor([[QUERY, k] for k, _ in kv], dtype=torch.int64),
        "answers": torch.tensor([v for _, v in kv], dtype=torch.int64),
    }
    for name, temperature in variants:
        model = load_model(dir_, temperature)
        logits, answers = reference_logits(model, n, pairs, task_json(h))
        assert torch.equal(answers, out["answers"])
        out[name] = logits.contiguous()
    save_file(out, os.path.join(dir_, "reference.safetensors"))


# ---------------------------------------------------------------------------------------------
# Reference logits (transformers, eager attention)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_logits(model, n, samples, task, piece=1024):
    """Logits [K, V] at the answer position of held-out samples 0 … K − 1 of length n, with
    transformers' eager attention, and the answers [K].

    Up to 2048 tokens every sample is one forward pass without a cache. Beyond, the [T, T] score
    matrices no longer fit, so each context is prefilled once into a DynamicCache in pieces of
    `piece` tokens and each query runs as two more tokens on a copy of that cache (the same
    computation, checked equal to the uncached one by `--check-cache`)."""
    model.config._attn_implementation = "eager"
    pairs = task["pairs"]
    data = heldout_samples(n, samples, pairs, task["decoys"])
    answers = torch.tensor([a for _, a in data])
    if n <= 2048:
        rows = [last_logits(model, torch.tensor([p])) for p, _ in data]
        return torch.cat(rows), answers
    rows = []
    for c in range(0, samples, pairs):
        ctx = torch.tensor([data[c][0][:-2]])
        cache = transformers.DynamicCache(config=model.config)
        for i in range(0, ctx.shape[1], piece):
            model(input_ids=ctx[:, i:i + piece], past_key_values=cache, use_cache=True, logits_to_keep=1)
        for p, _ in data[c:c + pairs]:
            out = model(input_ids=torch.tensor([p[-2:]]), past_key_values=copy.deepcopy(cache), use_cache=True)
            rows.append(out.logits[:, -1])
    return torch.cat(rows), answers


def load_model(dir_, temperature=None):
    """The model in dir_ in float32, temperature tuning as its config says or as `temperature`."""
    model = Llama4ForCausalLM.from_pretrained(dir_, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    if temperature is not None:
        with_temperature(model, temperature)
    return model


def compare(dump, dir_, n, temperature):
    """Rust logits (examples/needle.rs --dump-logits) against transformers on the same samples."""
    from safetensors.torch import load_file

    rust = load_file(dump)
    task = json.load(open(os.path.join(dir_, "task.json")))
    samples = rust["answers"].shape[0]
    model = load_model(dir_, temperature)
    t0 = time.time()
    ref, answers = reference_logits(model, n, samples, task)
    secs = time.time() - t0
    assert torch.equal(answers, rust["answers"]), "the two generators disagree"
    diff = (rust["logits"] - ref).abs().max().item()
    scale = ref.abs().max().item()
    same = int((rust["logits"].argmax(-1) == ref.argmax(-1)).sum())
    acc_ref = (ref.argmax(-1) == answers).float().mean().item()
    tuned = any(l.self_attn.attn_temperature_tuning and not l.self_attn.use_rope for l in model.model.layers)
    out = dict(context=n, samples=samples, temperature_tuning=tuned, model=os.path.basename(dir_),
               same_answers=same, max_abs_diff=diff, max_abs_logit=scale, rel_diff=diff / scale,
               reference_accuracy=acc_ref, reference_seconds=secs)
    print(json.dumps(out))


@torch.no_grad()
def check_cache(dir_, n, temperature):
    """The cached reference path equals the uncached one (same held-out samples)."""
    model = load_model(dir_, temperature)
    task = json.load(open(os.path.join(dir_, "task.json")))
    assert n <= 2048, "the uncached reference needs n <= 2048"
    plain, _ = reference_logits(model, n, task["pairs"], task)
    data = heldout_samples(n, task["pairs"], task["pairs"], task["decoys"])
    cached = []
    ctx = torch.tensor([data[0][0][:-2]])
    cache = transformers.DynamicCache(config=model.config)
    for i in range(0, ctx.shape[1], 300):  # pieces not aligned with the chunks on purpose
        model(input_ids=ctx[:, i:i + 300], past_key_values=cache, use_cache=True, logits_to_keep=1)
    for p, _ in data:
        out = model(input_ids=torch.tensor([p[-2:]]), past_key_values=copy.deepcopy(cache), use_cache=True)
        cached.append(out.logits[:, -1])
    cached = torch.cat(cached)
    print(f"cached vs uncached at {n}: max |diff| {(cached - plain).abs().max().item():.3e} "
          f"(max |logit| {plain.abs().max().item():.3f})")


# variant, directory, reference tensors (name, temperature tuning: None = as the config says)
VARIANTS = (
    ("irope", "longctx-demo", (("logits", None), ("logits_no_temperature", False))),
    ("irope-notemp", "longctx-demo-notemp", (("logits", None),)),
    ("allrope", "longctx-demo-allrope", (("logits", None),)),
)


def final(h, only=None):
    """Trains every variant with the same budget (steps, batches, data, seed) and writes them.
    `only`: the one variant to (re)train; each variant seeds itself, so this reproduces its files."""
    # One thread: on a machine shared with other work, two threads wait for each other at every
    # operation of these small matrices (ten times slower here than one thread).
    torch.set_num_threads(h["threads"])
    log_lines = []

    def log(line):
        print(line, flush=True)
        log_lines.append(line)

    summary = {}
    for variant, name, refs in VARIANTS:
        if only is not None and variant != only:
            continue
        dir_ = os.path.join(ROOT, "models", name)
        model, secs = train(h, variant, log)
        round_to_bf16(model)
        model.config._attn_implementation = "block"
        acc = evaluate(model, h["train_context"], 256, task_json(h))
        log(f"[{variant}] trained in {secs:.0f} s; held-out accuracy at {h['train_context']}: {acc:.3f} (bf16)")
        write_model(dir_, model, h)
        write_reference(dir_, h, refs)
        summary[variant] = dict(directory=f"models/{name}", train_s=round(secs), accuracy_1x=acc,
                                parameters=sum(p.numel() for p in model.parameters()))
    # A single variant's log goes to its own directory so that it leaves the others' alone.
    out = os.path.join(ROOT, "models", "longctx-demo" if only is None else name)
    with open(os.path.join(out, "train_log.txt"), "w") as f:
        f.write("\n".join(log_lines) + "\n")
    write_json(os.path.join(out, "training.json"),
               dict(hyperparameters=h, results=summary, transformers=transformers.__version__,
                    torch=torch.__version__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--explore", help="JSON overrides of DEFAULTS; trains, evaluates, writes nothing")
    ap.add_argument("--variants", default="irope,allrope")
    ap.add_argument("--eval-lengths", default="1024,4096,16384")
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--save", help="with --explore: write the models (bf16) to SAVE/<variant>")
    ap.add_argument("--compare", metavar="DUMP", help="compare examples/needle.rs --dump-logits output")
    ap.add_argument("--check-cache", action="store_true", help="the cached reference equals the uncached")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "longctx-demo"))
    ap.add_argument("--context", type=int)
    ap.add_argument("--no-temperature", action="store_true")
    ap.add_argument("--only", choices=[v for v, _, _ in VARIANTS], help="train and write this variant only")
    args = ap.parse_args()
    if args.compare or args.check_cache:
        torch.set_num_threads(1)
        if args.compare:
            compare(args.compare, args.model, args.context, False if args.no_temperature else None)
        else:
            check_cache(args.model, args.context, False if args.no_temperature else None)
        return
    h = dict(DEFAULTS)
    if args.explore is not None:
        over = json.loads(args.explore)
        unknown = set(over) - set(h)
        if unknown:
            sys.exit(f"unknown hyperparameters {unknown}")
        h.update(over)
    torch.set_num_threads(h["threads"])
    torch.use_deterministic_algorithms(True)
    if args.explore is not None:
        explore(h, args.variants.split(","), [int(x) for x in args.eval_lengths.split(",") if x],
                args.eval_samples, args.save)
        return
    final(h, args.only)


if __name__ == "__main__":
    main()
