//! The output file is written as `OUT.part` beside `OUT` and renamed over it only when complete and synced, so an
//! interrupted or failed conversion never leaves a truncated file under the real name (nor replaces a good one).

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::ConvertError;

/// The `.part` file being written; removed on drop unless [`PartFile::commit`] succeeded.
pub struct PartFile {
    part: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl PartFile {
    /// Creates (or truncates a stale) `target.part` and returns the open file.
    pub fn create(target: &Path) -> Result<(PartFile, File), ConvertError> {
        let Some(file_name) = target.file_name() else {
            return Err(ConvertError::Write {
                path: target.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the output path names no file",
                ),
            });
        };
        let mut part_name = file_name.to_os_string();
        part_name.push(".part");
        let part = target.with_file_name(part_name);
        let file = File::create(&part).map_err(|source| ConvertError::Write {
            path: part.clone(),
            source,
        })?;
        Ok((
            PartFile {
                part,
                target: target.to_path_buf(),
                committed: false,
            },
            file,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.part
    }

    /// Syncs `file` (the handle from [`PartFile::create`], fully written) and renames the part file to the target.
    pub fn commit(mut self, file: File) -> Result<(), ConvertError> {
        file.sync_all().map_err(|source| ConvertError::Write {
            path: self.part.clone(),
            source,
        })?;
        drop(file);
        std::fs::rename(&self.part, &self.target).map_err(|source| ConvertError::Write {
            path: self.target.clone(),
            source,
        })?;
        self.committed = true;
        // Make the rename itself durable. Best effort: not every platform or file system can sync a directory.
        if let Some(dir) = self.target.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(handle) = File::open(dir)
        {
            let _ = handle.sync_all();
        }
        Ok(())
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn dropped_part_is_removed_and_committed_part_is_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m.gguf");
        let (part, mut file) = PartFile::create(&target).unwrap();
        assert_eq!(part.path(), dir.path().join("m.gguf.part"));
        file.write_all(b"half").unwrap();
        drop(part);
        assert!(!dir.path().join("m.gguf.part").exists() && !target.exists());

        let (part, mut file) = PartFile::create(&target).unwrap();
        file.write_all(b"whole").unwrap();
        part.commit(file).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        assert!(!dir.path().join("m.gguf.part").exists());
    }

    #[test]
    fn failed_rename_removes_the_part() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"x").unwrap();
        let (part, file) = PartFile::create(&target).unwrap();
        let err = part.commit(file).unwrap_err().to_string();
        assert!(err.contains("cannot write the output"), "{err}");
        assert!(!dir.path().join("out.part").exists());
    }
}
