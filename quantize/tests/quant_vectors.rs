//! Every row of the Q8_0 / Q4_0 test vectors (made with gguf-py and checked against ggml's C code): our reference
//! quantizers must give the same bytes, and our dequantizers the same f32 bits.

mod support;

use std::path::Path;

use quarry_quantize::blocks::{
    BlockQ4_0, BlockQ8_0, dequantize_q4_0, dequantize_q8_0, quantize_q4_0, quantize_q8_0,
};

struct Row {
    name: String,
    input: Vec<f32>,
}

fn rows(dir: &Path) -> Vec<Row> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let rows = manifest["rows"].as_array().expect("manifest rows");
    rows.iter()
        .map(|r| {
            let name = r["name"].as_str().unwrap().to_string();
            let input = support::read_npy_f32(&dir.join(r["input"].as_str().unwrap()));
            assert_eq!(
                input.shape,
                vec![r["n"].as_u64().unwrap() as usize],
                "{name}"
            );
            Row {
                name,
                input: input.values,
            }
        })
        .collect()
}

fn vectors_dir() -> std::path::PathBuf {
    support::fixtures().join("quant-vectors")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Dequantized values compared bit for bit, so that the sign of zero counts too.
fn assert_same_bits(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g:e} vs {w:e}");
    }
}

#[test]
fn q8_0_matches_every_row() {
    let dir = vectors_dir();
    let rows = rows(&dir);
    assert_eq!(rows.len(), 17, "every row of the manifest is checked");
    for row in rows {
        let want = std::fs::read(dir.join(format!("{}.q8_0.bin", row.name))).unwrap();
        let mut blocks = vec![
            BlockQ8_0 {
                d: half::f16::ZERO,
                qs: [0; 32]
            };
            row.input.len() / 32
        ];
        quantize_q8_0(&row.input, &mut blocks);
        let got: &[u8] = bytemuck::cast_slice(&blocks);
        assert!(
            got == want.as_slice(),
            "{}: Q8_0 bytes\n got {}\nwant {}",
            row.name,
            hex(got),
            hex(&want)
        );

        let expected_blocks: Vec<BlockQ8_0> = want
            .chunks_exact(34)
            .map(bytemuck::pod_read_unaligned)
            .collect();
        let mut values = vec![0.0f32; row.input.len()];
        dequantize_q8_0(&expected_blocks, &mut values);
        let want_values =
            support::read_npy_f32(&dir.join(format!("{}.q8_0.dequant.f32.npy", row.name)));
        assert_same_bits(&row.name, &values, &want_values.values);
    }
}

#[test]
fn q4_0_matches_every_row() {
    let dir = vectors_dir();
    let rows = rows(&dir);
    assert_eq!(rows.len(), 17);
    let mut c_semantics_rows = 0;
    for row in rows {
        // Where ggml's C code and gguf-py disagree (an all-zero block led by -0.0), follow the C code: it is what
        // llama-quantize writes.
        let c_bin = dir.join(format!("{}.q4_0.ggml_c.bin", row.name));
        let want = if c_bin.exists() {
            c_semantics_rows += 1;
            std::fs::read(c_bin).unwrap()
        } else {
            std::fs::read(dir.join(format!("{}.q4_0.bin", row.name))).unwrap()
        };
        let mut blocks = vec![
            BlockQ4_0 {
                d: half::f16::ZERO,
                qs: [0; 16]
            };
            row.input.len() / 32
        ];
        quantize_q4_0(&row.input, &mut blocks);
        let got: &[u8] = bytemuck::cast_slice(&blocks);
        assert!(
            got == want.as_slice(),
            "{}: Q4_0 bytes\n got {}\nwant {}",
            row.name,
            hex(got),
            hex(&want)
        );

        // The dequantized file was made from gguf-py's bytes; dequantize those.
        let py_bytes = std::fs::read(dir.join(format!("{}.q4_0.bin", row.name))).unwrap();
        let expected_blocks: Vec<BlockQ4_0> = py_bytes
            .chunks_exact(18)
            .map(bytemuck::pod_read_unaligned)
            .collect();
        let mut values = vec![0.0f32; row.input.len()];
        dequantize_q4_0(&expected_blocks, &mut values);
        let want_values =
            support::read_npy_f32(&dir.join(format!("{}.q4_0.dequant.f32.npy", row.name)));
        assert_same_bits(&row.name, &values, &want_values.values);
    }
    assert_eq!(c_semantics_rows, 1, "the -0.0 corner case row is present");
}

/// A plain re-derivation of both formats from their definitions, over many random blocks: catches a regression in
/// inputs the fixed rows do not cover (and would catch `mul_add` creeping into Q4_0 on bf16-like values).
#[test]
fn agrees_with_a_straightforward_rederivation() {
    let mut next = support::ggml_vectors::xorshift(0x9E37_79B9_7F4A_7C15);
    for block in 0..20_000 {
        let scale = 10f32.powi((next() % 10) as i32 - 6);
        let x: Vec<f32> = (0..32)
            .map(|_| {
                let u = (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let v = u * scale;
                if block % 2 == 0 {
                    f32::from_bits(v.to_bits() & 0xFFFF_0000)
                } else {
                    v
                }
            })
            .collect();

        let mut q8 = [BlockQ8_0 {
            d: half::f16::ZERO,
            qs: [0; 32],
        }];
        quantize_q8_0(&x, &mut q8);
        let amax = x.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        assert_eq!(q8[0].d, half::f16::from_f32(d));
        for (j, v) in x.iter().enumerate() {
            assert_eq!(q8[0].qs[j], (v * id).round() as i8, "block {block} q8 {j}");
        }

        let mut q4 = [BlockQ4_0 {
            d: half::f16::ZERO,
            qs: [0; 16],
        }];
        quantize_q4_0(&x, &mut q4);
        let first_max = x
            .iter()
            .copied()
            .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let d = first_max / -8.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        assert_eq!(q4[0].d, half::f16::from_f32(d));
        for j in 0..16 {
            let lo = ((x[j] * id + 8.5).trunc() as u8).min(15);
            let hi = ((x[j + 16] * id + 8.5).trunc() as u8).min(15);
            assert_eq!(q4[0].qs[j], lo | (hi << 4), "block {block} q4 {j}");
        }
    }
}

#[test]
fn npy_reader_reads_a_known_array() {
    // np.save of np.array([[1.5, -2], [0, 3]], dtype='<f4'), header padded to 64 bytes as numpy does.
    let mut header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in [1.5f32, -2.0, 0.0, 3.0] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let npy = support::parse_npy_f32(&bytes).unwrap();
    assert_eq!(npy.shape, vec![2, 2]);
    assert_eq!(npy.values, vec![1.5, -2.0, 0.0, 3.0]);
    assert!(support::parse_npy_f32(&bytes[..bytes.len() - 1]).is_err());
    let at = bytes.windows(5).position(|w| w == b"False").unwrap();
    let mut fortran = bytes.clone();
    fortran[at..at + 5].copy_from_slice(b"True ");
    assert!(support::parse_npy_f32(&fortran).is_err());
}
