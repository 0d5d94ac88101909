#!/usr/bin/env python3
"""Train the embedded demo model: a tiny Llama 4 text model that sorts ten digits.

A newcomer without hundreds of gigabytes of weights runs the library on `models/demo/` and checks
the answer at a glance:

    <|begin_of_text|>sort 3 9 1 4 1 5 9 2 6 5 =   →   " 1 1 2 3 4 5 5 6 9 9" then <|eot|>

The model is `Llama4ForCausalLM` from Hugging Face transformers 5.23.0 and exercises every part of
the Llama 4 text architecture on a short sequence (24 tokens):
  - mixture-of-experts feed-forward in every layer: 4 experts, sigmoid top-1 router, shared expert;
  - interleaved RoPE / NoPE layers (NoPE every 2nd layer: layers 1 and 3);
  - chunked attention on the RoPE layers with a chunk of 8 tokens, so the prompt and the answer cross
    two chunk boundaries (only the NoPE layers see the whole sequence);
  - attention temperature tuning on the NoPE layers with floor_scale 8 (steps at positions 7, 15, 23);
  - QK norm on the RoPE layers, llama3-scaled RoPE with interleaved pairs.

Tokenizer (`tokenizer.json`, built with the `tokenizers` library): word-level. A regex pre-tokenizer
splits text into "sort", a digit or "=" with its leading space (" 3", " ="), a bare digit, "=", a
space, a newline, or any other single character (mapped to <unk>, id 12); a Fuse decoder
concatenates tokens back into the exact text. The twelve Llama 4 special tokens are added special
tokens (ids 0-11) and are recognised inside text. There is no post-processor: the prompt contains
<|begin_of_text|> itself.

Training: loss only on the answer tokens and the closing <|eot|>; Adam with warmup and cosine decay.
Evaluation: greedy decoding on held-out inputs (drawn with another seed, removed from the training
stream) after rounding every weight to bf16, exactly the values committed in model.safetensors.

Seeded and run with a fixed number of threads and deterministic algorithms, so rerunning it
reproduces the files. Run from the repository root (7-10 minutes on one CPU core):

    .venv-ref/bin/python tools/train_demo.py

Writes models/demo/: config.json, generation_config.json, model.safetensors (bf16), tokenizer.json,
tokenizer_config.json, heldout.json (200 prompts with their expected answers) and README.md.
"""

import json
import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

import transformers
from transformers import Llama4ForCausalLM, Llama4TextConfig

assert transformers.__version__ == "5.23.0", transformers.__version__

THREADS = 1  # more threads is not faster at this size, and slower on a busy machine
torch.set_num_threads(THREADS)
torch.use_deterministic_algorithms(True)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "demo")

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# The Llama 4 special tokens, with the same strings as the real tokenizer, at small ids.
SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    "<|finetune_right_pad|>",
]
BOS, EOT, PAD = "<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>"
UNK = "<unk>"
DIGITS = [str(d) for d in range(10)]
WORDS = [UNK, "sort"] + [" " + d for d in DIGITS] + [" ="] + DIGITS + ["=", " ", "\n"]
# Alternatives are tried left to right: the longer pieces first, then any single character.
SPLIT = r"sort| ?[0-9=]|\s|."


def build_tokenizer():
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # Already in the vocabulary: this only marks them special (matched in text before splitting,
    # skipped when decoding with skip_special_tokens).
    tok.add_special_tokens(SPECIAL)
    return tok


# ---------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------

N_DIGITS = 10
TRAIN_SEED, HELDOUT_SEED, MODEL_SEED = 1234, 98765, 42
N_HELDOUT = 200


def prompt_text(digits):
    return BOS + "sort" + "".join(" %d" % d for d in digits) + " ="


def answer_text(digits):
    return "".join(" %d" % d for d in sorted(digits))


class Ids:
    """Token ids of the task, read from the tokenizer so the two cannot disagree."""

    def __init__(self, tok):
        self.bos = tok.token_to_id(BOS)
        self.eot = tok.token_to_id(EOT)
        self.pad = tok.token_to_id(PAD)
        self.sort = tok.token_to_id("sort")
        self.eq = tok.token_to_id(" =")
        self.digit = torch.tensor([tok.token_to_id(" %d" % d) for d in range(10)])

    def sequences(self, digits):
        """digits [B, 10] → token ids [B, 24]: BOS sort d×10 " =" sorted×10 EOT."""
        b = digits.shape[0]
        col = lambda v: torch.full((b, 1), v, dtype=torch.long)  # noqa: E731
        return torch.cat([col(self.bos), col(self.sort), self.digit[digits], col(self.eq),
                          self.digit[digits.sort(dim=1).values], col(self.eot)], dim=1)


PROMPT_LEN = 1 + 1 + N_DIGITS + 1  # BOS, "sort", the digits, " ="
ANSWER_LEN = N_DIGITS + 1  # sorted digits, then <|eot|>
SEQ_LEN = PROMPT_LEN + ANSWER_LEN


def heldout_digits():
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    return torch.randint(0, 10, (N_HELDOUT, N_DIGITS), generator=g)


def train_batches(steps, batch, exclude):
    """The whole training stream, drawn once; rows equal to a held-out input are redrawn."""
    g = torch.Generator().manual_seed(TRAIN_SEED)
    data = torch.randint(0, 10, (steps * batch, N_DIGITS), generator=g)
    keys = lambda x: set(map(tuple, x.tolist()))  # noqa: E731
    banned = keys(exclude)
    redrawn = 0
    for i, row in enumerate(data.tolist()):
        while tuple(row) in banned:
            row = torch.randint(0, 10, (N_DIGITS,), generator=g).tolist()
            data[i] = torch.tensor(row)
            redrawn += 1
    assert not (keys(data) & banned)
    return data.view(steps, batch, N_DIGITS), redrawn


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def model_config(tok):
    cfg = Llama4TextConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,  # expert and shared-expert width
        intermediate_size_mlp=256,  # dense MLP width (unused: every layer is MoE)
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        no_rope_layer_interval=2,  # NoPE layers 1 and 3
        attention_chunk_size=8,
        attn_temperature_tuning=True,
        floor_scale=8,
        attn_scale=0.1,
        use_qk_norm=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16),
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOT),
        pad_token_id=tok.token_to_id(PAD),
    )
    cfg._attn_implementation = "eager"
    return cfg


def answer_loss(model, seqs):
    """Cross-entropy on the answer tokens and the closing <|eot|> only."""
    logits = model(input_ids=seqs[:, :-1], use_cache=False).logits
    pred = logits[:, PROMPT_LEN - 1:]  # positions that predict the answer
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), seqs[:, PROMPT_LEN:].reshape(-1))


@torch.no_grad()
def greedy(model, prompts, n_new):
    """Greedy decoding without a cache (full forward each step): [B, P] → [B, n_new]."""
    seqs = prompts
    for _ in range(n_new):
        nxt = model(input_ids=seqs, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seqs = torch.cat([seqs, nxt], dim=1)
    return seqs[:, prompts.shape[1]:]


def exact_match(model, ids, digits):
    seqs = ids.sequences(digits)
    out = greedy(model, seqs[:, :PROMPT_LEN], ANSWER_LEN)
    ok = (out == seqs[:, PROMPT_LEN:]).all(dim=1)
    return int(ok.sum()), ok


def round_to_bf16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

STEPS, BATCH = 1500, 64
LR, MIN_LR_FRAC, WARMUP = 3e-3, 0.05, 100


def lr_at(step):
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, STEPS - WARMUP)
    return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * t)))


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def config_json(cfg):
    """config.json of a text model stored in bf16 (also used by train_longctx_demo.py)."""
    conf = cfg.to_dict()
    # Generic PreTrainedConfig fields that mean nothing for these models, and the run-specific ones.
    for key in ("_attn_implementation", "transformers_version", "_name_or_path", "chunk_size_feed_forward",
                "id2label", "label2id", "is_encoder_decoder", "output_attentions", "output_hidden_states",
                "problem_type", "return_dict"):
        conf.pop(key, None)
    conf["architectures"] = ["Llama4ForCausalLM"]
    conf["torch_dtype"] = "bfloat16"
    conf["dtype"] = "bfloat16"
    return conf


def write_readme(cfg, ids, n_params, correct, example):
    moe = "every layer" if len(cfg.moe_layers) == cfg.num_hidden_layers else f"layers {cfg.moe_layers}"
    nope = [i for i, r in enumerate(cfg.no_rope_layers) if not r]
    rp = cfg.rope_parameters
    text = f"""# Demo model: a tiny Llama 4 that sorts ten digits

A {n_params:,}-parameter `Llama4ForCausalLM` (`model_type: llama4_text`, weights in bf16) trained to
sort ten digits, so that the library can be seen working in one command without real weights:

```
prompt:  {prompt_text(example)}
answer: {answer_text(example)}{EOT}
```

The prompt starts with `{BOS}` written in the text (the tokenizer adds nothing); greedy decoding
stops at `{EOT}` (id {ids.eot}, `eos_token_id` in config.json and generation_config.json).

## Held-out accuracy
**{correct}/{N_HELDOUT}** exact match ({100 * correct / N_HELDOUT:.1f}%) on the inputs in `heldout.json`
(drawn with a seed of their own and excluded from training), greedy decoding in float32 on the bf16
weights of `model.safetensors`, measured with transformers 5.23.0 (eager attention, no cache).
Each entry of `heldout.json` holds the full `prompt` and the expected `answer` (the generated text
before `{EOT}`).

## Architecture (every Llama 4 text feature, at toy size)
| | |
|---|---|
| layers / hidden / heads (q, kv) / head dim | {cfg.num_hidden_layers} / {cfg.hidden_size} / {cfg.num_attention_heads}, {cfg.num_key_value_heads} / {cfg.head_dim} |
| feed-forward | MoE in {moe}: {cfg.num_local_experts} experts of width {cfg.intermediate_size}, sigmoid top-{cfg.num_experts_per_tok} router, shared expert |
| RoPE / NoPE | NoPE layers {nope} (full causal attention, temperature tuning with floor_scale {cfg.floor_scale}, attn_scale {cfg.attn_scale}); the others RoPE ({rp["rope_type"]}, theta {rp["rope_theta"]:g}) with QK norm and chunked attention, chunk {cfg.attention_chunk_size} |
| vocabulary | {cfg.vocab_size} tokens, untied `lm_head` |

A whole example is {SEQ_LEN} tokens, so the chunked layers restart at positions 8 and 16 and the
temperature of the NoPE layers steps up at positions 7, 15 and 23.

## Tokenizer
Word-level (`tokenizer.json`, loads in the `tokenizers` crate): a regex pre-tokenizer splits text into
`sort`, a digit or `=` with its leading space (` 3`, ` =`), or a single character (a bare digit, `=`,
space and newline are in the vocabulary, anything else is `<unk>`); the decoder concatenates.
Special tokens (recognised in text):
{", ".join(f"`{t}` {i}" for i, t in enumerate(SPECIAL))}.

## Reproduce
Seeded, single-threaded, deterministic algorithms; a few minutes on one CPU core:

```sh
.venv-ref/bin/python tools/train_demo.py
```

{STEPS} steps of batch {BATCH}, Adam (lr {LR:g}, {WARMUP} warmup steps, cosine decay to {MIN_LR_FRAC:g}x),
loss on the answer and `{EOT}` only.
"""
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(text)


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = build_tokenizer()
    ids = Ids(tok)

    held = heldout_digits()
    # The tokenizer and the tensor builder must agree on every held-out prompt.
    seqs = ids.sequences(held)
    for row, d in zip(seqs.tolist(), held.tolist()):
        enc = tok.encode(prompt_text(d) + answer_text(d) + EOT).ids
        assert enc == row, (enc, row)

    cfg = model_config(tok)
    torch.manual_seed(MODEL_SEED)
    model = Llama4ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")

    data, redrawn = train_batches(STEPS, BATCH, held)
    print(f"training inputs: {STEPS * BATCH} ({redrawn} redrawn to avoid the held-out set)")

    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.98))
    model.train()
    t0 = time.time()
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = answer_loss(model, ids.sequences(data[step]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {time.time() - t0:6.1f}s",
                  flush=True)
    train_s = time.time() - t0

    model.eval()
    correct_f32, _ = exact_match(model, ids, held)
    round_to_bf16(model)
    correct, ok = exact_match(model, ids, held)
    print(f"held-out exact match: f32 {correct_f32}/{N_HELDOUT}, bf16 {correct}/{N_HELDOUT}")

    # --- write models/demo ---
    tok.save(os.path.join(OUT, "tokenizer.json"))
    write_json(os.path.join(OUT, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOT, "pad_token": PAD, "unk_token": UNK,
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": cfg.max_position_embeddings,
    })

    write_json(os.path.join(OUT, "config.json"), config_json(cfg))
    write_json(os.path.join(OUT, "generation_config.json"), {
        "bos_token_id": ids.bos, "eos_token_id": ids.eot, "pad_token_id": ids.pad,
        "do_sample": False, "max_new_tokens": ANSWER_LEN,
    })

    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})

    write_json(os.path.join(OUT, "heldout.json"), [
        {"prompt": prompt_text(d), "answer": answer_text(d)} for d in held.tolist()
    ])

    example = held[0].tolist()
    print("example:", repr(prompt_text(example)), "->", repr(answer_text(example)))
    for i in (~ok).nonzero().flatten().tolist()[:10]:
        got = greedy(model, seqs[i:i + 1, :PROMPT_LEN], ANSWER_LEN)[0].tolist()
        print(f"  wrong: {prompt_text(held[i].tolist())!r} -> {tok.decode(got, skip_special_tokens=False)!r}")
    write_readme(cfg, ids, n_params, correct, example)
    print(f"training: {STEPS} steps x batch {BATCH} in {train_s:.0f}s")
    return dict(n_params=n_params, correct=correct, train_s=train_s, cfg=cfg, ids=ids, tok=tok)


if __name__ == "__main__":
    main()
