//! Llama 4's vision tower at the real width (1408, 16 heads, 336 px tiles, 577 tokens, adapter
//! 5632 → 4096 → 4096) but with 2 encoder layers instead of 34, so a tile takes well under a second
//! on 2 cores; bf16 weights as the checkpoints ship. Throughput is images (one tile each), so
//! criterion reports images/s. A full 34-layer tower costs about 17× the layer part of this.
//!
//! transformers' `Llama4VisionModel` on the same config and threads, for comparison:
//! `THREADS=2 LAYERS=2 .venv-ref/bin/python tools/make_vision_fixtures.py --bench`.
//! Run: `cargo bench --bench vision`.

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama4_core::{bf16, Checkpoint};
use ndarray::Array4;
use safetensors::tensor::{Dtype, TensorView};
use vision_encoder::{VisionConfig, VisionModel};

const LAYERS: usize = 2;

/// Deterministic values in `[-scale, scale)` (a 64-bit LCG).
fn values(n: usize, seed: u64, scale: f32) -> impl Iterator<Item = f32> {
    let mut s = seed;
    (0..n).map(move |_| {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    })
}

fn config() -> VisionConfig {
    let cfg = VisionConfig {
        hidden_size: 1408,
        num_hidden_layers: LAYERS,
        num_attention_heads: 16,
        intermediate_size: 5632,
        image_size: 336,
        patch_size: 14,
        norm_eps: 1e-5,
        pixel_shuffle_ratio: 0.5,
        projector_input_dim: 4096,
        projector_output_dim: 4096,
        vision_output_dim: 4096,
        rope_theta: 10000.0,
    };
    cfg.validate().expect("valid config");
    cfg
}

/// Writes a random bf16 tower to a temporary safetensors file and loads it.
fn model(cfg: &VisionConfig) -> (VisionModel, std::path::PathBuf) {
    let d = cfg.hidden_size;
    let i = cfg.intermediate_size;
    let p = cfg.projector_output_dim;
    let t = cfg.grid() * cfg.grid() + 1;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("patch_embedding.linear.weight".into(), vec![d, 3 * 14 * 14]),
        ("class_embedding".into(), vec![d]),
        ("positional_embedding_vlm".into(), vec![t, d]),
        ("vision_adapter.mlp.fc1.weight".into(), vec![p, i]),
        ("vision_adapter.mlp.fc2.weight".into(), vec![p, p]),
    ];
    for ln in ["layernorm_pre", "layernorm_post"] {
        shapes.push((format!("{ln}.weight"), vec![d]));
        shapes.push((format!("{ln}.bias"), vec![d]));
    }
    for j in 0..cfg.num_hidden_layers {
        let l = format!("model.layers.{j}");
        for ln in ["input_layernorm", "post_attention_layernorm"] {
            shapes.push((format!("{l}.{ln}.weight"), vec![d]));
            shapes.push((format!("{l}.{ln}.bias"), vec![d]));
        }
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            shapes.push((format!("{l}.self_attn.{proj}.weight"), vec![d, d]));
            shapes.push((format!("{l}.self_attn.{proj}.bias"), vec![d]));
        }
        shapes.push((format!("{l}.mlp.fc1.weight"), vec![i, d]));
        shapes.push((format!("{l}.mlp.fc1.bias"), vec![i]));
        shapes.push((format!("{l}.mlp.fc2.weight"), vec![d, i]));
        shapes.push((format!("{l}.mlp.fc2.bias"), vec![d]));
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let scale = if name.contains("norm") && name.ends_with("weight") {
                1.0
            } else {
                1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt()
            };
            let bytes = values(n, k as u64 + 1, scale)
                .flat_map(|v| {
                    let v = if scale == 1.0 { 1.0 + 0.5 * v } else { v };
                    bf16::from_f32(v).to_le_bytes()
                })
                .collect();
            (format!("vision_model.{name}"), shape, bytes)
        })
        .collect();
    let views: HashMap<String, TensorView> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view = TensorView::new(Dtype::BF16, shape.clone(), bytes).expect("sized");
            (name.clone(), view)
        })
        .collect();
    let path = std::env::temp_dir().join(format!("llama4-vision-bench-{}.safetensors", std::process::id()));
    safetensors::serialize_to_file(&views, None, &path).expect("write bench weights");
    let ckpt = Checkpoint::open(&path).expect("open bench weights");
    let model = VisionModel::load(ckpt.scope("vision_model"), cfg).expect("load bench weights");
    (model, path)
}

fn vision(c: &mut Criterion) {
    let cfg = config();
    let (model, path) = model(&cfg);
    let s = cfg.image_size;
    let tile = Array4::from_shape_vec((1, 3, s, s), values(3 * s * s, 99, 1.0).collect()).expect("sized");
    let mut group = c.benchmark_group("vision_tower");
    group.sample_size(10);
    group.measurement_time(std::time::Duration::from_secs(10));
    group.throughput(Throughput::Elements(1));
    group.bench_function(format!("width1408_{LAYERS}layers_336px_tile"), |b| {
        b.iter(|| model.forward(tile.view()).expect("forward"))
    });
    group.finish();
    drop(model);
    let _ = std::fs::remove_file(path);
}

criterion_group!(benches, vision);
criterion_main!(benches);
