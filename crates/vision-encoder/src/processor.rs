//! `Llama4ImageProcessor`: canvas choice, resize, pad, bf16 rescale + normalise, tiles.

use std::path::Path;

use half::bf16;
use image::DynamicImage;
use ndarray::{s, Array3, Array4, ArrayView3};

use crate::image_io::{to_rgb8, MAX_PIXELS};
use crate::resize::resize_bilinear_aa;
use crate::{Error, ProcessorConfig, Result};

/// An image ready for the vision tower.
#[derive(Clone, Debug)]
pub struct ProcessedImage {
    /// Normalised tiles, row-major over the canvas, then the global tile when there is more than
    /// one tile. Values are bf16 numbers held in f32.
    ///
    /// # Shapes
    /// `[N, 3, S, S]`, `N = rows·cols + (rows·cols > 1)`.
    pub tiles: Array4<f32>,
    /// Canvas size in tiles: `(rows, cols)`.
    pub aspect_ratio: (usize, usize),
}

impl ProcessedImage {
    /// Number of tiles, the global tile included.
    pub fn num_tiles(&self) -> usize {
        self.tiles.dim().0
    }
}

/// Turns images into normalised tiles exactly as transformers' `Llama4ImageProcessor` does.
#[derive(Clone, Debug)]
pub struct ImageProcessor {
    config: ProcessorConfig,
    /// `(x − mean) / std` after rescaling, in bf16 steps, for each channel and 8-bit value.
    lut: [[f32; 256]; 3],
}

impl ImageProcessor {
    /// A processor with the given settings.
    pub fn new(config: ProcessorConfig) -> Result<Self> {
        config.validate()?;
        let bf = |x: f32| bf16::from_f32(x).to_f32();
        // The reference: `bf16(x) * rescale_factor` in bf16 (computed in f32, the Python float
        // cast to f32), then torchvision's normalise on the bf16 tensor: `sub_(mean).div_(std)`
        // with mean and std as bf16, each step rounded to bf16.
        let factor = config.rescale_factor as f32;
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            let (mean, std) = (bf(config.image_mean[c]), bf(config.image_std[c]));
            for (v, out) in table.iter_mut().enumerate() {
                let x = bf(bf(v as f32) * factor);
                *out = bf(bf(x - mean) / std);
            }
        }
        Ok(ImageProcessor { config, lut })
    }

    /// A processor configured from `processor_config.json` / `preprocessor_config.json` in `dir`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::new(ProcessorConfig::from_dir(dir)?)
    }

    /// The settings.
    pub fn config(&self) -> &ProcessorConfig {
        &self.config
    }

    /// Processes one image (converted to RGB first, see [`to_rgb8`]).
    ///
    /// # Shapes
    /// → tiles `[N, 3, S, S]`, see [`ProcessedImage`].
    pub fn process(&self, image: &DynamicImage) -> Result<ProcessedImage> {
        let (w, h) = (image.width(), image.height());
        if w == 0 || h == 0 {
            return Err(Error::EmptyImage { width: w, height: h });
        }
        if u64::from(w) * u64::from(h) > MAX_PIXELS {
            return Err(Error::ImageTooLarge {
                width: w,
                height: h,
                max_pixels: MAX_PIXELS,
            });
        }
        let rgb = to_rgb8(image);
        let (h, w) = (h as usize, w as usize);
        // HWC bytes → CHW.
        let hwc = ArrayView3::from_shape((h, w, 3), rgb.as_raw().as_slice())
            .map_err(|e| Error::shape("ImageProcessor::process", e.to_string()))?;
        let chw = hwc.permuted_axes([2, 0, 1]).as_standard_layout().into_owned();
        self.process_chw(chw.view())
    }

    /// [`process`](Self::process) on channel-first RGB bytes.
    ///
    /// # Shapes
    /// `image: [3, H, W]` → tiles `[N, 3, S, S]`.
    pub fn process_chw(&self, image: ArrayView3<u8>) -> Result<ProcessedImage> {
        let (c, h, w) = image.dim();
        if c != 3 {
            return Err(Error::shape(
                "ImageProcessor::process_chw",
                format!("{c} channels, need 3"),
            ));
        }
        if h == 0 || w == 0 {
            return Err(Error::EmptyImage {
                width: w as u32,
                height: h as u32,
            });
        }
        let cfg = &self.config;
        let tile = cfg.tile_size;
        let (canvas_h, canvas_w) = canvas_for((h, w), tile, cfg.max_patches, cfg.resize_to_max_canvas);
        let (new_h, new_w) = resized_size((h, w), (canvas_h, canvas_w), tile, cfg.resize_to_max_canvas);
        let resized = resize_bilinear_aa(image, new_h, new_w);
        // Pad right and bottom with 0 (before normalisation, so padding becomes (0 − mean)/std).
        let mut canvas = Array3::<u8>::zeros((3, canvas_h, canvas_w));
        canvas.slice_mut(s![.., ..new_h, ..new_w]).assign(&resized);

        let (rows, cols) = (canvas_h / tile, canvas_w / tile);
        let global = rows * cols > 1;
        let n = rows * cols + usize::from(global);
        let mut tiles = Array4::<f32>::zeros((n, 3, tile, tile));
        for r in 0..rows {
            for cc in 0..cols {
                let src = canvas.slice(s![.., r * tile..(r + 1) * tile, cc * tile..(cc + 1) * tile]);
                self.normalise_into(src, tiles.slice_mut(s![r * cols + cc, .., .., ..]));
            }
        }
        if global {
            // The whole original image squeezed to one tile (aspect ratio not kept).
            let small = resize_bilinear_aa(image, tile, tile);
            self.normalise_into(small.view(), tiles.slice_mut(s![n - 1, .., .., ..]));
        }
        Ok(ProcessedImage {
            tiles,
            aspect_ratio: (rows, cols),
        })
    }

    fn normalise_into(&self, src: ArrayView3<u8>, mut dst: ndarray::ArrayViewMut3<f32>) {
        for (c, (plane_in, mut plane_out)) in src.outer_iter().zip(dst.outer_iter_mut()).enumerate() {
            let lut = &self.lut[c];
            plane_out.zip_mut_with(&plane_in, |o, &v| *o = lut[v as usize]);
        }
    }
}

/// The canvas sizes `(a·S, b·S)` with `a·b ≤ max_tiles`, in the reference's order (which decides
/// ties of equal scale and area): by tile count descending, grouped by first appearance of each
/// aspect ratio, factors ascending.
fn supported_canvases(tile: usize, max_tiles: usize) -> Vec<(usize, usize)> {
    // (reduced aspect ratio, its (rows, cols) in order of appearance)
    type Group = ((usize, usize), Vec<(usize, usize)>);
    let mut groups: Vec<Group> = Vec::new();
    for count in (1..=max_tiles).rev() {
        for a in 1..=count {
            if count % a != 0 {
                continue;
            }
            let b = count / a;
            let g = gcd(a, b);
            let key = (a / g, b / g);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, list)) => list.push((a, b)),
                None => groups.push((key, vec![(a, b)])),
            }
        }
    }
    groups
        .into_iter()
        .flat_map(|(_, list)| list)
        .map(|(a, b)| (a * tile, b * tile))
        .collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The canvas `(height, width)` in pixels for an image of `(height, width)` (`get_best_fit`):
/// each canvas scales the image by `min(canvas_h / h, canvas_w / w)` (computed in f32, as the
/// reference's tensors are); take the smallest scale ≥ 1 (the largest with
/// `resize_to_max_canvas`), else the largest scale; ties go to the smallest area, then the first
/// in the reference's order.
pub fn canvas_for(
    (h, w): (usize, usize),
    tile: usize,
    max_tiles: usize,
    resize_to_max_canvas: bool,
) -> (usize, usize) {
    let canvases = supported_canvases(tile, max_tiles);
    let scales: Vec<f32> = canvases
        .iter()
        .map(|&(ch, cw)| {
            let sh = ch as f32 / h as f32;
            let sw = cw as f32 / w as f32;
            if sh > sw {
                sw
            } else {
                sh
            }
        })
        .collect();
    let up = scales.iter().copied().filter(|&s| s >= 1.0);
    let selected = if scales.iter().any(|&s| s >= 1.0) {
        if resize_to_max_canvas {
            up.fold(f32::NEG_INFINITY, f32::max)
        } else {
            up.fold(f32::INFINITY, f32::min)
        }
    } else {
        scales.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    };
    let mut best: Option<(usize, usize)> = None;
    for (&canvas, &s) in canvases.iter().zip(&scales) {
        if s == selected && best.is_none_or(|b| canvas.0 * canvas.1 < b.0 * b.1) {
            best = Some(canvas);
        }
    }
    // `selected` is one of `scales`, so some canvas matched.
    best.unwrap_or((tile, tile))
}

/// A number as the reference holds it: a Python int (f64 arithmetic) or an element of an int64
/// tensor (f32 arithmetic once divided).
#[derive(Clone, Copy)]
enum RefNum {
    Int(usize),
    Tensor(usize),
}

/// A quotient as the reference holds it.
#[derive(Clone, Copy)]
enum RefFloat {
    F64(f64),
    F32(f32),
}

impl RefNum {
    fn value(self) -> usize {
        match self {
            RefNum::Int(v) | RefNum::Tensor(v) => v,
        }
    }
    fn div(self, d: usize) -> RefFloat {
        match self {
            RefNum::Int(v) => RefFloat::F64(v as f64 / d as f64),
            RefNum::Tensor(v) => RefFloat::F32(v as f32 / d as f32),
        }
    }
}

impl RefFloat {
    /// `a < b` with torch's promotion: any f32 operand makes it an f32 comparison.
    fn lt(self, other: RefFloat) -> bool {
        match (self, other) {
            (RefFloat::F64(a), RefFloat::F64(b)) => a < b,
            (a, b) => a.as_f32() < b.as_f32(),
        }
    }
    fn as_f32(self) -> f32 {
        match self {
            RefFloat::F64(v) => v as f32,
            RefFloat::F32(v) => v,
        }
    }
    /// `math.floor(n * self)`.
    fn floor_times(self, n: usize) -> usize {
        match self {
            RefFloat::F64(v) => (n as f64 * v).floor() as usize,
            RefFloat::F32(v) => (n as f32 * v).floor() as usize,
        }
    }
}

/// Python's `min(a, b)`: `b` only when strictly smaller, so equal values keep `a`'s kind.
fn py_min(a: RefNum, b: RefNum) -> RefNum {
    if b.value() < a.value() {
        b
    } else {
        a
    }
}

/// The size `(height, width)` the image is resized to inside `canvas`, keeping its aspect ratio
/// (`get_max_res_without_distortion`); without `resize_to_max_canvas` an image is not upscaled
/// beyond `max(side, tile)`. Arithmetic follows the reference's mix of Python floats and f32
/// tensors, which decides `floor` at exact boundaries.
pub fn resized_size(
    (h, w): (usize, usize),
    (canvas_h, canvas_w): (usize, usize),
    tile: usize,
    resize_to_max_canvas: bool,
) -> (usize, usize) {
    let (th, tw) = if resize_to_max_canvas {
        (RefNum::Tensor(canvas_h), RefNum::Tensor(canvas_w))
    } else {
        (
            py_min(RefNum::Int(h.max(tile)), RefNum::Tensor(canvas_h)),
            py_min(RefNum::Int(w.max(tile)), RefNum::Tensor(canvas_w)),
        )
    };
    let (new_h, new_w) = max_res((h, w), (th, tw));
    (new_h.max(1), new_w.max(1))
}

/// `get_max_res_without_distortion`.
fn max_res((h, w): (usize, usize), (th, tw): (RefNum, RefNum)) -> (usize, usize) {
    let scale_w = tw.div(w);
    let scale_h = th.div(h);
    if scale_w.lt(scale_h) {
        (scale_w.floor_times(h).min(th.value()), tw.value())
    } else {
        (th.value(), scale_h.floor_times(w).min(tw.value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canvases_in_reference_order() {
        // find_supported_resolutions(4, size 1) printed by transformers 5.23.0.
        let got = supported_canvases(1, 4);
        assert_eq!(
            got,
            vec![(1, 4), (2, 2), (1, 1), (4, 1), (1, 3), (3, 1), (1, 2), (2, 1)]
        );
    }

    #[test]
    fn best_fit_and_max_res_match_reference_calls() {
        // get_best_fit((200, 300), find_supported_resolutions(3, 224)) = [224, 448];
        // get_max_res_without_distortion((200, 300), (450, 200)) = (133, 200) and
        // ((800, 600), (450, 1300)) = (450, 337), plain ints as targets (printed by 5.23.0; the
        // docstring's 134 and 338 are stale).
        assert_eq!(canvas_for((200, 300), 224, 3, false), (224, 448));
        assert_eq!(
            max_res((200, 300), (RefNum::Int(450), RefNum::Int(200))),
            (133, 200)
        );
        assert_eq!(
            max_res((800, 600), (RefNum::Int(450), RefNum::Int(1300))),
            (450, 337)
        );
    }
}
