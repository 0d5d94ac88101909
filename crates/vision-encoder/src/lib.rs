#![deny(missing_docs)]
//! Llama 4's vision side, numerically matched to transformers 5.23.0 (with torchvision 0.29 doing the
//! resize):
//!
//! - [`load_image`] / [`decode_image`]: PNG and JPEG, with the dimension limit checked from the
//!   header before anything is decoded;
//! - [`ImageProcessor`]: canvas choice, aspect-preserving antialiased bilinear resize, padding,
//!   bf16 rescale + normalise, tiles plus the global tile → [`ProcessedImage`];
//! - [`VisionModel`]: patch embedding, class token, positions, 2D RoPE encoder, pixel shuffle,
//!   adapter; [`Projector`]: vision features → text hidden size;
//! - [`Mmproj`]: the tower and projector from llama.cpp's multimodal projector GGUF;
//! - [`image_tokens`]: the prompt layout that the projected tokens fill.
//!
//! ```no_run
//! # fn main() -> vision_encoder::Result<()> {
//! use llama4_core::Checkpoint;
//! use vision_encoder::{image_tokens, load_image, ImageProcessor, MultimodalConfig, Projector, VisionModel};
//!
//! let dir = std::path::Path::new("/models/llama4-scout");
//! let cfg = MultimodalConfig::from_file(dir.join("config.json"))?;
//! let ckpt = Checkpoint::open(dir)?;
//! let vision = VisionModel::load(ckpt.scope("vision_model"), &cfg.vision)?;
//! let projector = Projector::load(ckpt.scope("multi_modal_projector"), &cfg.vision, cfg.text_hidden_size)?;
//!
//! let processed = ImageProcessor::from_dir(dir)?.process(&load_image("cat.png")?)?;
//! let features = vision.forward(processed.tiles.view())?; // [N, 144, 4096]
//! let embeddings = projector.forward_tiles(features.view())?; // [N·144, 5120]
//! let layout = image_tokens(processed.aspect_ratio, vision.tokens_per_tile());
//! # Ok(()) }
//! ```

mod config;
mod error;
mod image_io;
mod mmproj;
mod model;
mod processor;
mod resize;
mod tokens;

pub use config::{
    MultimodalConfig, ProcessorConfig, VisionConfig, DEFAULT_IMAGE_TOKEN_INDEX, LAYER_NORM_EPS,
    MAX_CANVAS_PIXELS, MAX_GRID, MAX_PATCHES, MAX_TILE_SIZE,
};
pub use error::{Error, Result};
pub use image_io::{decode_image, load_image, to_rgb8, MAX_PIXELS};
pub use mmproj::{mmproj_config, Mmproj, LLAMA4_PROJECTOR};
pub use model::{Projector, VisionModel};
pub use processor::{canvas_for, resized_size, ImageProcessor, ProcessedImage};
pub use resize::resize_bilinear_aa;
pub use tokens::{image_prompt, image_tokens, ImageToken};

/// Re-exported so callers can name image types without a direct dependency on `image`.
pub use image;
