//! GGUF v3 writer: the header first (all tensor sizes are known from shapes and types), then each tensor's data
//! streamed in header order, so a converter never holds more than the tensor it is working on.

use std::io::{self, Write};

use super::types::{Array, GgmlType, Value};
use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// A tensor as the header declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    /// ggml order: contiguous dimension first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dims: &[u64], ty: GgmlType) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
        }
    }

    /// Data size in bytes; `None` when the rows are not whole blocks of `ty`.
    pub fn size(&self) -> Option<u64> {
        let rows: u64 = self.dims[1..].iter().product();
        self.ty.row_bytes(self.dims[0]).map(|r| r * rows)
    }
}

/// Streams one GGUF file: [`GgufWriter::new`] writes the header, then [`GgufWriter::write_tensor`] (or
/// `begin_tensor` + `write_data` pieces) for every tensor in the declared order, then [`GgufWriter::finish`].
pub struct GgufWriter<W: Write> {
    out: W,
    specs: Vec<TensorSpec>,
    sizes: Vec<u64>,
    /// Index of the tensor being written (== specs.len() when all are done).
    current: usize,
    /// Bytes of the current tensor written so far.
    current_written: u64,
    alignment: u64,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn padding(len: u64, alignment: u64) -> usize {
    (len.div_ceil(alignment) * alignment - len) as usize
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header. `metadata` should not contain `general.alignment` unless it is the default 32.
    pub fn new(
        mut out: W,
        metadata: &[(String, Value)],
        specs: Vec<TensorSpec>,
    ) -> io::Result<GgufWriter<W>> {
        let alignment = DEFAULT_ALIGNMENT;
        let mut sizes = Vec::with_capacity(specs.len());
        for s in &specs {
            let size = s.size().ok_or_else(|| {
                invalid(format!(
                    "tensor '{}': rows of {} are not whole {} blocks",
                    s.name, s.dims[0], s.ty
                ))
            })?;
            sizes.push(size);
        }
        let mut header = Vec::new();
        header.extend_from_slice(&GGUF_MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(specs.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut header, key);
            header.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut header, value);
        }
        let mut offset = 0u64;
        for (s, &size) in specs.iter().zip(&sizes) {
            put_string(&mut header, &s.name);
            header.extend_from_slice(&(s.dims.len() as u32).to_le_bytes());
            for d in &s.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&s.ty.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset += size + padding(size, alignment) as u64;
        }
        let pad = padding(header.len() as u64, alignment);
        header.resize(header.len() + pad, 0);
        out.write_all(&header)?;
        Ok(GgufWriter {
            out,
            specs,
            sizes,
            current: 0,
            current_written: 0,
            alignment,
        })
    }

    /// The tensor whose data is expected next.
    pub fn next_tensor(&self) -> Option<&TensorSpec> {
        self.specs.get(self.current)
    }

    /// Appends bytes to the current tensor; when its declared size is reached it is padded and the writer moves on.
    pub fn write_data(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(spec) = self.specs.get(self.current) else {
            return Err(invalid(
                "tensor data written after the last declared tensor".into(),
            ));
        };
        let size = self.sizes[self.current];
        if self.current_written + bytes.len() as u64 > size {
            return Err(invalid(format!(
                "tensor '{}': {} bytes written, more than its declared {size}",
                spec.name,
                self.current_written + bytes.len() as u64
            )));
        }
        self.out.write_all(bytes)?;
        self.current_written += bytes.len() as u64;
        if self.current_written == size {
            let pad = padding(size, self.alignment);
            self.out.write_all(&[0u8; 64][..pad])?;
            self.current += 1;
            self.current_written = 0;
        }
        Ok(())
    }

    /// Writes the whole data of the tensor named `name`, which must be the next one declared.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        match self.specs.get(self.current) {
            Some(s) if s.name == name && self.current_written == 0 => {}
            Some(s) => {
                return Err(invalid(format!(
                    "tensor '{name}' written where '{}' was expected",
                    s.name
                )));
            }
            None => return Err(invalid(format!("tensor '{name}' was not declared"))),
        }
        let size = self.sizes[self.current];
        if bytes.len() as u64 != size {
            return Err(invalid(format!(
                "tensor '{name}': {} bytes, declared {size}",
                bytes.len()
            )));
        }
        if size == 0 {
            self.current += 1;
            return Ok(());
        }
        self.write_data(bytes)
    }

    /// Checks every declared tensor was written and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        if let Some(s) = self.specs.get(self.current) {
            return Err(invalid(format!(
                "tensor '{}' and later ones were never written",
                s.name
            )));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_string(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => {
            out.extend_from_slice(&a.element_type().id().to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            match a {
                Array::U8(v) => out.extend_from_slice(v),
                Array::I8(v) => v.iter().for_each(|x| out.push(*x as u8)),
                Array::U16(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::I16(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::U32(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::I32(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::F32(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::Bool(v) => v.iter().for_each(|x| out.push(*x as u8)),
                Array::String(v) => v.iter().for_each(|s| put_string(out, s)),
                Array::U64(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::I64(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::F64(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            }
        }
    }
}
