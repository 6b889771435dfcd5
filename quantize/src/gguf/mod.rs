//! The GGUF container (v3, little-endian): typed metadata, tensor infos, aligned tensor data.
//!
//! Written here rather than taken from a crate: `gguf-rs` (named in the design) truncates tokenizer arrays,
//! mis-sizes BF16 and newer types, copies the whole file on "mmap" and panics on malformed input; the other
//! crates either allocate from unchecked header counts or copy tensors into memory (see README, design notes).

mod read;
mod types;
mod write;

pub use read::{Backing, GgufError, GgufFile, GgufProblem, MappedBytes, TensorInfo};
pub use types::{Array, GgmlType, TypeTally, Value, ValueType, file_type_name};
pub use write::{GgufWriter, TensorSpec};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("granitemoe".into()),
            ),
            ("granitemoe.block_count".to_string(), Value::U32(3)),
            ("granitemoe.attention.scale".to_string(), Value::F32(0.125)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(Array::String(vec!["a".into(), "b".into()])),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(Array::I32(vec![1, 3])),
            ),
            ("flag".to_string(), Value::Bool(true)),
        ];
        let specs = vec![
            TensorSpec::new("a", &[4, 2], GgmlType::F32),
            TensorSpec::new("b", &[32], GgmlType::Q8_0),
        ];
        let mut w = GgufWriter::new(Vec::new(), &meta, specs).unwrap();
        let a: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.write_tensor("a", &a).unwrap();
        w.write_tensor("b", &[7u8; 34]).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let f = GgufFile::from_bytes("mem.gguf", sample()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(
            f.get("general.architecture").and_then(Value::as_str),
            Some("granitemoe")
        );
        assert_eq!(
            f.get("granitemoe.block_count").and_then(Value::as_u64),
            Some(3)
        );
        assert_eq!(
            f.get("granitemoe.attention.scale").and_then(Value::as_f64),
            Some(0.125)
        );
        assert_eq!(f.get("flag").and_then(Value::as_bool), Some(true));
        let types = f
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .unwrap();
        assert_eq!(types.to_i64_vec(), Some(vec![1, 3]));
        let a = f.tensor("a").unwrap();
        assert_eq!(
            (a.dims.clone(), a.ty, a.size),
            (vec![4, 2], GgmlType::F32, 32)
        );
        assert_eq!(a.offset % 32, 0);
        let data = f.tensor_data(a);
        assert_eq!(f32::from_le_bytes(data[28..32].try_into().unwrap()), 7.0);
        let b = f.tensor("b").unwrap();
        assert_eq!(b.offset, a.offset + 32);
        assert!(f.tensor_data(b).iter().all(|&x| x == 7));
    }

    #[test]
    fn tensors_are_tallied_per_type_in_first_seen_order() {
        let f = GgufFile::from_bytes("mem.gguf", sample()).unwrap();
        let tally = |ty, tensors, elements, bytes| TypeTally {
            ty,
            tensors,
            elements,
            bytes,
        };
        assert_eq!(
            f.type_tallies(),
            [
                tally(GgmlType::F32, 1, 8, 32),
                tally(GgmlType::Q8_0, 1, 32, 34)
            ]
        );
        let more = [
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::F32, 4, 16),
            (GgmlType::Q4_0, 64, 36),
        ];
        assert_eq!(
            TypeTally::of(more),
            [
                tally(GgmlType::Q4_0, 2, 96, 54),
                tally(GgmlType::F32, 1, 4, 16)
            ]
        );
    }

    fn problem(bytes: Vec<u8>) -> String {
        GgufFile::from_bytes("bad.gguf", bytes)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn every_truncation_is_an_error() {
        let good = sample();
        let f = GgufFile::from_bytes("x", good.clone()).unwrap();
        let data_end = f.tensors().iter().map(|t| t.offset + t.size).max().unwrap() as usize;
        for len in 0..data_end {
            let msg = problem(good[..len].to_vec());
            assert!(msg.starts_with("bad.gguf: "), "{msg}");
        }
    }

    #[test]
    fn hostile_headers() {
        let good = sample();
        let mut bad = good.clone();
        bad[..4].copy_from_slice(b"GGUX");
        assert!(problem(bad).contains("not a GGUF file"));
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert!(problem(bad).contains("version 7"));
        let mut bad = good.clone();
        bad[8..16].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(problem(bad).contains("tensor count"));
        let mut bad = good.clone();
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(problem(bad).contains("key-value count"));
        // the last tensor's data cut short (its padding is not needed)
        let f = GgufFile::from_bytes("x", good.clone()).unwrap();
        let data_end = f.tensors().iter().map(|t| t.offset + t.size).max().unwrap() as usize;
        let msg = problem(good[..data_end - 1].to_vec());
        assert!(msg.contains("extends past the end"), "{msg}");
    }

    #[test]
    fn unknown_type_id_and_huge_dims() {
        let good = sample();
        let f = GgufFile::from_bytes("x", good.clone()).unwrap();
        // locate tensor b's type field: it follows name "b", n_dims 1, dim 32
        let needle: Vec<u8> = [
            1u64.to_le_bytes().as_slice(),
            b"b",
            &1u32.to_le_bytes(),
            &32u64.to_le_bytes(),
        ]
        .concat();
        let at = good
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
            .unwrap()
            + needle.len();
        let mut bad = good.clone();
        bad[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        assert!(problem(bad).contains("unknown ggml type id 99"));
        let mut bad = good.clone();
        bad[at - 8..at].copy_from_slice(&(!31u64).to_le_bytes());
        let msg = problem(bad);
        assert!(
            msg.contains("extends past") || msg.contains("overflow"),
            "{msg}"
        );
        drop(f);
    }

    #[test]
    fn writer_checks_sizes_and_order() {
        let specs = vec![
            TensorSpec::new("a", &[32], GgmlType::Q4_0),
            TensorSpec::new("b", &[2], GgmlType::F32),
        ];
        let mut w = GgufWriter::new(Vec::new(), &[], specs.clone()).unwrap();
        assert!(w.write_tensor("b", &[0; 8]).is_err());
        assert!(w.write_tensor("a", &[0; 17]).is_err());
        w.write_tensor("a", &[0; 18]).unwrap();
        let w2 = GgufWriter::new(Vec::new(), &[], specs).unwrap();
        assert!(w2.finish().is_err());
        assert!(
            GgufWriter::new(
                Vec::new(),
                &[],
                vec![TensorSpec::new("c", &[24], GgmlType::Q8_0)]
            )
            .is_err()
        );
    }
}
