//! Examples and benchmarks of the Llama 4 workspace live beside this library, which holds what
//! the example binaries share: reading the command line, checking output paths before any
//! work starts, held-out accuracy ([`heldout`]), and components built outside the model crate
//! ([`sliding_window`]).

pub mod heldout;
pub mod sliding_window;

use std::ffi::OsString;
use std::io::ErrorKind;

use llama4_core::input::kind_of;
use std::path::Path;

/// A command-line argument that is not valid UTF-8.
#[derive(Debug)]
pub struct NonUtf8Argument {
    /// Its position (1 is the first after the program name).
    pub index: usize,
    /// The argument as given.
    pub arg: OsString,
}

impl std::fmt::Display for NonUtf8Argument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "argument {} (`{}`) is not valid UTF-8: give flags, values and paths in UTF-8",
            self.index,
            self.arg.to_string_lossy()
        )
    }
}

impl std::error::Error for NonUtf8Argument {}

/// The arguments after the program name, each checked to be UTF-8 (`std::env::args` would
/// panic on the first that is not).
pub fn utf8_args() -> Result<std::vec::IntoIter<String>, NonUtf8Argument> {
    std::env::args_os()
        .skip(1)
        .enumerate()
        .map(|(i, a)| {
            a.into_string()
                .map_err(|arg| NonUtf8Argument { index: i + 1, arg })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Vec::into_iter)
}

/// The exit status of an example: on error, `error: ` and the message (not its `Debug` form)
/// on stderr, and failure.
pub fn report(result: Result<(), Box<dyn std::error::Error>>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Checks that `path`, given with `flag`, can be written as a file: it is not a directory,
/// FIFO or device, not read-only, and its directory exists. Run before any work, so a long
/// generation does not end in a write error.
pub fn check_output_file(flag: &str, path: &Path) -> Result<(), String> {
    let fail = |why: String| Err(format!("{flag} {}: {why}", path.display()));
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return fail(format!("is {}, not a file to write", kind_of(&m)));
        }
        Ok(m) if m.permissions().readonly() => return fail("is read-only".into()),
        Ok(_) => return Ok(()),
        // Absent, or under something that is not a directory: the parent says which.
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {}
        Err(e) => return fail(e.to_string()),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(parent) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) => fail(format!(
            "{} is {}, not a directory",
            parent.display(),
            kind_of(&m)
        )),
        Err(_) => fail(format!("directory {} does not exist", parent.display())),
    }
}

/// Checks that `path`, given with `flag`, can be a directory to write into: it is a directory
/// or does not exist yet, and its nearest existing ancestor is a directory.
pub fn check_output_dir(flag: &str, path: &Path) -> Result<(), String> {
    let fail = |why: String| Err(format!("{flag} {}: {why}", path.display()));
    for ancestor in path.ancestors().filter(|a| !a.as_os_str().is_empty()) {
        match std::fs::metadata(ancestor) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(m) if ancestor == path => return fail(format!("is {}, not a directory", kind_of(&m))),
            Ok(m) => {
                return fail(format!(
                    "{} is {}, not a directory",
                    ancestor.display(),
                    kind_of(&m)
                ))
            }
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => continue,
            Err(e) => return fail(e.to_string()),
        }
    }
    // A relative path whose every component is new: it goes in the working directory.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_paths_are_checked_before_work() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let file = d.join("f");
        std::fs::write(&file, b"x").unwrap();
        check_output_file("--dump-logits", &d.join("new.safetensors")).unwrap();
        check_output_file("--dump-logits", &file).unwrap();
        let err = check_output_file("--dump-logits", d).unwrap_err();
        assert!(
            err.starts_with("--dump-logits ") && err.contains("directory"),
            "{err}"
        );
        let err = check_output_file("--dump-logits", &d.join("no/such/x")).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        let err = check_output_file("--dump-logits", &file.join("x")).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");

        check_output_dir("--save-quantized", d).unwrap();
        check_output_dir("--save-quantized", &d.join("a/b/c")).unwrap();
        let err = check_output_dir("--save-quantized", &file).unwrap_err();
        assert!(err.contains("regular file, not a directory"), "{err}");
        let err = check_output_dir("--save-quantized", &file.join("sub")).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
    }
}
