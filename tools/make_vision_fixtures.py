#!/usr/bin/env python3
"""Reference fixtures for the `vision-encoder` crate, computed by transformers 5.23.0 (float32) with
torchvision 0.29.2 doing the image resize.

Writes fixtures/vision/:
  images/*.png, *.jpg           synthetic images (noise, gradients, grey, RGBA), seeded
  processor_S/                  an image-processor config with S-pixel tiles + reference.safetensors:
                                per image `NAME.pixel_values` [N, 3, S, S] (bf16, exactly what the
                                reference returns) and `NAME.aspect_ratio` [2] (int64)
  prompts.json                  the prompt layout for a few aspect ratios
  bf16_lut.safetensors          rescale+normalise of every uint8 value (the reference's bf16 path)
  model/                        a tiny random Llama 4 vision tower + projector (HF names and
                                config.json) and reference.safetensors with input tiles, the vision
                                model output and the projector output

The reference resize depends on the CPU: torch resizes uint8 natively (fixed-point weights, as PIL)
when `torch.backends.cpu.get_cpu_capability()` is AVX2/AVX512, otherwise in float. These fixtures
were made on an AVX512 machine; the script refuses to run elsewhere.

Run from the repository root:  .venv-ref/bin/python tools/make_vision_fixtures.py
Timing of transformers' vision tower for the bench note:  ... make_vision_fixtures.py --bench
"""

import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import transformers
from transformers import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor
from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

assert transformers.__version__ == "5.23.0", transformers.__version__
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "vision")
IMAGES = os.path.join(ROOT, "images")


def randomise(module, seed):
    """Every parameter drawn afresh (transformers initialises norms to one, which would hide bugs):
    linears ~ N(0, 1/fan_in), norm weights in [0.5, 1.5], other 1-D tensors and embeddings ~ N(0, 1)
    (biases scaled by 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in name and name.endswith("weight"):
                v = 0.5 + torch.rand(p.shape, generator=g)
            elif p.dim() == 1 or "embedding" in name:
                v = torch.randn(p.shape, generator=g)
                if "bias" in name:
                    v = v * 0.1
            else:
                v = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
            p.copy_(v)


# ---------------------------------------------------------------------------------------------
# Images


def gradient(h, w, rng, noise_box=True):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
    img = np.stack([r, g, b], -1)
    if noise_box:
        # A patch of noise: sharp edges are where resize rounding shows.
        bh, bw = max(h // 3, 1), max(w // 3, 1)
        y0, x0 = h // 3, w // 3
        img[y0 : y0 + bh, x0 : x0 + bw] = rng.integers(0, 256, (bh, bw, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def noise(h, w, rng):
    return rng.integers(0, 256, (h, w, 3)).astype(np.uint8)


def make_images():
    """(name, file) pairs; every file written here, seeded."""
    rng = np.random.default_rng(1234)
    os.makedirs(IMAGES, exist_ok=True)
    out = []

    def save(name, arr, mode=None, ext="png"):
        path = os.path.join(IMAGES, f"{name}.{ext}")
        im = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
        if ext == "jpg":
            im.save(path, quality=90)
        else:
            im.save(path, optimize=True)
        out.append((name, path))

    save("small_noise", noise(30, 40, rng))  # smaller than a tile: upscaled to one tile
    save("exact_tile", noise(56, 56, rng))  # exactly one tile: no resize at all
    save("wide", gradient(60, 180, rng))  # 3:1
    save("tall", gradient(180, 60, rng))  # 1:3
    save("large", gradient(500, 380, rng))  # more than 16 tiles' worth: downscaled
    save("odd_noise", noise(97, 131, rng))  # odd sizes, canvas with padding on both sides
    save("one_pixel", noise(1, 1, rng))
    save("thin_row", gradient(3, 250, rng, noise_box=False))
    grey = gradient(70, 50, rng)[..., 0]
    save("grey", grey, "L")
    rgba = np.concatenate([gradient(64, 90, rng), np.zeros((64, 90, 1), np.uint8)], -1)
    rgba[..., 3] = rng.integers(0, 256, (64, 90))
    rgba[:8, :, 3] = 0  # fully transparent rows
    rgba[8:16, :, 3] = 255  # fully opaque rows
    save("rgba", rgba, "RGBA")
    save("photo_like", gradient(120, 160, rng), ext="jpg")
    return out


def processor_fixtures(images):
    cases = [
        # (directory, config file name, config dict, image names)
        (
            "processor_56",
            "preprocessor_config.json",
            {"size": {"height": 56, "width": 56}, "max_patches": 16},
            [n for n, _ in images],
        ),
        (
            "processor_28_max4",
            "processor_config.json",
            # transformers 5 writes the image processor's settings nested in processor_config.json
            {"image_processor": {"size": {"height": 28, "width": 28}, "max_patches": 4}},
            ["small_noise", "wide", "tall", "large", "odd_noise"],
        ),
        (
            "processor_336",
            "preprocessor_config.json",
            {"size": {"height": 336, "width": 336}, "max_patches": 16},
            ["photo_336"],
        ),
    ]
    rng = np.random.default_rng(99)
    path336 = os.path.join(IMAGES, "photo_336.png")
    Image.fromarray(gradient(250, 300, rng)).save(path336, optimize=True)
    paths = dict(images)
    paths["photo_336"] = path336

    for directory, fname, cfg, names in cases:
        d = os.path.join(ROOT, directory)
        os.makedirs(d, exist_ok=True)
        full = {
            "image_processor_type": "Llama4ImageProcessor",
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "rescale_factor": 1 / 255,
            "resample": 2,
            "resize_to_max_canvas": False,
        }
        inner = cfg.get("image_processor", cfg)
        full.update(inner)
        written = {"image_processor": full} if "image_processor" in cfg else full
        with open(os.path.join(d, fname), "w") as f:
            json.dump(written, f, indent=2)
        proc = Llama4ImageProcessor(**{k: v for k, v in full.items() if k != "image_processor_type"})
        tensors = {}
        for name in names:
            with Image.open(paths[name]) as im:
                im.load()
                out = proc(images=im, return_tensors="pt")
            pv = out["pixel_values"]
            assert pv.dtype == torch.bfloat16, pv.dtype
            tensors[f"{name}.pixel_values"] = pv.contiguous()
            tensors[f"{name}.aspect_ratio"] = out["aspect_ratios"].reshape(-1).to(torch.int64).contiguous()
            print(f"{directory}/{name}: {tuple(pv.shape)} aspect {out['aspect_ratios'].tolist()}")
        save_file(tensors, os.path.join(d, "reference.safetensors"))


def prompt_layouts():
    """Llama4Processor._prompt_split_image for a few aspect ratios (it does not touch `self`)."""
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    cases = [[1, 1], [1, 2], [2, 1], [2, 3], [4, 4]]
    out = [{"aspect_ratio": c, "tokens_per_tile": 3, "text": Llama4Processor._prompt_split_image(None, c, 3)}
           for c in cases]
    with open(os.path.join(ROOT, "prompts.json"), "w") as f:
        json.dump(out, f, indent=1)


def bf16_lut():
    proc = Llama4ImageProcessor()
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 256).expand(3, 1, 256).contiguous()
    y = proc.rescale_and_normalize(x, True, 1 / 255, True, [0.5] * 3, [0.5] * 3)
    assert y.dtype == torch.bfloat16
    save_file({"lut": y[0, 0].contiguous()}, os.path.join(ROOT, "bf16_lut.safetensors"))


# ---------------------------------------------------------------------------------------------
# Vision tower + projector


def tiny_config():
    vision = Llama4VisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,  # = hidden / ratio², the adapter's fc1 input
        image_size=84,  # 6×6 patches per tile → 3×3 tokens after pixel shuffle
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        projector_input_dim=48,
        projector_output_dim=48,
        vision_output_dim=48,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    text = Llama4TextConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, vocab_size=256, intermediate_size=32, intermediate_size_mlp=64)
    return Llama4Config(vision_config=vision.to_dict(), text_config=text.to_dict())


def model_fixtures():
    cfg = tiny_config()
    d = os.path.join(ROOT, "model")
    os.makedirs(d, exist_ok=True)
    vision = Llama4VisionModel(cfg.vision_config).eval()
    projector = Llama4MultiModalProjector(cfg).eval()
    randomise(vision, 7)
    randomise(projector, 8)
    weights = {}
    for name, t in vision.state_dict().items():
        weights["vision_model." + name] = t.detach().clone().contiguous()
    for name, t in projector.state_dict().items():
        weights["multi_modal_projector." + name] = t.detach().clone().contiguous()
    save_file(weights, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, default=str)

    g = torch.Generator().manual_seed(11)
    s = cfg.vision_config.image_size
    tiles = (torch.rand(3, 3, s, s, generator=g) * 2 - 1).to(torch.bfloat16).float()
    with torch.no_grad():
        out = vision(tiles).last_hidden_state
        proj = projector(out.reshape(-1, out.shape[-1]))
    print(f"model: tiles {tuple(tiles.shape)} -> vision {tuple(out.shape)} -> projector {tuple(proj.shape)}")
    save_file(
        {"tiles": tiles.contiguous(), "vision_output": out.contiguous(), "projector_output": proj.contiguous()},
        os.path.join(d, "reference.safetensors"),
    )


# ---------------------------------------------------------------------------------------------
# Timing for the bench note (not a fixture)


def bench():
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    layers = int(os.environ.get("LAYERS", "2"))
    vision = Llama4VisionConfig(
        hidden_size=1408, num_hidden_layers=layers, num_attention_heads=16, intermediate_size=5632,
        image_size=336, patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=4096,
        projector_output_dim=4096, vision_output_dim=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = Llama4VisionModel(vision).eval()
    x = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    best, med = min(times), sorted(times)[len(times) // 2]
    print(f"transformers Llama4VisionModel, width 1408, {layers} layers, 336 px tile, "
          f"{torch.get_num_threads()} threads: median {med*1e3:.0f} ms ({1/med:.2f} images/s), best {best*1e3:.0f} ms")


def main():
    if "--bench" in sys.argv:
        bench()
        return
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        sys.exit(f"CPU capability {cap}: torch would resize in float here, unlike the fixtures' reference")
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    images = make_images()
    processor_fixtures(images)
    bf16_lut()
    prompt_layouts()
    model_fixtures()


if __name__ == "__main__":
    main()
