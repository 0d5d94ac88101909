//! Images in the prompt (early fusion): the vision tower and projector of a multimodal checkpoint,
//! the expansion of each `<|image|>` placeholder into the image's token layout, and the
//! projected image tokens written over the `<|patch|>` embeddings, in order (for each image its
//! tiles row-major, then its global tile), as `Llama4ForConditionalGeneration` does.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use llama4_core::{Checkpoint, QuantPolicy};
use ndarray::{Array2, ArrayView2, Axis};
use vision_encoder::image::DynamicImage;
use vision_encoder::{
    decode_image, image_tokens, ImageProcessor, ImageToken, Mmproj, Projector, VisionModel,
};

use crate::model::load_moe;
use crate::session::Session;
use crate::{
    Error, GenerateOptions, Generation, LoadOptions, ModelConfig, MoeBuilder, Result, TextModel, Tokenizer,
};

/// Ids of the special tokens that lay out an image in the prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageTokenIds {
    /// `<|image_start|>`.
    pub image_start: u32,
    /// `<|image|>`: the placeholder the user writes, and the marker before the global tile.
    pub image: u32,
    /// `<|patch|>`: one projected image token each (`image_token_index` in config.json).
    pub patch: u32,
    /// `<|tile_x_separator|>`.
    pub tile_x_separator: u32,
    /// `<|tile_y_separator|>`.
    pub tile_y_separator: u32,
    /// `<|image_end|>`.
    pub image_end: u32,
}

impl ImageTokenIds {
    /// The ids as `tokenizer` spells them.
    ///
    /// # Errors
    /// [`Error::MissingImageToken`] naming the first token the tokenizer lacks.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self> {
        let id = |t: ImageToken| {
            tokenizer
                .token_id(t.as_str())
                .ok_or(Error::MissingImageToken { token: t.as_str() })
        };
        Ok(ImageTokenIds {
            image_start: id(ImageToken::ImageStart)?,
            image: id(ImageToken::Image)?,
            patch: id(ImageToken::Patch)?,
            tile_x_separator: id(ImageToken::TileXSeparator)?,
            tile_y_separator: id(ImageToken::TileYSeparator)?,
            image_end: id(ImageToken::ImageEnd)?,
        })
    }

    /// The id of one layout token.
    pub fn id(&self, token: ImageToken) -> u32 {
        match token {
            ImageToken::ImageStart => self.image_start,
            ImageToken::Image => self.image,
            ImageToken::Patch => self.patch,
            ImageToken::TileXSeparator => self.tile_x_separator,
            ImageToken::TileYSeparator => self.tile_y_separator,
            ImageToken::ImageEnd => self.image_end,
        }
    }
}

/// Replaces each `<|image|>` id of `prompt` with the token layout of the next image (see
/// [`vision_encoder::image_tokens`]); the layout's own `<|image|>` (before the global tile) is
/// emitted, not expanded again. What `Llama4Processor` does to the prompt text, on ids: every
/// layout token is a special token, so tokenising the expanded text gives the same ids.
///
/// # Errors
/// [`Error::ImageCount`] when the prompt's placeholders and `aspect_ratios` differ in number.
pub fn expand_image_placeholders(
    prompt: &[u32],
    aspect_ratios: &[(usize, usize)],
    ids: &ImageTokenIds,
    tokens_per_tile: usize,
) -> Result<Vec<u32>> {
    let placeholders = prompt.iter().filter(|&&t| t == ids.image).count();
    if placeholders != aspect_ratios.len() {
        return Err(Error::ImageCount {
            placeholders,
            images: aspect_ratios.len(),
        });
    }
    let mut ratios = aspect_ratios.iter();
    let mut out = Vec::with_capacity(prompt.len());
    for &t in prompt {
        // Counted above, so every placeholder has its image.
        match (t == ids.image).then(|| ratios.next()).flatten() {
            Some(&ratio) => out.extend(
                image_tokens(ratio, tokens_per_tile)
                    .into_iter()
                    .map(|k| ids.id(k)),
            ),
            None => out.push(t),
        }
    }
    Ok(out)
}

/// Writes the rows of `features` over the rows of `embeddings` whose id is `patch`, in order
/// (`masked_scatter` in the reference).
///
/// # Shapes
/// `ids: [T]`, `embeddings: [T, H]`, `features: [P, H]` with `P` the number of `patch` ids.
///
/// # Errors
/// [`Error::ImageFeatureCount`] when the `patch` ids and the feature rows differ in number; a
/// shape error when the widths or lengths disagree.
pub fn scatter_image_features(
    ids: &[u32],
    embeddings: &mut Array2<f32>,
    patch: u32,
    features: ArrayView2<f32>,
) -> Result<()> {
    if embeddings.nrows() != ids.len() || embeddings.ncols() != features.ncols() {
        return Err(llama4_core::Error::shape(
            "scatter_image_features",
            format!(
                "{} ids, embeddings {:?}, features {:?}",
                ids.len(),
                embeddings.dim(),
                features.dim()
            ),
        )
        .into());
    }
    let patch_tokens = ids.iter().filter(|&&t| t == patch).count();
    if patch_tokens != features.nrows() {
        return Err(Error::ImageFeatureCount {
            patch_tokens,
            features: features.nrows(),
        });
    }
    let rows = ids
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == patch)
        .map(|(i, _)| i);
    for (i, feature) in rows.zip(features.axis_iter(Axis(0))) {
        embeddings.row_mut(i).assign(&feature);
    }
    Ok(())
}

/// One image through the processor, the vision tower and the projector.
#[derive(Clone, Debug)]
pub struct EncodedImage {
    /// Canvas size in tiles `(rows, cols)`: decides the prompt layout.
    pub aspect_ratio: (usize, usize),
    /// Projected image tokens, one per `<|patch|>` of the layout: each tile's tokens row-major
    /// over the canvas, then the global tile's (when there is more than one tile).
    ///
    /// # Shapes
    /// `[N·tokens_per_tile, H]`.
    pub features: Array2<f32>,
}

/// A prompt ready for the decoder: expanded ids and their input embeddings.
#[derive(Clone, Debug)]
pub struct PreparedPrompt {
    /// The prompt with every `<|image|>` placeholder expanded.
    pub ids: Vec<u32>,
    /// Token embeddings, with the image tokens at the `<|patch|>` positions.
    ///
    /// # Shapes
    /// `[T, H]`, `T = ids.len()`.
    pub embeddings: Array2<f32>,
}

/// A multimodal Llama 4 checkpoint (`model_type: llama4`): the text decoder, the vision tower,
/// the projector, the image processor and the ids of the image layout tokens.
pub struct MultimodalModel {
    text: Arc<TextModel>,
    vision: VisionModel,
    projector: Projector,
    processor: ImageProcessor,
    token_ids: ImageTokenIds,
}

impl std::fmt::Debug for MultimodalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultimodalModel")
            .field("text", &self.text)
            .field("tokens_per_tile", &self.tokens_per_tile())
            .field("token_ids", &self.token_ids)
            .finish()
    }
}

impl MultimodalModel {
    /// Loads the checkpoint in `dir`: `config.json` (multimodal), the safetensors,
    /// `processor_config.json` or `preprocessor_config.json`, and `tokenizer.json` for the ids of
    /// the image layout tokens.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer = Tokenizer::from_dir(dir)?.ok_or_else(|| Error::Tokenizer {
            path: dir.join("tokenizer.json"),
            reason: "missing: the image layout tokens' ids come from it \
                     (or use MultimodalModel::load_with_ids)"
                .into(),
        })?;
        Self::load_with_ids(dir, ImageTokenIds::from_tokenizer(&tokenizer)?)
    }

    /// [`MultimodalModel::load`] with the layout tokens' ids given (no `tokenizer.json` read).
    ///
    /// # Errors
    /// Besides file errors: [`Error::Config`] when the checkpoint is text-only, when `<|patch|>`
    /// is not config.json's `image_token_index`, or when the processor's tile size is not the
    /// vision tower's `image_size`.
    pub fn load_with_ids(dir: impl AsRef<Path>, token_ids: ImageTokenIds) -> Result<Self> {
        Self::load_with_quantization(dir, token_ids, None)
    }

    /// [`MultimodalModel::load_with_ids`] with load-time quantisation of the text decoder's
    /// weights `policy` selects (the vision tower and projector are never selected; see
    /// [`TextModel::load_with_quantization`]).
    pub fn load_with_quantization(
        dir: impl AsRef<Path>,
        token_ids: ImageTokenIds,
        policy: Option<QuantPolicy>,
    ) -> Result<Self> {
        let options = LoadOptions {
            quantization: policy,
            progress: None,
        };
        Self::load_with_options(dir, token_ids, &options)
    }

    /// [`MultimodalModel::load_with_quantization`] with the text decoder's MoE layers built by
    /// `build` (see [`TextModel::load_with_moe`]).
    pub fn load_with_moe(
        dir: impl AsRef<Path>,
        token_ids: ImageTokenIds,
        policy: Option<QuantPolicy>,
        build: &mut MoeBuilder<'_>,
    ) -> Result<Self> {
        let options = LoadOptions {
            quantization: policy,
            progress: None,
        };
        Self::load_with_options_and_moe(dir, token_ids, &options, build)
    }

    /// [`MultimodalModel::load_with_quantization`] with `options.progress` told of every
    /// tensor loaded (see [`TextModel::load_with_options`]).
    pub fn load_with_options(
        dir: impl AsRef<Path>,
        token_ids: ImageTokenIds,
        options: &LoadOptions,
    ) -> Result<Self> {
        // As [`TextModel::load_with_options`]: every weight is this process's to read.
        let model = Self::load_checkpoint(dir.as_ref(), token_ids, options, &mut load_moe, true)?;
        if let Some(ckpt) = model.text.checkpoint().filter(|c| !c.in_huge_pages()) {
            ckpt.populate_resident_pages();
        }
        Ok(model)
    }

    /// [`MultimodalModel::load_with_options`] with the text decoder's MoE layers built by
    /// `build` (see [`TextModel::load_with_moe`]).
    pub fn load_with_options_and_moe(
        dir: impl AsRef<Path>,
        token_ids: ImageTokenIds,
        options: &LoadOptions,
        build: &mut MoeBuilder<'_>,
    ) -> Result<Self> {
        Self::load_checkpoint(dir.as_ref(), token_ids, options, build, false)
    }

    /// The loaders' body; with `whole`, the files may be copied into huge pages (see
    /// [`TextModel::load_with_options`]).
    fn load_checkpoint(
        dir: &Path,
        token_ids: ImageTokenIds,
        options: &LoadOptions,
        build: &mut MoeBuilder<'_>,
        whole: bool,
    ) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let multimodal = config.multimodal.as_ref().ok_or_else(|| Error::Config {
            field: "vision_config",
            reason: "absent: a text-only checkpoint cannot take images".into(),
        })?;
        let vision_cfg = &multimodal.vision;
        if multimodal.image_token_index != token_ids.patch {
            return Err(Error::Config {
                field: "image_token_index",
                reason: format!(
                    "{} differs from the tokenizer's <|patch|> id {}",
                    multimodal.image_token_index, token_ids.patch
                ),
            });
        }
        let processor = ImageProcessor::from_dir(dir)?;
        if processor.config().tile_size != vision_cfg.image_size {
            return Err(Error::Config {
                field: "vision_config.image_size",
                reason: format!(
                    "{} differs from the image processor's tile size {}",
                    vision_cfg.image_size,
                    processor.config().tile_size
                ),
            });
        }
        let mut ckpt = Checkpoint::open(dir)?
            .with_quantization(options.quantization)
            .with_progress(options.progress.clone());
        if whole {
            ckpt.copy_to_huge_pages();
        }
        let vision = VisionModel::load(ckpt.scope("vision_model"), vision_cfg)?;
        let projector = Projector::load(
            ckpt.scope("multi_modal_projector"),
            vision_cfg,
            config.text.hidden_size(),
        )?;
        let text = TextModel::from_checkpoint_with_moe(ckpt, &config, build)?;
        if let Some(ckpt) = text.checkpoint() {
            ckpt.finish_progress();
        }
        Ok(MultimodalModel {
            text: Arc::new(text),
            vision,
            projector,
            processor,
            token_ids,
        })
    }

    /// A model from a text decoder, a vision tower and projector with their image processor
    /// (a llama.cpp projector GGUF: [`Mmproj`]) and the layout tokens' ids: what
    /// `generate --model FILE.gguf --mmproj MMPROJ.gguf` runs, the decoder from
    /// [`GgufModel::load`](crate::GgufModel::load) and the ids from its tokenizer.
    ///
    /// # Errors
    /// [`Error::Config`] when the projector's output width is not the decoder's hidden size
    /// (a projector made for another model) or `token_ids.patch` is not in its vocabulary.
    pub fn from_parts(text: Arc<TextModel>, mmproj: Mmproj, token_ids: ImageTokenIds) -> Result<Self> {
        let hidden = text.config().hidden_size();
        if mmproj.projector.output_dim() != hidden {
            return Err(Error::Config {
                field: "mm.model.fc.weight",
                reason: format!(
                    "the projector outputs width {}, the text model's hidden size is {hidden}: \
                     a projector for another model",
                    mmproj.projector.output_dim()
                ),
            });
        }
        let vocab = text.config().vocab_size;
        if let Some(id) = [token_ids.image_start, token_ids.patch, token_ids.image_end]
            .into_iter()
            .find(|&id| id as usize >= vocab)
        {
            return Err(Error::Config {
                field: "image token ids",
                reason: format!("id {id} is outside the vocabulary of {vocab}"),
            });
        }
        Ok(MultimodalModel {
            text,
            vision: mmproj.vision,
            projector: mmproj.projector,
            processor: ImageProcessor::new(mmproj.processor)?,
            token_ids,
        })
    }

    /// The text decoder (for [`Session::new`]).
    pub fn text(&self) -> &TextModel {
        &self.text
    }

    /// The text decoder as a shared handle, for sessions that own their model
    /// (`Session<Arc<TextModel>>`, which a server keeps beside the vision tower).
    pub fn shared_text(&self) -> &Arc<TextModel> {
        &self.text
    }

    /// The vision tower.
    pub fn vision(&self) -> &VisionModel {
        &self.vision
    }

    /// The projector from vision features to the text hidden size.
    pub fn projector(&self) -> &Projector {
        &self.projector
    }

    /// The image processor.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// Ids of the image layout tokens.
    pub fn token_ids(&self) -> &ImageTokenIds {
        &self.token_ids
    }

    /// `<|patch|>` tokens per tile.
    pub fn tokens_per_tile(&self) -> usize {
        self.vision.tokens_per_tile()
    }

    /// Processes, encodes and projects one image.
    ///
    /// # Shapes
    /// → features `[N·tokens_per_tile, H]`, see [`EncodedImage`].
    pub fn encode_image(&self, image: &DynamicImage) -> Result<EncodedImage> {
        let processed = self.processor.process(image)?;
        let out = self.vision.forward(processed.tiles.view())?;
        let features = self.projector.forward_tiles(out.view())?;
        Ok(EncodedImage {
            aspect_ratio: processed.aspect_ratio,
            features,
        })
    }

    /// Reads a PNG or JPEG file and encodes it.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read,
    /// [`llama4_core::Error::NotRegularFile`] for a FIFO, device or directory,
    /// [`llama4_core::Error::InputTooLarge`] past [`MAX_IMAGE_BYTES`](llama4_core::input::MAX_IMAGE_BYTES),
    /// [`Error::Image`] naming the file when its bytes are not a complete image this crate decodes.
    pub fn encode_image_file(&self, path: impl AsRef<Path>) -> Result<EncodedImage> {
        let path = path.as_ref();
        let bytes =
            llama4_core::input::read_capped(path, llama4_core::input::Cap::IMAGE).map_err(Error::input)?;
        let image = decode_image(&bytes).map_err(|source| Error::Image {
            path: path.to_path_buf(),
            source,
        })?;
        self.encode_image(&image)
    }

    /// Expands the prompt's `<|image|>` placeholders, one per image in order; see
    /// [`expand_image_placeholders`].
    pub fn expand_prompt(&self, prompt: &[u32], aspect_ratios: &[(usize, usize)]) -> Result<Vec<u32>> {
        expand_image_placeholders(prompt, aspect_ratios, &self.token_ids, self.tokens_per_tile())
    }

    /// The expanded prompt and its input embeddings: token embeddings with each image's tokens
    /// at its `<|patch|>` positions. `prompt` holds one `<|image|>` per image (text with
    /// placeholders, as [`Tokenizer::encode`] gives it) and may hold no other `<|patch|>`.
    ///
    /// # Errors
    /// [`Error::ImageCount`] (placeholders vs images), [`Error::ImageFeatureCount`] (`<|patch|>`
    /// tokens vs image tokens, e.g. a `<|patch|>` written in the prompt),
    /// [`Error::TokenOutOfRange`].
    pub fn prepare(&self, prompt: &[u32], images: &[EncodedImage]) -> Result<PreparedPrompt> {
        let ratios: Vec<(usize, usize)> = images.iter().map(|i| i.aspect_ratio).collect();
        let ids = self.expand_prompt(prompt, &ratios)?;
        let mut embeddings = self.text.embed(&ids)?;
        let h = self.text.config().hidden_size();
        let rows: usize = images.iter().map(|i| i.features.nrows()).sum();
        let mut features = Array2::<f32>::zeros((0, h));
        features.reserve_rows(rows).map_err(shape_err)?;
        for image in images {
            features
                .append(Axis(0), image.features.view())
                .map_err(shape_err)?;
        }
        scatter_image_features(&ids, &mut embeddings, self.token_ids.patch, features.view())?;
        Ok(PreparedPrompt { ids, embeddings })
    }
}

fn shape_err(e: ndarray::ShapeError) -> Error {
    llama4_core::Error::shape("MultimodalModel::prepare", e.to_string()).into()
}

impl<M: std::borrow::Borrow<TextModel>> Session<M> {
    /// [`Session::generate`] for a prompt given with its input embeddings (a
    /// [`PreparedPrompt`]): one prefill over the embeddings, then one step per generated token.
    ///
    /// # Shapes
    /// `prompt: [T]`, `embeddings: [T, H]`.
    pub fn generate_with_embeddings(
        &mut self,
        prompt: &[u32],
        embeddings: Array2<f32>,
        options: &GenerateOptions,
        on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.generate_from(prompt, Some(embeddings), options, on_token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    const IDS: ImageTokenIds = ImageTokenIds {
        image_start: 100,
        image: 101,
        patch: 102,
        tile_x_separator: 103,
        tile_y_separator: 104,
        image_end: 105,
    };

    #[test]
    fn expands_only_the_placeholders_written() {
        let prompt = [1, 101, 7, 101, 8];
        let out = expand_image_placeholders(&prompt, &[(1, 2), (1, 1)], &IDS, 2).unwrap();
        let first = [100, 102, 102, 103, 102, 102, 104, 101, 102, 102, 105];
        let second = [100, 101, 102, 102, 105];
        let want: Vec<u32> = [&[1][..], &first, &[7], &second, &[8]].concat();
        assert_eq!(out, want);
    }

    #[test]
    fn placeholder_count_must_match() {
        let err = expand_image_placeholders(&[101, 101], &[(1, 1)], &IDS, 2).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ImageCount {
                    placeholders: 2,
                    images: 1
                }
            ),
            "{err}"
        );
        let err = expand_image_placeholders(&[1], &[(1, 1)], &IDS, 2).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ImageCount {
                    placeholders: 0,
                    images: 1
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn scatters_in_order_and_checks_counts() {
        let ids = [1, 102, 3, 102];
        let mut e = Array2::<f32>::zeros((4, 2));
        let f = array![[1.0, 2.0], [3.0, 4.0]];
        scatter_image_features(&ids, &mut e, 102, f.view()).unwrap();
        assert_eq!(e, array![[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]);
        let err = scatter_image_features(&ids, &mut e, 102, f.slice(ndarray::s![..1, ..])).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ImageFeatureCount {
                    patch_tokens: 2,
                    features: 1
                }
            ),
            "{err}"
        );
    }
}
