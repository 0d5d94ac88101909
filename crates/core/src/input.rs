//! Opening files a user hands us (configs, tokenizers, indexes, images, weights) so that no file
//! can block, or be read without bound: anything but a regular file is refused before it is
//! opened, and reads stop at a cap named in the error.
//!
//! A FIFO would block `open` until a writer appears, a device such as `/dev/zero` never ends, a
//! directory or a symbolic-link loop is not a file at all: each is [`Error::NotRegularFile`]
//! naming the path and what it is, never "missing" and never a hang. (The type is checked with
//! `stat` before `open`, and again on the opened file; a file swapped for a FIFO between the two
//! by another process can still block the `open`.)

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Largest JSON file read (config.json, preprocessor_config.json, generation_config.json,
/// tokenizer.json, the safetensors index): 256 MiB. Real ones are a few KB, and tokenizer.json
/// a few tens of MB.
pub const MAX_JSON_BYTES: u64 = 256 << 20;

/// Largest image file read: 512 MiB (a 100-megapixel PNG, the pixel limit of the image
/// decoder, compresses to well under this).
pub const MAX_IMAGE_BYTES: u64 = 512 << 20;

/// Largest plain-text file read (a default prompt): 16 MiB.
pub const MAX_TEXT_BYTES: u64 = 16 << 20;

/// A cap on the bytes read from one file, with the name it goes by in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// The limit in bytes.
    pub bytes: u64,
    /// Its name (the constant's), for messages.
    pub name: &'static str,
}

impl Cap {
    /// [`MAX_JSON_BYTES`].
    pub const JSON: Cap = Cap {
        bytes: MAX_JSON_BYTES,
        name: "MAX_JSON_BYTES",
    };
    /// [`MAX_IMAGE_BYTES`].
    pub const IMAGE: Cap = Cap {
        bytes: MAX_IMAGE_BYTES,
        name: "MAX_IMAGE_BYTES",
    };
    /// [`MAX_TEXT_BYTES`].
    pub const TEXT: Cap = Cap {
        bytes: MAX_TEXT_BYTES,
        name: "MAX_TEXT_BYTES",
    };
}

/// What is at a path, for callers that treat an absent file as "not given".
#[derive(Debug)]
pub enum Probe {
    /// Nothing is there (not even a dangling link).
    Absent,
    /// A regular file (possibly through symbolic links), with its metadata.
    File(Metadata),
    /// A directory.
    Dir,
}

/// What is at `path`: [`Probe::Absent`], a regular file or a directory; anything else
/// (FIFO, socket, device, a link that dangles or loops) is [`Error::NotRegularFile`].
/// Never opens the path, so never blocks.
pub fn probe(path: &Path) -> Result<Probe> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(Probe::File(m)),
        Ok(m) if m.is_dir() => Ok(Probe::Dir),
        Ok(m) => Err(not_regular(path, kind_of(&m))),
        Err(e) => match std::fs::symlink_metadata(path) {
            // The entry exists but cannot be followed: a dangling link or a loop.
            Ok(link) if link.file_type().is_symlink() => Err(not_regular(
                path,
                format!("a symbolic link that cannot be followed ({e})"),
            )),
            Ok(_) => Err(io(e)),
            Err(e2) if e2.kind() == std::io::ErrorKind::NotFound => Ok(Probe::Absent),
            Err(_) => Err(io(e)),
        },
    }
}

/// Opens `path` for reading if it is a regular file; its length is returned with it.
///
/// # Errors
/// [`Error::NotRegularFile`] for a directory, FIFO, socket, device or an unfollowable link
/// (checked before opening, so a FIFO never blocks); [`Error::Io`] when it is absent or
/// cannot be opened.
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    match probe(path)? {
        Probe::File(_) => {}
        Probe::Dir => return Err(not_regular(path, "a directory".into())),
        Probe::Absent => return Err(io(std::io::ErrorKind::NotFound.into())),
    }
    let file = File::open(path).map_err(io)?;
    // Checked again on what was opened: the path may have changed since.
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(not_regular(path, kind_of(&meta)));
    }
    Ok((file, meta.len()))
}

/// The bytes of the regular file `path`, at most `cap.bytes` of them.
///
/// # Errors
/// As [`open_regular`], and [`Error::InputTooLarge`] naming the cap when the file is longer
/// (known from its length before anything is read, or found while reading a file that grows).
pub fn read_capped(path: &Path, cap: Cap) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    let too_large = |bytes| Error::InputTooLarge {
        path: path.to_path_buf(),
        bytes,
        limit: cap.bytes,
        limit_name: cap.name,
    };
    if len > cap.bytes {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(cap.bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > cap.bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_capped`] with [`Cap::JSON`], or `None` when nothing is at `path` (an optional file).
pub fn read_optional_json(path: &Path) -> Result<Option<Vec<u8>>> {
    match probe(path)? {
        Probe::Absent => Ok(None),
        _ => read_capped(path, Cap::JSON).map(Some),
    }
}

fn not_regular(path: &Path, what: String) -> Error {
    Error::NotRegularFile {
        path: path.to_path_buf(),
        what,
    }
}

/// What a file is, in words ("a directory", "a FIFO (named pipe)", …), for messages.
pub fn kind_of(m: &Metadata) -> String {
    let t = m.file_type();
    if t.is_dir() {
        return "a directory".into();
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)".into();
        }
        if t.is_char_device() {
            return "a character device".into();
        }
        if t.is_block_device() {
            return "a block device".into();
        }
        if t.is_socket() {
            return "a socket".into();
        }
    }
    if t.is_file() {
        return "a regular file".into();
    }
    "not a regular file".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_read_and_caps_hold() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        std::fs::write(&p, b"{}").unwrap();
        assert_eq!(read_capped(&p, Cap::JSON).unwrap(), b"{}");
        let tiny = Cap {
            bytes: 1,
            name: "TINY",
        };
        match read_capped(&p, tiny) {
            Err(Error::InputTooLarge {
                bytes: 2,
                limit: 1,
                limit_name: "TINY",
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(probe(&dir.path().join("none")), Ok(Probe::Absent)));
        assert!(read_optional_json(&dir.path().join("none")).unwrap().is_none());
        assert!(matches!(
            read_capped(&dir.path().join("none"), Cap::JSON),
            Err(Error::Io { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn fifos_devices_directories_and_link_loops_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        let looped = dir.path().join("a");
        std::os::unix::fs::symlink(dir.path().join("b"), &looped).unwrap();
        std::os::unix::fs::symlink(&looped, dir.path().join("b")).unwrap();
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let mut cases = vec![
            (dir.path().to_path_buf(), "directory"),
            (looped, "symbolic link"),
            (zero, "character device"),
        ];
        if made.is_ok_and(|s| s.success()) {
            cases.push((fifo, "FIFO"));
        }
        for (path, word) in cases {
            match read_capped(&path, Cap::JSON) {
                Err(e @ Error::NotRegularFile { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(word), "{text}");
                    assert!(text.contains(&path.display().to_string()), "{text}");
                }
                other => panic!("{}: {other:?}", path.display()),
            }
        }
    }
}
