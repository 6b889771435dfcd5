//! Text files people hand to quarry (a saved conversation, a text to score), read with bounds: a regular file
//! only (a device such as `/dev/zero` or a FIFO would be read forever, a directory is not text), no larger than
//! its purpose needs, checked before the first byte is read and again while reading (the file may grow).

use std::io::Read;
use std::path::Path;

/// A conversation file (`/load`, `tokenize --chat`): 128k tokens of chat are well under 1 MiB of JSON.
pub const MAX_CONVERSATION_BYTES: u64 = 32 << 20;

/// A text to score (`perplexity --file`): wikitext-103's whole test set is about 1.3 MiB.
pub const MAX_SCORED_TEXT_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path} is {kind}, not a regular file; give the path of a {what}")]
    NotAFile {
        path: String,
        kind: &'static str,
        what: &'static str,
    },
    #[error(
        "{path} is larger than {limit} bytes, more than a {what} can be; is it the right file?"
    )]
    TooLarge {
        path: String,
        limit: u64,
        what: &'static str,
    },
    #[error("{path} is not UTF-8 text (a {what} must be): invalid byte at offset {offset}")]
    NotText {
        path: String,
        what: &'static str,
        offset: usize,
    },
}

/// The whole of `path` as UTF-8 text, if it is a regular file of at most `limit` bytes; `what` names the file's
/// purpose in the errors ("conversation file").
pub fn read_text(path: &Path, limit: u64, what: &'static str) -> Result<String, InputError> {
    let shown = path.display().to_string();
    let io = |error| InputError::Io {
        path: shown.clone(),
        error,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "a device, pipe or socket"
        };
        return Err(InputError::NotAFile {
            path: shown,
            kind,
            what,
        });
    }
    let too_large = || InputError::TooLarge {
        path: shown.clone(),
        limit,
        what,
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|e| InputError::NotText {
        path: shown.clone(),
        what,
        offset: e.utf8_error().valid_up_to(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_large_and_binary_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("quarry-input-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = read_text(Path::new("/dev/zero"), 100, "conversation file").unwrap_err();
        assert!(matches!(err, InputError::NotAFile { .. }), "{err}");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = read_text(&dir, 100, "conversation file").unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        let big = dir.join("big.json");
        std::fs::write(&big, vec![b'x'; 101]).unwrap();
        let err = read_text(&big, 100, "conversation file").unwrap_err();
        assert!(
            matches!(err, InputError::TooLarge { limit: 100, .. }),
            "{err}"
        );
        let bin = dir.join("bin.json");
        std::fs::write(&bin, [0xff, 0xfe, 0x00]).unwrap();
        let err = read_text(&bin, 100, "conversation file").unwrap_err();
        assert!(matches!(err, InputError::NotText { .. }), "{err}");
        let ok = dir.join("ok.json");
        std::fs::write(&ok, "[]").unwrap();
        assert_eq!(read_text(&ok, 100, "conversation file").unwrap(), "[]");
        let err = read_text(&dir.join("missing.json"), 100, "conversation file").unwrap_err();
        assert!(err.to_string().contains("No such file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
