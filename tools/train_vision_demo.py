#!/usr/bin/env python3
"""Train the multimodal demo model: a tiny Llama 4 that names the coloured shape in a picture.

Like models/demo (tools/train_demo.py) but through the whole image path: a newcomer runs

    <|begin_of_text|>what is this?<|image|> =   + a picture   →   " red circle" then <|eot|>

Images are synthetic, drawn with PIL: one shape (circle, square, triangle) in one colour (red,
green, blue, yellow), 12 classes, of random size and position, on a random background (light or
dark solid with a faint tint, or blocky grey noise). Widths and heights are drawn independently in
60-200 px, so with 56-pixel tiles and at most 4 tiles the processor picks canvases of 1×2 up to
2×2 or 1×4 tiles (plus the global tile): tiling is exercised on every image.

The model is `Llama4ForConditionalGeneration` from Hugging Face transformers 5.23.0:
  - text: hidden 64, 4 layers (layers 1 and 3 NoPE), MoE in every layer (4 experts, top-1, shared expert),
    chunked attention (chunk 8) with QK norm on the RoPE layer, temperature tuning on the NoPE one;
  - vision: hidden 64, 2 layers, 56-pixel tiles of 14-pixel patches, pixel shuffle 0.5 → 4 image
    tokens per tile, projector to the text width.
Pixel values and the expanded prompt (<|image|> → <|image_start|> tiles with separators
<|image_end|>) come from transformers' `Llama4Processor` / `Llama4ImageProcessor`, exactly what
our Rust code reproduces.

Tokenizer (`tokenizer.json`): word-level, a word with its leading space (" red"), " =", or a single
character; the twelve Llama 4 special tokens are ids 0-11 and recognised in text. No post-processor:
the prompt writes <|begin_of_text|> itself.

Training: loss on the answer tokens and <|eot|> only; Adam with warmup and cosine decay; every
training image is fresh (drawn from its own seed). Evaluation: greedy decoding after rounding every
weight to bf16 (the values written to model.safetensors) on 200 held-out images from another seed.

Seeded, single-threaded, deterministic algorithms. Run from the repository root (about 10 minutes
on one core):

    .venv-ref/bin/python tools/train_vision_demo.py

Writes models/vision-demo/: config.json, generation_config.json, model.safetensors (bf16),
tokenizer.json, tokenizer_config.json, preprocessor_config.json, heldout/NNN.png with heldout.json
(the first N_SAVED held-out images, their prompt, expected answer and the answer transformers gave)
and README.md.
"""

import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

import transformers
from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig, Llama4VisionConfig
from transformers import PreTrainedTokenizerFast
from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor
from transformers.models.llama4.processing_llama4 import Llama4Processor

assert transformers.__version__ == "5.23.0", transformers.__version__

THREADS = 1
torch.set_num_threads(THREADS)
torch.use_deterministic_algorithms(True)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "vision-demo")

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

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
BOS, EOT, PAD, UNK = "<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>", "<unk>"
COLOURS = {  # name → (low, high) per channel of the drawn colour
    "red": ((190, 255), (0, 60), (0, 60)),
    "green": ((0, 60), (170, 255), (0, 60)),
    "blue": ((0, 60), (0, 80), (190, 255)),
    "yellow": ((200, 255), (200, 255), (0, 50)),
}
SHAPES = ["circle", "square", "triangle"]
CLASSES = [(c, s) for c in COLOURS for s in SHAPES]
WORDS = [UNK, "\n", " ", "?", "=", " ="] + [
    w for base in ["what", "is", "this", "a", "the", "it", "colour", "shape"] + list(COLOURS) + SHAPES
    for w in (base, " " + base)
]
# A word with its leading space, " =", else a single character.
SPLIT = r" ?[A-Za-z]+| ?=|\s|."
PROMPT = BOS + "what is this?<|image|> ="


def answer_text(colour, shape):
    return f" {colour} {shape}"


def build_tokenizer():
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    return tok


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

TILE, MAX_PATCHES, PATCH = 56, 4, 14
MIN_SIDE, MAX_SIDE = 60, 200
TRAIN_SEED, HELDOUT_SEED, MODEL_SEED = 1234, 98765, 42
N_HELDOUT, N_SAVED = 200, 200


def background(rng, w, h):
    kind = rng.integers(3)
    if kind < 2:  # light or dark solid, grey with a faint tint so it never reads as a shape colour
        level = rng.integers(170, 256) if kind == 0 else rng.integers(0, 80)
        rgb = np.clip(level + rng.integers(-20, 21, 3), 0, 255)
        return np.broadcast_to(rgb.astype(np.uint8), (h, w, 3)).copy()
    # Blocky grey noise (blocks of 2-8 px compress well in PNG).
    block = int(rng.integers(2, 9))
    small = rng.integers(0, 256, (h // block + 1, w // block + 1, 1))
    tint = rng.integers(-15, 16, (1, 1, 3))
    big = np.repeat(np.repeat(small, block, 0), block, 1)[:h, :w]
    return np.clip(big + tint, 0, 255).astype(np.uint8)


def draw_image(rng):
    """A random picture and its class index."""
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    label = int(rng.integers(len(CLASSES)))
    colour, shape = CLASSES[label]
    img = Image.fromarray(background(rng, w, h))
    fill = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in COLOURS[colour])
    side = int(min(w, h) * rng.uniform(0.5, 0.9))
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    box = [x0, y0, x0 + side - 1, y0 + side - 1]
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x0 + side / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
    return img, label


# ---------------------------------------------------------------------------------------------
# Model and processor
# ---------------------------------------------------------------------------------------------

TEXT_LAYERS, CHUNK = 4, 8

PROC_SETTINGS = {
    "image_processor_type": "Llama4ImageProcessor", "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    "rescale_factor": 1 / 255, "resample": 2, "resize_to_max_canvas": False,
    "size": {"height": TILE, "width": TILE}, "max_patches": MAX_PATCHES,
}


def model_config(vocab, text_layers=TEXT_LAYERS, chunk=CHUNK):
    text = Llama4TextConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        intermediate_size_mlp=256,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        no_rope_layer_interval=2,  # NoPE layers 1, 3, ...
        attention_chunk_size=chunk,
        attn_temperature_tuning=True,
        floor_scale=8,
        attn_scale=0.1,
        use_qk_norm=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16),
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOT],
        pad_token_id=vocab[PAD],
    )
    vision = Llama4VisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256,  # also the pixel-shuffled width: 4 × hidden
        image_size=TILE, patch_size=PATCH, pixel_shuffle_ratio=0.5, projector_input_dim=64,
        projector_output_dim=64, vision_output_dim=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cfg = Llama4Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                       boi_token_index=vocab["<|image_start|>"], eoi_token_index=vocab["<|image_end|>"],
                       image_token_index=vocab["<|patch|>"], tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    return cfg


def build_processor(tokenizer_file):
    image_processor = Llama4ImageProcessor(**{k: v for k, v in PROC_SETTINGS.items() if k != "image_processor_type"})
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, bos_token=BOS, eos_token=EOT, pad_token=PAD,
                                        unk_token=UNK)
    return Llama4Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                           pixel_shuffle_ratio=0.5)


class Encoder:
    """Image + prompt → (expanded prompt ids, pixel values) with the transformers processor."""

    def __init__(self, processor, tok):
        self.processor = processor
        self.answers = [tok.encode(answer_text(c, s) + EOT).ids for c, s in CLASSES]
        assert all(len(a) == 3 for a in self.answers)

    def __call__(self, img):
        inputs = self.processor(images=[img], text=PROMPT, return_tensors="pt")
        return inputs["input_ids"][0], inputs["pixel_values"].float()

    def batch(self, items, pad_id):
        """[(img, label)] → right-padded ids [B, T], pixel values [tiles, 3, TILE, TILE], and the
        positions whose logits predict the answer with their targets."""
        encoded = [self(img) for img, _ in items]
        seqs = [torch.cat([ids, torch.tensor(self.answers[label])]) for (ids, _), (_, label) in zip(encoded, items)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, ((prompt, _), seq) in enumerate(zip(encoded, seqs)):
            ids[b, :len(seq)] = seq
            for k in range(len(seq) - len(prompt)):
                rows.append(b)
                cols.append(len(prompt) - 1 + k)
                targets.append(int(seq[len(prompt) + k]))
        pixels = torch.cat([p for _, p in encoded])
        return ids, pixels, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)


def answer_loss(model, enc, items, pad_id):
    # Right padding and causal attention: the padding only follows the positions that count.
    ids, pixels, rows, cols, targets = enc.batch(items, pad_id)
    logits = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
    return F.cross_entropy(logits[rows, cols], targets)


@torch.no_grad()
def greedy(model, ids, pixels, n_new):
    """Greedy decoding without a cache (full forward each step): ids [P] → the n_new next ids."""
    seq = ids.unsqueeze(0)
    for _ in range(n_new):
        nxt = model(input_ids=seq, pixel_values=pixels, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[0, len(ids):].tolist()


def evaluate(model, enc, tok, held):
    """Exact match (answer then <|eot|>) on the held-out images; returns (correct, decoded outputs)."""
    outputs, correct = [], 0
    for img, label in held:
        ids, pixels = enc(img)
        got = greedy(model, ids, pixels, 3)
        ok = got == enc.answers[label]
        # The text before <|eot|> (the whole output when there is none).
        eot = tok.token_to_id(EOT)
        outputs.append((tok.decode(got[:got.index(eot)] if eot in got else got, skip_special_tokens=False), ok))
        correct += int(ok)
    return correct, outputs


def round_to_bf16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

STEPS, BATCH = 6000, 16
LR, MIN_LR_FRAC, WARMUP = 1.2e-3, 0.05, 100


def lr_at(step):
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, STEPS - WARMUP)
    return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * t)))


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def write_readme(cfg, vocab, n_params, correct, saved_correct, train_s, example):
    t, v = cfg.text_config, cfg.vision_config
    nope = [i for i, r in enumerate(t.no_rope_layers) if not r]
    text = f"""# Multimodal demo model: a tiny Llama 4 that names the coloured shape in a picture

A {n_params:,}-parameter `Llama4ForConditionalGeneration` (`model_type: llama4`, weights in bf16)
trained on synthetic pictures: one shape (circle, square, triangle) in one colour (red, green, blue,
yellow) on a light, dark or noisy background, 60-200 pixels wide and tall, so that the image path
(processor, tiling, vision tower, projector, early fusion) can be seen working in one command:

```
cargo run --release --example generate -- --model models/vision-demo \\
    --prompt "{PROMPT}" --image models/vision-demo/{example["image"]}
```

answers `{example["answer"]}` then `{EOT}` (id {vocab[EOT]}, the stop id). The prompt writes `{BOS}`
itself (the tokenizer adds nothing); the processor expands `<|image|>` into the tiles' tokens.

## Held-out accuracy
**{correct}/{N_HELDOUT}** exact match ({100 * correct / N_HELDOUT:.1f}%) on 200 held-out images drawn
with a seed of their own, greedy decoding in float32 on the bf16 weights of `model.safetensors`,
measured with transformers 5.23.0 (eager attention, no cache). The first {N_SAVED} of them are in
`heldout/` and `heldout.json` (`image`, `prompt`, expected `answer`, `python_output`, what
transformers answered before `{EOT}`, and `python_correct`, the exact match including `{EOT}`): {saved_correct}/{N_SAVED} there. `crates/llama4-model/tests/vision_demo.rs`
runs them through the Rust path (`cargo test --release -p llama4-model --test vision_demo`).

## Architecture
| | |
|---|---|
| text | {t.num_hidden_layers} layers, hidden {t.hidden_size}, heads {t.num_attention_heads} (kv {t.num_key_value_heads}) of {t.head_dim}; MoE in every layer ({t.num_local_experts} experts of width {t.intermediate_size}, top-{t.num_experts_per_tok}, shared expert); NoPE layers {nope}, the others RoPE with QK norm and chunked attention (chunk {t.attention_chunk_size}); vocabulary {t.vocab_size} |
| vision | {v.num_hidden_layers} layers, hidden {v.hidden_size}, {v.num_attention_heads} heads, MLP {v.intermediate_size}; {TILE}-pixel tiles of {PATCH}-pixel patches, pixel shuffle {v.pixel_shuffle_ratio} → {(TILE // PATCH) ** 2 // 4} tokens per tile; projector to {t.hidden_size} |
| processor | `preprocessor_config.json`: tiles of {TILE}, at most {MAX_PATCHES} tiles (+ the global tile when there are several), no upscaling to the largest canvas |

## Reproduce
Seeded, single-threaded, deterministic algorithms (training took {train_s:.0f} s on one core):

```sh
.venv-ref/bin/python tools/train_vision_demo.py
```

{STEPS} steps of batch {BATCH} fresh images, Adam (lr {LR:g}, {WARMUP} warmup steps, cosine decay to
{MIN_LR_FRAC:g}x), loss on the answer and `{EOT}` only.
"""
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(text)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(os.path.join(OUT, "heldout"))
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    tok_file = os.path.join(OUT, "tokenizer.json")
    tok.save(tok_file)
    enc = Encoder(build_processor(tok_file), tok)

    held_rng = np.random.default_rng(HELDOUT_SEED)
    held = [draw_image(held_rng) for _ in range(N_HELDOUT)]
    ids0, pix0 = enc(held[0][0])
    assert int((ids0 == vocab[UNK]).sum()) == 0
    print(f"example prompt: {len(ids0)} tokens, {pix0.shape[0]} tiles")

    cfg = model_config(vocab)
    torch.manual_seed(MODEL_SEED)
    model = Llama4ForConditionalGeneration(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")

    train_rng = np.random.default_rng(TRAIN_SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.98))
    model.train()
    t0 = time.time()
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        items = [draw_image(train_rng) for _ in range(BATCH)]
        loss = answer_loss(model, enc, items, vocab[PAD])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {time.time() - t0:6.1f}s",
                  flush=True)
    train_s = time.time() - t0

    model.eval()
    correct_f32, _ = evaluate(model, enc, tok, held)
    round_to_bf16(model)
    correct, outputs = evaluate(model, enc, tok, held)
    print(f"held-out exact match: f32 {correct_f32}/{N_HELDOUT}, bf16 {correct}/{N_HELDOUT}")

    # --- write models/vision-demo ---
    write_json(os.path.join(OUT, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOT, "pad_token": PAD, "unk_token": UNK,
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 256,
    })
    write_json(os.path.join(OUT, "preprocessor_config.json"), PROC_SETTINGS)
    config = cfg.to_dict()
    for c in (config, config["text_config"], config["vision_config"]):
        for key in ("_attn_implementation", "transformers_version", "_name_or_path"):
            c.pop(key, None)
    config["architectures"] = ["Llama4ForConditionalGeneration"]
    config["torch_dtype"] = "bfloat16"
    config["dtype"] = "bfloat16"
    write_json(os.path.join(OUT, "config.json"), config)
    write_json(os.path.join(OUT, "generation_config.json"), {
        "bos_token_id": vocab[BOS], "eos_token_id": [vocab[EOT]], "pad_token_id": vocab[PAD],
        "do_sample": False, "max_new_tokens": 3,
    })
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})

    entries, saved_correct = [], 0
    for i, ((img, label), (out, ok)) in enumerate(zip(held[:N_SAVED], outputs)):
        name = f"heldout/{i:03d}.png"
        img.save(os.path.join(OUT, name), optimize=True)
        with Image.open(os.path.join(OUT, name)) as back:  # PNG is lossless: the same pixels
            assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img))
        entries.append({"image": name, "prompt": PROMPT, "answer": answer_text(*CLASSES[label]),
                        "python_output": out, "python_correct": ok})
        saved_correct += int(ok)
    write_json(os.path.join(OUT, "heldout.json"), entries)
    for (img, label), (out, ok) in zip(held, outputs):
        if not ok:
            print(f"  wrong: {img.size} {answer_text(*CLASSES[label])!r} -> {out!r}")
    # The README shows a picture the model gets right.
    write_readme(cfg, vocab, n_params, correct, saved_correct, train_s, next(e for e in entries if e["python_correct"]))
    print(f"saved held-out images: {saved_correct}/{N_SAVED}; training: {STEPS} steps x batch {BATCH} "
          f"in {train_s:.0f}s")


if __name__ == "__main__":
    main()
