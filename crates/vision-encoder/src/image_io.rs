//! Reading PNG and JPEG files, and converting any decoded image to RGB as the reference does.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

use crate::{Error, Result};

/// Largest image accepted, in pixels (100 megapixels).
pub const MAX_PIXELS: u64 = 100_000_000;

/// Reads and decodes a PNG or JPEG file; see [`decode_image`]. The file must be a regular
/// file of at most [`MAX_IMAGE_BYTES`](llama4_core::input::MAX_IMAGE_BYTES) (a FIFO or device
/// is refused, not read).
pub fn load_image(path: impl AsRef<Path>) -> Result<DynamicImage> {
    let path = path.as_ref();
    let bytes =
        llama4_core::input::read_capped(path, llama4_core::input::Cap::IMAGE).map_err(Error::input)?;
    decode_image(&bytes)
}

/// Decodes PNG or JPEG bytes. The dimensions are read from the header first, so an empty image or
/// one over [`MAX_PIXELS`] is rejected before any pixel memory is allocated.
///
/// A JPEG must reach its end-of-image marker (the decoder alone would fill a cut file's missing
/// rows with grey); a PNG its `IEND` chunk.
///
/// Errors: [`Error::UnknownImageFormat`], [`Error::UnsupportedImageFormat`], [`Error::EmptyImage`],
/// [`Error::ImageTooLarge`], [`Error::TruncatedImage`], [`Error::CorruptImage`].
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage> {
    let reader = guessed(bytes)?;
    if reader.format() == Some(ImageFormat::Jpeg) {
        // The JPEG decoder fills in what is missing from a cut file: check the end is there.
        check_jpeg_complete(bytes)?;
    }
    let (width, height) = reader.into_dimensions().map_err(decode_error)?;
    check_dimensions(width, height)?;
    let mut reader = guessed(bytes)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // 100 MP of 16-bit RGBA is 800 MB: the default 512 MiB allocation cap would refuse images
    // under the pixel limit.
    limits.max_alloc = Some(MAX_PIXELS * 8 + (64 << 20));
    reader.limits(limits);
    let image = reader.decode().map_err(decode_error)?;
    check_dimensions(image.width(), image.height())?;
    Ok(image)
}

fn guessed(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::CorruptImage(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => Ok(reader),
        Some(other) => Err(Error::UnsupportedImageFormat {
            format: format!("{other:?}"),
        }),
        None => Err(Error::UnknownImageFormat),
    }
}

/// Walks the JPEG marker segments from SOI to EOI: segment lengths are followed (so an EOI
/// inside an embedded thumbnail does not count), entropy-coded data is skipped to the next
/// marker. A file that ends first is [`Error::TruncatedImage`]; bytes where a marker must be
/// are [`Error::CorruptImage`]. Anything after EOI is ignored, as decoders do.
fn check_jpeg_complete(bytes: &[u8]) -> Result<()> {
    let truncated = || Error::TruncatedImage("the JPEG data ends before its end-of-image marker".into());
    let mut i = 2; // after SOI, which the format guess has seen
    loop {
        match bytes.get(i) {
            None => return Err(truncated()),
            Some(0xFF) => {}
            Some(b) => {
                return Err(Error::CorruptImage(format!(
                    "JPEG: byte {b:#04x} at offset {i} where a marker must be"
                )))
            }
        }
        // Fill bytes: any number of 0xFF before the marker code.
        while bytes.get(i) == Some(&0xFF) {
            i += 1;
        }
        let marker = *bytes.get(i).ok_or_else(truncated)?;
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            // Restart markers and TEM stand alone.
            0xD0..=0xD7 | 0x01 => continue,
            _ => {}
        }
        let len = match bytes.get(i..i + 2) {
            Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
            _ => return Err(truncated()),
        };
        if len < 2 {
            return Err(Error::CorruptImage(format!(
                "JPEG: segment length {len} at offset {i}"
            )));
        }
        i = i
            .checked_add(len)
            .filter(|&end| end <= bytes.len())
            .ok_or_else(truncated)?;
        if marker == 0xDA {
            // Entropy-coded data: 0xFF is followed by 0x00 (a stuffed byte) or a restart
            // marker inside it; any other code is the next marker.
            loop {
                match bytes.get(i) {
                    None => return Err(truncated()),
                    Some(0xFF) => match bytes.get(i + 1) {
                        None => return Err(truncated()),
                        Some(0x00 | 0xD0..=0xD7) => i += 2,
                        Some(_) => break,
                    },
                    Some(_) => i += 1,
                }
            }
        }
    }
}

fn check_dimensions(width: u32, height: u32) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::EmptyImage { width, height });
    }
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(Error::ImageTooLarge {
            width,
            height,
            max_pixels: MAX_PIXELS,
        });
    }
    Ok(())
}

fn decode_error(e: ImageError) -> Error {
    match e {
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::TruncatedImage(io.to_string())
        }
        ImageError::Decoding(d) => {
            let msg = d.to_string();
            // The PNG and JPEG decoders report running out of data as a decoding error.
            let lower = msg.to_lowercase();
            if lower.contains("eof")
                || lower.contains("end of")
                || lower.contains("truncat")
                || lower.contains("no more bytes")
            {
                Error::TruncatedImage(msg)
            } else {
                Error::CorruptImage(msg)
            }
        }
        ImageError::Unsupported(u) => Error::UnsupportedImageFormat {
            format: u.to_string(),
        },
        other => Error::CorruptImage(other.to_string()),
    }
}

/// Converts to 8-bit RGB as transformers does for PIL images: grey is replicated; an image with
/// alpha is composited onto opaque white with PIL's `alpha_composite` integer arithmetic (exact
/// for 8-bit data); 16-bit samples keep their high byte (what PIL does for 16-bit RGB PNGs; PIL
/// clips 16-bit grey instead, which is not mimicked).
pub fn to_rgb8(image: &DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb.clone(),
        DynamicImage::ImageLuma8(l) => RgbImage::from_fn(l.width(), l.height(), |x, y| {
            let v = l.get_pixel(x, y).0[0];
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageLumaA8(la) => RgbImage::from_fn(la.width(), la.height(), |x, y| {
            let [v, a] = la.get_pixel(x, y).0;
            let c = over_white(v, a);
            image::Rgb([c, c, c])
        }),
        DynamicImage::ImageRgba8(rgba) => RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            let [r, g, b, a] = rgba.get_pixel(x, y).0;
            image::Rgb([over_white(r, a), over_white(g, a), over_white(b, a)])
        }),
        DynamicImage::ImageLuma16(l) => RgbImage::from_fn(l.width(), l.height(), |x, y| {
            let v = (l.get_pixel(x, y).0[0] >> 8) as u8;
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageLumaA16(la) => RgbImage::from_fn(la.width(), la.height(), |x, y| {
            let [v, a] = la.get_pixel(x, y).0.map(|s| (s >> 8) as u8);
            let c = over_white(v, a);
            image::Rgb([c, c, c])
        }),
        DynamicImage::ImageRgb16(rgb) => RgbImage::from_fn(rgb.width(), rgb.height(), |x, y| {
            image::Rgb(rgb.get_pixel(x, y).0.map(|s| (s >> 8) as u8))
        }),
        DynamicImage::ImageRgba16(rgba) => RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            let [r, g, b, a] = rgba.get_pixel(x, y).0.map(|s| (s >> 8) as u8);
            image::Rgb([over_white(r, a), over_white(g, a), over_white(b, a)])
        }),
        other => {
            if other.color().has_alpha() {
                let rgba = other.to_rgba8();
                to_rgb8(&DynamicImage::ImageRgba8(rgba))
            } else {
                other.to_rgb8()
            }
        }
    }
}

/// One channel of `src` over opaque white, as PIL's `ImagingAlphaComposite` computes it (7 extra
/// bits of precision, division by 255 through shifts). With an opaque background the output alpha
/// is 255·255, so `coef1 = a·128` exactly.
fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    let (c, a) = (u32::from(c), u32::from(a));
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / (255 * 255);
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_walk_follows_segments_and_scans() {
        // SOI, an APP1 segment holding a stray EOI, SOS with stuffed and restart bytes, EOI.
        let mut jpg = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x06, 0xFF, 0xD9, 0x00, 0x00];
        jpg.extend([
            0xFF, 0xDA, 0x00, 0x03, 0x01, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD3, 0x56,
        ]);
        jpg.extend([0xFF, 0xFF, 0xD9, 0xAA]);
        check_jpeg_complete(&jpg).unwrap();
        for cut in 2..jpg.len() - 1 {
            assert!(
                matches!(check_jpeg_complete(&jpg[..cut]), Err(Error::TruncatedImage(_))),
                "cut at {cut}"
            );
        }
        let mut bad = jpg.clone();
        bad[2] = 0x00;
        assert!(matches!(check_jpeg_complete(&bad), Err(Error::CorruptImage(_))));
    }

    #[test]
    fn over_white_endpoints() {
        // Opaque keeps the colour, transparent gives white, for every colour.
        for c in 0..=255u8 {
            assert_eq!(over_white(c, 255), c);
            assert_eq!(over_white(c, 0), 255);
        }
        // Half alpha of black: 255·(1 − 128/255) ≈ 127.
        assert_eq!(over_white(0, 128), 127);
    }
}
