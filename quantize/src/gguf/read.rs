//! GGUF reader: parses the header of a memory-mapped (or in-memory) file and hands out zero-copy tensor views.
//!
//! Every count and size in the header is checked against the bytes that remain before anything is allocated
//! from it, and every tensor's byte range is checked against the data section, so a corrupt or hostile file
//! gives a [`GgufError`] naming the problem rather than a panic, an abort or a huge allocation.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::types::{Array, GgmlType, TypeTally, Value, ValueType};
use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};

/// What went wrong reading a GGUF file; shown after the file's path.
#[derive(Debug, thiserror::Error)]
pub enum GgufProblem {
    #[error("cannot open or map it: {0}")]
    Io(#[from] std::io::Error),
    #[error("it is empty; it should be a GGUF model file (re-create it with `quarry quantize`)")]
    Empty,
    #[error(
        "not a GGUF file: it starts with {0:?} instead of \"GGUF\"; pass a .gguf model (convert a Hugging Face folder with `quarry quantize`)"
    )]
    BadMagic(String),
    #[error(
        "GGUF version {0} is not supported (only versions 2 and 3); re-convert the model with `quarry quantize`"
    )]
    UnsupportedVersion(u32),
    #[error("the file is truncated: {0} (re-download or re-convert it)")]
    Truncated(String),
    #[error("corrupt header: {0}")]
    Corrupt(String),
    #[error(
        "tensor '{name}' has unknown ggml type id {id}; this file needs a newer engine or is corrupt"
    )]
    UnknownTensorType { name: String, id: u32 },
    #[error(
        "tensor '{name}' ({size} bytes at offset {offset}) extends past the end of the file ({file_len} bytes): the file is truncated or corrupt"
    )]
    TensorOutOfBounds {
        name: String,
        offset: u64,
        size: u64,
        file_len: u64,
    },
}

/// A GGUF read error, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct GgufError {
    pub path: PathBuf,
    pub problem: GgufProblem,
}

/// The bytes behind a GGUF file: a read-only memory map, or a buffer (tests, files built in memory).
#[derive(Debug)]
pub enum Backing {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A byte range of the file that keeps the mapping alive; the runtime's weights are these, never copies.
#[derive(Clone, Debug)]
pub struct MappedBytes {
    backing: Arc<Backing>,
    start: usize,
    len: usize,
}

impl MappedBytes {
    /// Drops this range's pages from the process's memory when they are mapped from the file (the whole pages
    /// inside it), for a caller that has copied the bytes and will not read them again soon: they stop counting
    /// toward the resident set. Nothing is lost: the map is read-only, so a later read loads them from the file
    /// again. Owned buffers are left as they are.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Backing::Mapped(m) = &*self.backing {
            const PAGE: usize = 4096;
            let start = self.start.next_multiple_of(PAGE);
            let end = (self.start + self.len) / PAGE * PAGE;
            if end > start {
                // SAFETY: `DontNeed` on a read-only shared file mapping only drops the process's copies of the
                // pages: every later read sees the file's bytes, which are what the map held. A failure leaves
                // the pages resident, which is harmless.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
                };
            }
        }
    }

    /// A sub-range; `None` when it is not inside this range.
    pub fn slice(&self, start: usize, len: usize) -> Option<MappedBytes> {
        let end = start.checked_add(len)?;
        (end <= self.len).then(|| MappedBytes {
            backing: self.backing.clone(),
            start: self.start + start,
            len,
        })
    }
}

impl Deref for MappedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.backing[self.start..self.start + self.len]
    }
}

/// One tensor's header entry, already checked against the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: the contiguous dimension first (the reverse of the torch shape).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Byte size of the data.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    backing: Arc<Backing>,
    pub version: u32,
    pub alignment: u64,
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

impl GgufFile {
    /// Memory-maps and parses `path`. The mapping is read-only and shared; nothing of the tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let err = |problem| GgufError {
            path: path.to_path_buf(),
            problem,
        };
        let file = File::open(path).map_err(|e| err(GgufProblem::Io(e)))?;
        let len = file.metadata().map_err(|e| err(GgufProblem::Io(e)))?.len();
        if len == 0 {
            return Err(err(GgufProblem::Empty));
        }
        // SAFETY: the map is read-only; the documented hazard is another process shrinking the file while it
        // is mapped (then reads fault). Model files are not edited in place, and every writer of ours renames a
        // finished temporary file over the target, which leaves an existing mapping intact.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| err(GgufProblem::Io(e)))?;
        Self::parse(path.to_path_buf(), Backing::Mapped(map))
    }

    /// Parses a file held in memory; `label` stands in for the path in errors.
    pub fn from_bytes(label: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(label.into(), Backing::Owned(bytes))
    }

    fn parse(path: PathBuf, backing: Backing) -> Result<GgufFile, GgufError> {
        match parse_header(&backing) {
            Ok(h) => {
                let metadata_index = h
                    .metadata
                    .iter()
                    .enumerate()
                    .map(|(i, (k, _))| (k.clone(), i))
                    .collect();
                let tensor_index = h
                    .tensors
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.name.clone(), i))
                    .collect();
                Ok(GgufFile {
                    path,
                    backing: Arc::new(backing),
                    version: h.version,
                    alignment: h.alignment,
                    metadata: h.metadata,
                    metadata_index,
                    tensors: h.tensors,
                    tensor_index,
                    data_offset: h.data_offset,
                })
            }
            Err(problem) => Err(GgufError { path, problem }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_len(&self) -> u64 {
        self.backing.len() as u64
    }

    /// The raw bytes of the whole file (for `madvise`-style pre-faulting and checksums).
    pub fn bytes(&self) -> &[u8] {
        &self.backing
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensors counted per type, in the order the types first appear.
    pub fn type_tallies(&self) -> Vec<TypeTally> {
        TypeTally::of(self.tensors.iter().map(|t| (t.ty, t.n_elements(), t.size)))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's data, borrowed from the mapping (ranges were checked at parse time).
    pub fn tensor_data(&self, info: &TensorInfo) -> MappedBytes {
        MappedBytes {
            backing: self.backing.clone(),
            start: info.offset as usize,
            len: info.size as usize,
        }
    }

    /// An error about this file, for callers that find a problem in its contents (a missing key, a bad shape).
    pub fn error(&self, problem: GgufProblem) -> GgufError {
        GgufError {
            path: self.path.clone(),
            problem,
        }
    }

    /// Tells the kernel the whole file will be read soon, so first-touch page faults overlap with loading.
    #[cfg(unix)]
    pub fn advise_will_need(&self) {
        if let Backing::Mapped(m) = &*self.backing {
            let _ = m.advise(memmap2::Advice::WillNeed);
        }
    }
}

struct Header {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    data_offset: u64,
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufProblem> {
        if n > self.remaining() {
            return Err(GgufProblem::Truncated(format!(
                "{what} needs {n} bytes at offset {} but only {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufProblem> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufProblem> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufProblem> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that is about to size an allocation of elements at least `min_bytes` long each: refused when the
    /// rest of the file could not hold that many.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize, GgufProblem> {
        let n = self.u64(what)?;
        let most = (self.remaining() / min_bytes.max(1)) as u64;
        if n > most {
            return Err(GgufProblem::Corrupt(format!(
                "{what} is {n}, but the {} bytes left in the file can hold at most {most} (truncated or corrupt)",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufProblem> {
        let len = self.count(what, 1)?;
        let bytes = self.take(len, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType, GgufProblem> {
        let id = self.u32(what)?;
        ValueType::from_id(id)
            .ok_or_else(|| GgufProblem::Corrupt(format!("{what}: unknown value type id {id}")))
    }

    fn scalar(&mut self, ty: ValueType, what: &str) -> Result<Value, GgufProblem> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufProblem::Corrupt(format!(
                        "{what}: bool byte {b} is neither 0 nor 1"
                    )));
                }
            },
            ValueType::String => Value::String(self.string(what)?),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Array => self.array_value(what)?,
        })
    }

    fn array_value(&mut self, what: &str) -> Result<Value, GgufProblem> {
        let elem = self.value_type(what)?;
        if elem == ValueType::Array {
            return Err(GgufProblem::Corrupt(format!(
                "{what}: arrays of arrays are not supported"
            )));
        }
        let n = self.count(what, elem.min_encoded_bytes())?;
        macro_rules! collect {
            ($variant:ident) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    match self.scalar(elem, what)? {
                        Value::$variant(x) => v.push(x),
                        _ => unreachable!("scalar() returns the variant of the type it was given"),
                    }
                }
                Array::$variant(v)
            }};
        }
        let array = match elem {
            ValueType::U8 => Array::U8(self.take(n, what)?.to_vec()),
            ValueType::I8 => Array::I8(self.take(n, what)?.iter().map(|&b| b as i8).collect()),
            ValueType::U16 => collect!(U16),
            ValueType::I16 => collect!(I16),
            ValueType::U32 => collect!(U32),
            ValueType::I32 => collect!(I32),
            ValueType::F32 => collect!(F32),
            ValueType::Bool => collect!(Bool),
            ValueType::String => collect!(String),
            ValueType::U64 => collect!(U64),
            ValueType::I64 => collect!(I64),
            ValueType::F64 => collect!(F64),
            ValueType::Array => unreachable!("refused above"),
        };
        Ok(Value::Array(array))
    }
}

fn parse_header(buf: &[u8]) -> Result<Header, GgufProblem> {
    if buf.is_empty() {
        return Err(GgufProblem::Empty);
    }
    let mut c = Cursor { buf, pos: 0 };
    if buf.len() < 4 {
        return Err(GgufProblem::Truncated(format!(
            "only {} bytes, not even the 4-byte magic",
            buf.len()
        )));
    }
    let magic = c.array::<4>("magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufProblem::BadMagic(
            String::from_utf8_lossy(&magic).into_owned(),
        ));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufProblem::UnsupportedVersion(version));
    }
    // A tensor info is at least: name length (8), n_dims (4), one dim (8), type (4), offset (8).
    let n_tensors = c.count("tensor count", 8 + 4 + 8 + 4 + 8)?;
    // A key-value pair is at least: key length (8), type (4), one byte of value.
    let n_kv = c.count("metadata key-value count", 8 + 4 + 1)?;

    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv);
    let mut seen = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.string(&format!("key of metadata entry {i}"))?;
        let ty = c.value_type(&format!("type of metadata '{key}'"))?;
        let value = c.scalar(ty, &format!("metadata '{key}'"))?;
        if seen.insert(key.clone(), i).is_some() {
            return Err(GgufProblem::Corrupt(format!(
                "metadata key '{key}' appears twice"
            )));
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
            _ => {
                return Err(GgufProblem::Corrupt(format!(
                    "general.alignment {} is not a power of two",
                    v.summary()
                )));
            }
        },
    };

    struct RawInfo {
        name: String,
        dims: Vec<u64>,
        ty_id: u32,
        rel_offset: u64,
    }
    let mut raw = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&format!("name of tensor {i}"))?;
        let n_dims = c.u32(&format!("dimension count of tensor '{name}'"))? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufProblem::Corrupt(format!(
                "tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(c.u64(&format!("dimensions of tensor '{name}'"))?);
        }
        let ty_id = c.u32(&format!("type of tensor '{name}'"))?;
        let rel_offset = c.u64(&format!("offset of tensor '{name}'"))?;
        raw.push(RawInfo {
            name,
            dims,
            ty_id,
            rel_offset,
        });
    }

    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    if n_tensors > 0 && data_offset > file_len {
        return Err(GgufProblem::Truncated(format!(
            "the data section should start at byte {data_offset} but the file has {file_len} bytes"
        )));
    }

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashMap::with_capacity(n_tensors);
    for r in raw {
        if names.insert(r.name.clone(), ()).is_some() {
            return Err(GgufProblem::Corrupt(format!(
                "tensor name '{}' appears twice",
                r.name
            )));
        }
        let ty = GgmlType::from_id(r.ty_id).ok_or_else(|| GgufProblem::UnknownTensorType {
            name: r.name.clone(),
            id: r.ty_id,
        })?;
        let corrupt = |msg: String| GgufProblem::Corrupt(format!("tensor '{}': {msg}", r.name));
        let n_elements = r
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| corrupt(format!("dimensions {:?} overflow", r.dims)))?;
        let row = r.dims[0];
        if !row.is_multiple_of(ty.block_len() as u64) {
            let block = ty.block_len();
            return Err(corrupt(format!(
                "a row of {row} {ty} weights is not a whole number of {block}-weight blocks"
            )));
        }
        let row_bytes = ty
            .row_bytes(row)
            .ok_or_else(|| corrupt(format!("dimensions {:?} overflow", r.dims)))?;
        let size = row_bytes
            .checked_mul(n_elements.checked_div(row).unwrap_or(0))
            .ok_or_else(|| corrupt(format!("dimensions {:?} overflow", r.dims)))?;
        if !r.rel_offset.is_multiple_of(alignment) {
            return Err(corrupt(format!(
                "offset {} is not a multiple of the alignment {alignment}",
                r.rel_offset
            )));
        }
        let offset = data_offset.checked_add(r.rel_offset);
        match offset.and_then(|o| o.checked_add(size)) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(GgufProblem::TensorOutOfBounds {
                    name: r.name,
                    offset: data_offset.saturating_add(r.rel_offset),
                    size,
                    file_len,
                });
            }
        }
        tensors.push(TensorInfo {
            name: r.name,
            dims: r.dims,
            ty,
            offset: data_offset + r.rel_offset,
            size,
        });
    }

    check_tensor_layout(&tensors, alignment)?;
    Ok(Header {
        version,
        alignment,
        metadata,
        tensors,
        data_offset,
    })
}

/// Every GGUF writer (llama.cpp's, gguf-py, ours) lays the tensors out back to back, each padded to the
/// alignment, and llama.cpp refuses a file that does not. Two tensors sharing bytes would let a write through
/// one view change the other and says the file is corrupt; a gap wider than the padding means a tensor's type
/// or shape does not describe its bytes (a Q8_0 row read as Q4_0, say), and the model would run on garbage.
fn check_tensor_layout(tensors: &[TensorInfo], alignment: u64) -> Result<(), GgufProblem> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| (t.offset, t.size));
    for pair in by_offset.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let end = a.offset + a.size;
        if end > b.offset {
            return Err(GgufProblem::Corrupt(format!(
                "tensors '{}' (bytes {}..{end}) and '{}' (from byte {}) overlap",
                a.name, a.offset, b.name, b.offset
            )));
        }
        let padded = end.div_ceil(alignment) * alignment;
        if b.offset > padded {
            return Err(GgufProblem::Corrupt(format!(
                "tensor '{}' is {} bytes of {} {:?}, but {} bytes lie between its start and the next tensor '{}': \
                 its type or shape does not match its data",
                a.name,
                a.size,
                a.ty,
                a.dims,
                b.offset - a.offset,
                b.name
            )));
        }
    }
    Ok(())
}
