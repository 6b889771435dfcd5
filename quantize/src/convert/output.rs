//! The output file is written as `OUT.part` beside `OUT` and renamed over it only when complete and synced, so an
//! interrupted or failed conversion never leaves a truncated file under the real name (nor replaces a good one).
//! [`write_gguf`] is the one place both the converter and `synth` write a file through.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use super::plan::PlannedTensor;
use crate::error::ConvertError;
use crate::gguf::{GgufWriter, TensorSpec, Value};

/// Where a tensor's bytes go: the GGUF writer of the part file, and the progress bar.
pub struct TensorSink<'a> {
    writer: &'a mut GgufWriter<BufWriter<File>>,
    part: &'a Path,
    bar: &'a ProgressBar,
}

impl TensorSink<'_> {
    /// Appends `bytes` (encoding `values` weights) to the tensor being written.
    pub fn write(&mut self, bytes: &[u8], values: u64) -> Result<(), ConvertError> {
        self.writer
            .write_data(bytes)
            .map_err(|source| ConvertError::Write {
                path: self.part.to_path_buf(),
                source,
            })?;
        self.bar.inc(values);
        Ok(())
    }
}

/// Writes `output` (through `output.part`): the header from `metadata` and the plan, then each planned tensor's
/// data, which `tensor_data` streams into the sink it is given, in plan order. Returns the file's size.
pub fn write_gguf(
    output: &Path,
    metadata: Vec<(String, Value)>,
    tensors: &[PlannedTensor],
    progress: bool,
    mut tensor_data: impl FnMut(&PlannedTensor, &mut TensorSink<'_>) -> Result<(), ConvertError>,
) -> Result<u64, ConvertError> {
    let specs = tensors
        .iter()
        .map(|t| TensorSpec::new(t.name.clone(), &t.dims, t.ty))
        .collect();
    let (part, file) = PartFile::create(output)?;
    let write_error = |source| ConvertError::Write {
        path: part.path().to_path_buf(),
        source,
    };
    let mut writer = GgufWriter::new(BufWriter::with_capacity(8 << 20, file), &metadata, specs)
        .map_err(write_error)?;
    // The tokenizer arrays are the largest part of the metadata; they are in the file now.
    drop(metadata);
    let bar = progress_bar(
        progress,
        tensors.iter().map(PlannedTensor::n_elements).sum(),
    );
    for tensor in tensors {
        bar.set_message(tensor.name.clone());
        let mut sink = TensorSink {
            writer: &mut writer,
            part: part.path(),
            bar: &bar,
        };
        tensor_data(tensor, &mut sink)?;
    }
    bar.finish_and_clear();
    let file = writer
        .finish()
        .and_then(|buffered| buffered.into_inner().map_err(|e| e.into_error()))
        .map_err(write_error)?;
    let bytes = file.metadata().map(|m| m.len()).map_err(write_error)?;
    part.commit(file)?;
    Ok(bytes)
}

fn progress_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:30!} [{bar:40}] {percent:>3}% {elapsed_precise} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

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
