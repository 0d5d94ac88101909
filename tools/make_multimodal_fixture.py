#!/usr/bin/env python3
"""Reference fixture for images in the prompt (early fusion), computed by transformers 5.23.0 in
float32 with torchvision doing the image resize.

Writes fixtures/models/multimodal/: a tiny multimodal Llama 4 checkpoint in Hugging Face layout
(`config.json` with `model_type: llama4`, `model.safetensors` with `language_model.*`,
`vision_model.*`, `multi_modal_projector.*`), a word-level `tokenizer.json` holding the Llama 4
special tokens at small ids, `preprocessor_config.json` with 84-pixel tiles, two PNG images (one
non-square that needs 2×3 tiles, one smaller than a tile) and:

  reference.json         the prompt text (two `<|image|>` placeholders), the image files in order,
                         tokens per tile and each image's aspect ratio
  reference.safetensors  `input_ids` (the prompt expanded by `Llama4Processor`), `image_features`
                         (projected vision tokens, [patches, H]), `generated_ids` and `step_logits`
                         (greedy through `Llama4ForConditionalGeneration` with its cache),
                         `logits_full` (one forward over prompt + generated ids, no cache)

Every weight is randomised (transformers initialises norms to one and some tensors to zero, which
would hide bugs). Text shapes follow tools/make_fixtures.py (hidden 64, chunk 8, floor_scale 4);
the vision tower is the one of tools/make_vision_fixtures.py (hidden 32, 2 layers, 84-pixel tiles
of 14-pixel patches → 9 tokens per tile). As there, the reference resize depends on the CPU
(uint8 fixed point on AVX2/AVX512): the script refuses to run elsewhere.

Run from the repository root:  .venv-ref/bin/python tools/make_multimodal_fixture.py
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import randomise, text_config, write_json  # noqa: E402  (seeds, shapes, helpers)
from make_vision_fixtures import gradient, noise  # noqa: E402  (synthetic images)

import transformers  # noqa: E402
from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4VisionConfig  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor  # noqa: E402
from transformers.models.llama4.processing_llama4 import Llama4Processor  # noqa: E402

assert transformers.__version__ == "5.23.0", transformers.__version__
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "models", "multimodal")
TILE = 84
MAX_PATCHES = 6
NEW_TOKENS = 8
SEED = 5001

# The Llama 4 special tokens with the real tokenizer's strings, at small ids.
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
WORDS = [UNK, "\n", " ", ".", ",", "?", ":"] + [
    w
    for base in ["look", "at", "this", "and", "that", "picture", "image", "describe", "compare", "the", "two",
                 "what", "is", "in", "a", "cat", "dog", "red", "blue", "user", "assistant", "both", "then"]
    for w in (base, " " + base)
]
# A word with its leading space, else a single character.
SPLIT = r" ?[A-Za-z]+|\s|."
PROMPT = "look at this picture<|image|> and that image<|image|>, then compare the two."


def build_tokenizer():
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    # As the real Llama 4 tokenizer: `tokenizer(text)` starts with <|begin_of_text|>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok, vocab


def make_images():
    rng = np.random.default_rng(4321)
    images = {
        # 150×230: canvas 2×3 tiles of 84 (+ the global tile), padded right and bottom.
        "wide.png": gradient(150, 230, rng),
        # Smaller than a tile: one tile, no global tile.
        "small.png": noise(40, 60, rng),
    }
    for name, arr in images.items():
        Image.fromarray(arr).save(os.path.join(OUT, name), optimize=True)
    return list(images)


def greedy_with_cache(model, inputs, n):
    """One prefill with the images, then one token per step through transformers' own cache."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        logits = [out.logits[0, -1]]
        ids = [int(logits[-1].argmax())]
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
            ids.append(int(logits[-1].argmax()))
    return ids, torch.stack(logits)


def main():
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        sys.exit(f"CPU capability {cap}: torch would resize in float here, unlike the reference elsewhere")
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)

    tok, vocab = build_tokenizer()
    tok.save(os.path.join(OUT, "tokenizer.json"))
    write_json(os.path.join(OUT, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOT, "pad_token": PAD, "unk_token": UNK,
        "model_max_length": 4096,
    })
    image_files = make_images()

    text = text_config(vocab_size=len(vocab), num_local_experts=4, bos_token_id=vocab[BOS], eos_token_id=vocab[EOT],
                       pad_token_id=vocab[PAD])
    assert len(vocab) <= text.vocab_size
    vision = Llama4VisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=TILE,
        patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=48, projector_output_dim=48,
        vision_output_dim=48, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cfg = Llama4Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                       boi_token_index=vocab["<|image_start|>"], eoi_token_index=vocab["<|image_end|>"],
                       image_token_index=vocab["<|patch|>"], tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = Llama4ForConditionalGeneration(cfg).eval()
    randomise(model, seed=SEED)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert "language_model.lm_head.weight" in tensors and "multi_modal_projector.linear_1.weight" in tensors
    save_file(tensors, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})

    config = cfg.to_dict()
    config["architectures"] = ["Llama4ForConditionalGeneration"]
    config["torch_dtype"] = "float32"
    for c in (config, config["text_config"], config["vision_config"]):
        c.pop("_attn_implementation", None)
    write_json(os.path.join(OUT, "config.json"), config)
    write_json(os.path.join(OUT, "generation_config.json"), {"bos_token_id": vocab[BOS], "eos_token_id": [vocab[EOT]],
                                                            "pad_token_id": vocab[PAD]})

    proc_settings = {
        "image_processor_type": "Llama4ImageProcessor", "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "rescale_factor": 1 / 255, "resample": 2, "resize_to_max_canvas": False,
        "size": {"height": TILE, "width": TILE}, "max_patches": MAX_PATCHES,
    }
    write_json(os.path.join(OUT, "preprocessor_config.json"), proc_settings)
    image_processor = Llama4ImageProcessor(**{k: v for k, v in proc_settings.items() if k != "image_processor_type"})
    processor = Llama4Processor(
        image_processor=image_processor,
        tokenizer=PreTrainedTokenizerFast(tokenizer_file=os.path.join(OUT, "tokenizer.json"), bos_token=BOS,
                                          eos_token=EOT, pad_token=PAD, unk_token=UNK),
        patch_size=14, pixel_shuffle_ratio=0.5,
    )

    images = []
    for name in image_files:
        with Image.open(os.path.join(OUT, name)) as im:
            im.load()
            images.append(im.copy())
    inputs = processor(images=images, text=PROMPT, return_tensors="pt")
    inputs.pop("attention_mask", None)
    # The processor returns bf16 tiles; the f32 model takes them as f32 (every bf16 value is exact).
    inputs["pixel_values"] = inputs["pixel_values"].float()
    input_ids = inputs["input_ids"]
    aspect = image_processor(images=images, return_tensors="pt")["aspect_ratios"].tolist()
    per_tile = (TILE // 14) ** 2 // 4
    n_patch = int((input_ids == cfg.image_token_index).sum())
    tiles = inputs["pixel_values"].shape[0]
    assert n_patch == tiles * per_tile, (n_patch, tiles, per_tile)
    assert aspect[0] != [1, 1] and aspect[0][0] != aspect[0][1] and aspect[1] == [1, 1], aspect
    assert int((input_ids == vocab[UNK]).sum()) == 0, "the prompt has words outside the vocabulary"

    with torch.no_grad():
        feats = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).last_hidden_state
        image_features = model.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))

    prompt_len = input_ids.shape[1]
    generated, step_logits = greedy_with_cache(model, dict(inputs), NEW_TOKENS)
    # A generated <|patch|> would count as a placeholder in the full forward below; the seed is
    # chosen so that this random model does not produce one.
    assert cfg.image_token_index not in generated, f"seed {SEED} generates <|patch|>: pick another"
    full = torch.cat([input_ids[0], torch.tensor(generated)]).unsqueeze(0)
    with torch.no_grad():
        logits_full = model(input_ids=full, pixel_values=inputs["pixel_values"], use_cache=False).logits[0]
    # Cross-check transformers against itself: cached steps vs one full forward.
    rows = logits_full[prompt_len - 1: prompt_len - 1 + NEW_TOKENS]
    drift = ((rows - step_logits).abs().max() / rows.abs().max()).item()
    assert drift < 1e-5, f"transformers' cached and uncached logits differ by {drift}"
    assert torch.equal(rows.argmax(-1), torch.tensor(generated))
    # The images matter: the same ids with every patch embedding left as the <|patch|> embedding
    # give other logits.
    with torch.no_grad():
        text_only = model(input_ids=full, use_cache=False).logits[0]
    effect = ((text_only - logits_full).abs().max() / logits_full.abs().max()).item()
    assert effect > 1e-2, effect

    save_file({
        "input_ids": input_ids[0].to(torch.int64).contiguous(),
        "image_features": image_features.float().contiguous(),
        "generated_ids": torch.tensor(generated, dtype=torch.int64),
        "step_logits": step_logits.float().contiguous(),
        "logits_full": logits_full.float().contiguous(),
    }, os.path.join(OUT, "reference.safetensors"))
    write_json(os.path.join(OUT, "reference.json"), {
        "prompt": PROMPT,
        "images": image_files,
        "aspect_ratios": aspect,
        "tokens_per_tile": per_tile,
        "new_tokens": NEW_TOKENS,
    })
    print(f"prompt {prompt_len} tokens ({n_patch} patches, {tiles} tiles, aspect {aspect}), "
          f"cache drift {drift:.2e}, image effect {effect:.2e}, ids {generated}")


if __name__ == "__main__":
    main()
