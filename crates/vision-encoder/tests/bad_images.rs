//! Hostile and broken inputs: each is rejected with its own error variant, never a panic, and
//! the oversized one before any pixel memory is allocated.

mod common;

use common::fixtures;
use vision_encoder::image::DynamicImage;
use vision_encoder::{decode_image, load_image, Error, ImageProcessor, ProcessorConfig, MAX_PIXELS};

/// CRC-32 (IEEE), as PNG chunks need.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// A PNG signature and a valid IHDR for an 8-bit RGB image of `width × height`, then `rest`.
fn png_with_header(width: u32, height: u32, rest: &[u8]) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(chunk(b"IHDR", &ihdr));
    out.extend_from_slice(rest);
    out
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).expect("fixture image")
}

#[test]
fn crc_helper_matches_a_real_png() {
    // The fixture PNG's IHDR CRC (bytes 29..33) must equal ours, or the crafted headers below
    // would test CRC checking rather than what they claim.
    let png = fixture_bytes("wide.png");
    let stored = u32::from_be_bytes(png[29..33].try_into().unwrap());
    assert_eq!(crc32(&png[12..29]), stored);
}

#[test]
fn oversized_image_rejected_from_its_header() {
    // 20000 × 20000 = 400 MP with a few bytes of pixel data: only the header can have been
    // read. (The PNG reader wants to see the first IDAT before it reports dimensions.)
    let mut rest = chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
    rest.extend(chunk(b"IEND", &[]));
    let bytes = png_with_header(20_000, 20_000, &rest);
    match decode_image(&bytes) {
        Err(Error::ImageTooLarge {
            width,
            height,
            max_pixels,
        }) => assert_eq!((width, height, max_pixels), (20_000, 20_000, MAX_PIXELS)),
        other => panic!("expected ImageTooLarge, got {other:?}"),
    }
    // Just over the limit in one dimension's product, too.
    let bytes = png_with_header(10_001, 10_000, &rest);
    assert!(matches!(decode_image(&bytes), Err(Error::ImageTooLarge { .. })));
}

#[test]
fn zero_size_image_rejected() {
    let bytes = png_with_header(0, 10, &chunk(b"IEND", &[]));
    let err = decode_image(&bytes).unwrap_err();
    // The PNG decoder itself refuses a zero dimension in IHDR; either way it is reported as an
    // empty or corrupt image, never decoded.
    assert!(
        matches!(err, Error::EmptyImage { .. } | Error::CorruptImage(_)),
        "got {err:?}"
    );
    // An empty image handed to the processor directly.
    let processor = ImageProcessor::new(ProcessorConfig::default()).unwrap();
    let err = processor.process(&DynamicImage::new_rgb8(0, 5)).unwrap_err();
    assert!(
        matches!(err, Error::EmptyImage { width: 0, height: 5 }),
        "got {err:?}"
    );
}

#[test]
fn truncated_png_rejected() {
    let png = fixture_bytes("odd_noise.png");
    for cut in [png.len() / 2, png.len() - 20, 40] {
        let err = decode_image(&png[..cut]).unwrap_err();
        assert!(matches!(err, Error::TruncatedImage(_)), "cut at {cut}: {err:?}");
    }
}

#[test]
fn corrupt_bytes_rejected() {
    // Not an image at all.
    let err = decode_image(b"definitely not an image, just some text bytes").unwrap_err();
    assert!(matches!(err, Error::UnknownImageFormat), "{err:?}");
    // A GIF signature: recognised, not supported.
    let err = decode_image(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap_err();
    assert!(matches!(err, Error::UnsupportedImageFormat { .. }), "{err:?}");
    // A valid PNG header followed by garbage where the chunks should be.
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 97 % 251) as u8).collect();
    let err = decode_image(&png_with_header(16, 16, &garbage)).unwrap_err();
    assert!(
        matches!(err, Error::CorruptImage(_) | Error::TruncatedImage(_)),
        "{err:?}"
    );
    // A real PNG with its compressed data damaged (CRC left stale).
    let mut png = fixture_bytes("exact_tile.png");
    let idat = png.windows(4).position(|w| w == b"IDAT").expect("IDAT");
    for b in &mut png[idat + 10..idat + 30] {
        *b ^= 0x5A;
    }
    let err = decode_image(&png).unwrap_err();
    assert!(matches!(err, Error::CorruptImage(_)), "{err:?}");
}

#[test]
fn truncated_jpeg_rejected() {
    let jpg = fixture_bytes("photo_like.jpg");
    assert!(decode_image(&jpg).is_ok());
    // Only a header, or cut inside the scan (the decoder alone would fill the missing rows),
    // or just the end-of-image marker missing.
    for cut in [200, jpg.len() / 2, jpg.len() * 2 / 3, jpg.len() - 2] {
        let err = decode_image(&jpg[..cut]).unwrap_err();
        assert!(matches!(err, Error::TruncatedImage(_)), "cut at {cut}: {err:?}");
    }
    // Bytes after the end-of-image marker are ignored, as by every decoder.
    let mut padded = jpg.clone();
    padded.extend_from_slice(b"trailing");
    assert!(decode_image(&padded).is_ok());
}

#[test]
fn png_without_its_end_chunk_rejected() {
    let png = fixture_bytes("exact_tile.png");
    assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
    let err = decode_image(&png[..png.len() - 12]).unwrap_err();
    assert!(matches!(err, Error::TruncatedImage(_)), "{err:?}");
}

#[cfg(unix)]
#[test]
fn image_paths_that_are_not_regular_files_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let zero = dir.path().join("zero.png");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    for path in [zero.as_path(), dir.path()] {
        let err = load_image(path).unwrap_err();
        assert!(
            matches!(err, Error::Core(llama4_core::Error::NotRegularFile { .. })),
            "{err:?}"
        );
    }
}

#[test]
fn missing_file_is_an_io_error() {
    let err = load_image(fixtures().join("images/no_such_file.png")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
}

#[test]
fn grey_and_rgba_are_converted_to_rgb() {
    let grey = load_image(fixtures().join("images/grey.png")).unwrap();
    assert!(matches!(grey, DynamicImage::ImageLuma8(_)));
    let rgb = vision_encoder::to_rgb8(&grey);
    assert!(rgb.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    let rgba = load_image(fixtures().join("images/rgba.png")).unwrap();
    assert!(matches!(rgba, DynamicImage::ImageRgba8(_)));
    let rgb = vision_encoder::to_rgb8(&rgba);
    // The fixture's first 8 rows are fully transparent: white after compositing.
    assert!((0..rgb.width()).all(|x| rgb.get_pixel(x, 0).0 == [255, 255, 255]));
}
