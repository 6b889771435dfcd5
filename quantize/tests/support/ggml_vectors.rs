//! Test vectors made with ggml's own C code (`tests/fixtures/kquant-vectors`, `tests/fixtures/iq4-vectors`, each
//! with its README): a manifest of input rows and, per format, ggml's bytes and its dequantization of them.

use std::path::Path;

use bytemuck::{Pod, Zeroable};

pub struct Row {
    pub name: String,
    pub input: Vec<f32>,
    /// Types whose bytes change when ggml-quants.c is compiled with FMA contraction.
    pub fma_sensitive: Vec<String>,
}

pub fn rows(dir: &Path) -> Vec<Row> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    manifest["rows"]
        .as_array()
        .expect("manifest rows")
        .iter()
        .map(|r| {
            let name = r["name"].as_str().unwrap().to_string();
            let input = super::read_npy_f32(&dir.join(r["input"].as_str().unwrap()));
            assert_eq!(
                input.shape,
                vec![r["n"].as_u64().unwrap() as usize],
                "{name}"
            );
            let fma_sensitive = r["types"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(_, e)| e["fma_build_differs"].as_bool() == Some(true))
                .map(|(ty, _)| ty.clone())
                .collect();
            Row {
                name,
                input: input.values,
                fma_sensitive,
            }
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks one format on every row of `dir`'s manifest (`rows` of them, so a row removed by accident fails):
/// quantized bytes identical (the first differing block is shown), and the dequantization of ggml's bytes
/// bit-identical (so the sign of zero counts too). `block_len` is the number of values a block `B` holds.
pub fn check_format<B: Pod + Zeroable>(
    dir: &Path,
    rows_expected: usize,
    ty: &str,
    block_len: usize,
    quantize: fn(&[f32], &mut [B]),
    dequantize: fn(&[B], &mut [f32]),
) {
    let rows = rows(dir);
    assert_eq!(
        rows.len(),
        rows_expected,
        "every row of the manifest is checked"
    );
    let block_bytes = std::mem::size_of::<B>();
    let mut fma_rows = 0;
    for row in &rows {
        let what = format!("{} {ty}", row.name);
        let want = std::fs::read(dir.join(format!("{}.{ty}.bin", row.name))).unwrap();
        let mut blocks = vec![B::zeroed(); row.input.len() / block_len];
        quantize(&row.input, &mut blocks);
        let got: &[u8] = bytemuck::cast_slice(&blocks);
        assert_eq!(got.len(), want.len(), "{what}");
        if let Some(b) = (0..blocks.len()).find(|&b| {
            got[b * block_bytes..][..block_bytes] != want[b * block_bytes..][..block_bytes]
        }) {
            panic!(
                "{what}: block {b} differs\n got {}\nwant {}",
                hex(&got[b * block_bytes..][..block_bytes]),
                hex(&want[b * block_bytes..][..block_bytes])
            );
        }
        fma_rows += usize::from(row.fma_sensitive.iter().any(|t| t == ty));

        let ggml_blocks: Vec<B> = want
            .chunks_exact(block_bytes)
            .map(bytemuck::pod_read_unaligned)
            .collect();
        let mut values = vec![0.0f32; row.input.len()];
        dequantize(&ggml_blocks, &mut values);
        let want_values =
            super::read_npy_f32(&dir.join(format!("{}.{ty}.dequant.f32.npy", row.name))).values;
        for (i, (g, w)) in values.iter().zip(&want_values).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: {g:e} vs {w:e}");
        }
    }
    // Rows a fused multiply-add would change must be there, or passing says less about the float rules.
    assert!(fma_rows >= 1, "{ty}: no FMA-sensitive row");
}

/// xorshift64 from `seed`: the same numbers on every run, without a dependency.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// A row of `n` values such as a damaged file can hold, for round `round` of a no-panic check: NaN,
/// infinities, extremes and subnormals, arbitrary bit patterns, and uniform values at a scale that sweeps
/// 1e-30..1e30 over the rounds.
pub fn hostile_row(next: &mut impl FnMut() -> u64, round: i32, n: usize) -> Vec<f32> {
    const SPECIALS: [f32; 12] = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        -f32::MAX,
        1e30,
        -3e38,
        f32::MIN_POSITIVE,
        1e-45,
        -0.0,
        0.0,
        1.0,
    ];
    (0..n as i32)
        .map(|i| match (round + i) % 5 {
            0 => SPECIALS[(next() % SPECIALS.len() as u64) as usize],
            1 => f32::from_bits(next() as u32),
            _ => {
                ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 10f32.powi((round % 60) - 30)
            }
        })
        .collect()
}
