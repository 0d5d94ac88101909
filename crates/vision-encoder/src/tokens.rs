//! The prompt layout of one image (`Llama4Processor._prompt_split_image`).

/// A special token of the image layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageToken {
    /// `<|image_start|>`
    ImageStart,
    /// `<|image|>`: precedes the global tile's patches.
    Image,
    /// `<|patch|>`: replaced by one projected vision token.
    Patch,
    /// `<|tile_x_separator|>`: between tiles of a row.
    TileXSeparator,
    /// `<|tile_y_separator|>`: after each row of tiles.
    TileYSeparator,
    /// `<|image_end|>`
    ImageEnd,
}

impl ImageToken {
    /// The token's text in the Llama 4 tokenizer.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageToken::ImageStart => "<|image_start|>",
            ImageToken::Image => "<|image|>",
            ImageToken::Patch => "<|patch|>",
            ImageToken::TileXSeparator => "<|tile_x_separator|>",
            ImageToken::TileYSeparator => "<|tile_y_separator|>",
            ImageToken::ImageEnd => "<|image_end|>",
        }
    }
}

/// The tokens that replace one `<|image|>` placeholder of the prompt, for an image processed into
/// `aspect_ratio = (rows, cols)` tiles of `tokens_per_tile` tokens each. The `Patch` tokens come
/// in the order of the vision tower's output: tiles row-major, then the global tile.
///
/// More than one tile: `<|image_start|>`, per row of tiles the tiles' patches separated by
/// `<|tile_x_separator|>` and followed by `<|tile_y_separator|>`, then `<|image|>`, the global
/// tile's patches, `<|image_end|>`. One tile: `<|image_start|><|image|>` patches `<|image_end|>`.
pub fn image_tokens((rows, cols): (usize, usize), tokens_per_tile: usize) -> Vec<ImageToken> {
    let tiles = rows * cols;
    let mut out = Vec::with_capacity((tiles + 1) * (tokens_per_tile + 1) + rows + 3);
    out.push(ImageToken::ImageStart);
    if tiles > 1 {
        for _ in 0..rows {
            for x in 0..cols {
                out.extend(std::iter::repeat_n(ImageToken::Patch, tokens_per_tile));
                if x + 1 < cols {
                    out.push(ImageToken::TileXSeparator);
                }
            }
            out.push(ImageToken::TileYSeparator);
        }
    }
    out.push(ImageToken::Image);
    out.extend(std::iter::repeat_n(ImageToken::Patch, tokens_per_tile));
    out.push(ImageToken::ImageEnd);
    out
}

/// [`image_tokens`] as prompt text.
pub fn image_prompt(aspect_ratio: (usize, usize), tokens_per_tile: usize) -> String {
    image_tokens(aspect_ratio, tokens_per_tile)
        .into_iter()
        .map(ImageToken::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_tile_layout() {
        assert_eq!(
            image_prompt((1, 1), 2),
            "<|image_start|><|image|><|patch|><|patch|><|image_end|>"
        );
    }

    #[test]
    fn two_by_three_layout() {
        let p = "<|patch|>";
        let x = "<|tile_x_separator|>";
        let y = "<|tile_y_separator|>";
        let row = format!("{p}{x}{p}{x}{p}{y}");
        let expected = format!("<|image_start|>{row}{row}<|image|>{p}<|image_end|>");
        assert_eq!(image_prompt((2, 3), 1), expected);
        let patches = image_tokens((2, 3), 144)
            .iter()
            .filter(|&&t| t == ImageToken::Patch)
            .count();
        assert_eq!(patches, 7 * 144);
    }
}
