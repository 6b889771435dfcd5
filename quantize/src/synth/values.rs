//! Random tensor data, generated in parallel and streamed chunk by chunk.
//!
//! Values are Gaussian-ish: Irwin–Hall sums of four uniforms, bell-shaped and bounded at about ±3.5 standard
//! deviations, so nothing is extreme enough to overflow an activation. Q8_0 and Q4_0 blocks are drawn directly as
//! random quants of that shape with a random scale near the one the reference quantizer would pick for such values
//! (always a finite, non-zero f16): about five times faster than drawing floats and quantizing them, and the
//! kernels see the same kind of data. The k-quant and IQ4 types are drawn as floats and quantized with the
//! reference quantizers. Each task of whole rows draws from its own SplitMix64 stream, seeded from the
//! file's seed, the tensor's name and the task's index, so the bytes do not depend on how tasks meet threads.

use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use crate::blocks::{BLOCK_LEN, BlockQ4_0, BlockQ8_0};
use crate::convert::Role;
use crate::convert::encode::RowEncoder;
use crate::convert::output::TensorSink;
use crate::convert::plan::PlannedTensor;
use crate::error::ConvertError;
use crate::gguf::GgmlType;
use crate::hf::HfConfig;

/// Values per task (rounded to whole rows, at least one): the unit of parallel work and of seeding.
const TASK_VALUES: usize = 1 << 16;
/// Values per chunk handed to the writer (16 MiB as f32), so memory stays small whatever the tensor.
const CHUNK_VALUES: usize = 1 << 22;

/// The usual initialisation scale of transformer matrices: activations keep their size through a layer.
const WEIGHT_STD: f32 = 0.02;
/// Spread of RMSNorm gains around 1.
const NORM_STD: f32 = 0.02;

/// Standard deviation, in quant steps, of [`q8_quant`]'s values (checked exactly by a test).
const Q8_STEPS_STD: f32 = 36.807;
/// Standard deviation, in quant steps, of [`q4_quant`]'s values (checked exactly by a test).
const Q4_STEPS_STD: f32 = 2.4751;

/// Mean and standard deviation of one tensor's values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distribution {
    pub mean: f32,
    pub std: f32,
}

impl Distribution {
    /// The values a tensor of `role` gets. Every role the recipe can quantize is zero-mean.
    pub fn of(role: Role, config: &HfConfig) -> Distribution {
        match role {
            // Gains near 1 keep each layer's normalised activations at the scale the next matrix expects.
            Role::Norm => Distribution {
                mean: 1.0,
                std: NORM_STD,
            },
            // The router sees a normalised hidden state (length about sqrt(hidden)), so 1/sqrt(hidden) gives expert
            // logits of spread about 1: the top-k changes from token to token and the softmax is neither flat nor
            // one-hot, as in a trained router.
            Role::Router => Distribution {
                mean: 0.0,
                std: 1.0 / (config.hidden_size as f32).sqrt(),
            },
            Role::InputEmbedding | Role::OutputHead | Role::Weight => Distribution {
                mean: 0.0,
                std: WEIGHT_STD,
            },
        }
    }
}

/// Streams `tensor`'s random data into `sink`. Two chunk buffers alternate: while one chunk is written (the copy
/// into the page cache costs as much as drawing the values), the next is drawn on the other threads.
pub fn write_random_tensor(
    sink: &mut TensorSink<'_>,
    tensor: &PlannedTensor,
    values: Distribution,
    file_seed: u64,
) -> Result<(), ConvertError> {
    let row_len = tensor.row_len().max(1);
    let n_rows = usize::try_from(tensor.n_elements()).unwrap_or(usize::MAX) / row_len;
    let rows_per_task = (TASK_VALUES / row_len).max(1);
    let rows_per_chunk = rows_per_task * (CHUNK_VALUES / (rows_per_task * row_len)).max(1);
    let chunks: Vec<Range<usize>> = (0..n_rows)
        .step_by(rows_per_chunk)
        .map(|first| first..(first + rows_per_chunk).min(n_rows))
        .collect();
    let layout = ChunkLayout {
        ty: tensor.ty,
        values,
        row_len,
        rows_per_task,
        tensor_seed: mix64(file_seed ^ name_hash(&tensor.name)),
    };
    let mut current = Chunk::new(layout);
    let mut next = Chunk::new(layout);
    if let Some(first) = chunks.first() {
        current.draw(first.clone());
    }
    for (i, rows) in chunks.iter().enumerate() {
        let (written, ()) = rayon::join(
            || sink.write(current.bytes(), (rows.len() * row_len) as u64),
            || {
                if let Some(following) = chunks.get(i + 1) {
                    next.draw(following.clone());
                }
            },
        );
        written?;
        std::mem::swap(&mut current, &mut next);
    }
    Ok(())
}

/// How one tensor's values are drawn.
#[derive(Clone, Copy, Debug)]
struct ChunkLayout {
    ty: GgmlType,
    values: Distribution,
    row_len: usize,
    /// Rows per task: task `t` covers rows `t * rows_per_task..` and draws from its own stream.
    rows_per_task: usize,
    tensor_seed: u64,
}

/// The buffers of one chunk of rows, reused from chunk to chunk.
struct Chunk {
    layout: ChunkLayout,
    floats: Vec<f32>,
    encoder: RowEncoder,
    q8: Vec<BlockQ8_0>,
    q4: Vec<BlockQ4_0>,
}

impl Chunk {
    fn new(layout: ChunkLayout) -> Chunk {
        Chunk {
            layout,
            floats: Vec::new(),
            encoder: RowEncoder::new(layout.ty),
            q8: Vec::new(),
            q4: Vec::new(),
        }
    }

    /// Draws the values of `rows` (which start at a task boundary), task by task in parallel.
    fn draw(&mut self, rows: Range<usize>) {
        let ChunkLayout {
            ty,
            values: Distribution { mean, std },
            row_len,
            rows_per_task,
            tensor_seed,
        } = self.layout;
        let n = rows.len() * row_len;
        let task_len = rows_per_task * row_len;
        let first_task = rows.start / rows_per_task;
        let stream = |task: usize| SplitMix64::new(tensor_seed ^ mix64((first_task + task) as u64));
        match ty {
            GgmlType::Q8_0 => {
                self.q8.resize(n / BLOCK_LEN, bytemuck::Zeroable::zeroed());
                self.q8
                    .par_chunks_mut(task_len / BLOCK_LEN)
                    .enumerate()
                    .for_each(|(task, blocks)| {
                        let mut rng = stream(task);
                        blocks
                            .iter_mut()
                            .for_each(|b| *b = random_q8_block(&mut rng, std));
                    });
            }
            GgmlType::Q4_0 => {
                self.q4.resize(n / BLOCK_LEN, bytemuck::Zeroable::zeroed());
                self.q4
                    .par_chunks_mut(task_len / BLOCK_LEN)
                    .enumerate()
                    .for_each(|(task, blocks)| {
                        let mut rng = stream(task);
                        blocks
                            .iter_mut()
                            .for_each(|b| *b = random_q4_block(&mut rng, std));
                    });
            }
            // Floats, and the k-quant and IQ4 types, which are drawn as floats and quantized with the reference
            // quantizer (their blocks are too intricate to draw directly; these recipes are not the speed-critical
            // path).
            _ => {
                self.floats.resize(n, 0.0);
                self.floats
                    .par_chunks_mut(task_len)
                    .enumerate()
                    .for_each(|(task, values)| {
                        let mut rng = stream(task);
                        values
                            .iter_mut()
                            .for_each(|v| *v = mean + std * standard_normalish(rng.next()));
                    });
            }
        }
    }

    /// The file bytes of the values last drawn.
    fn bytes(&mut self) -> &[u8] {
        match self.layout.ty {
            GgmlType::Q8_0 => bytemuck::cast_slice(&self.q8),
            GgmlType::Q4_0 => bytemuck::cast_slice(&self.q4),
            _ => self.encoder.encode(&self.floats, self.layout.row_len),
        }
    }
}

/// A Q8_0 block of values with standard deviation about `std` (times a per-block factor in 0.75..1.25, as block
/// scales vary in real files).
fn random_q8_block(rng: &mut SplitMix64, std: f32) -> BlockQ8_0 {
    let d = block_scale(rng.next(), std / Q8_STEPS_STD);
    let mut qs = [0i8; BLOCK_LEN];
    for pair in qs.chunks_exact_mut(2) {
        let bits = rng.next();
        pair[0] = q8_quant(bits as u32);
        pair[1] = q8_quant((bits >> 32) as u32);
    }
    BlockQ8_0 { d, qs }
}

/// A Q4_0 block, as [`random_q8_block`].
fn random_q4_block(rng: &mut SplitMix64, std: f32) -> BlockQ4_0 {
    let d = block_scale(rng.next(), std / Q4_STEPS_STD);
    let mut qs = [0u8; BLOCK_LEN / 2];
    for pair in qs.chunks_exact_mut(2) {
        let bits = rng.next();
        let nibble = |shift: u32| q4_quant((bits >> shift) as u16);
        pair[0] = nibble(0) | (nibble(16) << 4);
        pair[1] = nibble(32) | (nibble(48) << 4);
    }
    BlockQ4_0 { d, qs }
}

/// `step` times a factor in 0.75..1.25 from the top 24 bits, as f16; never zero nor infinite for the steps the
/// distributions above give (it would take a step below 2^-24 or above 65504).
fn block_scale(bits: u64, step: f32) -> f16 {
    let unit = (bits >> 40) as f32 / (1u64 << 24) as f32;
    f16::from_f32(step * (0.75 + 0.5 * unit))
}

/// Four random bytes summed (0..=1020, bell-shaped around 510), as a quant in -127..=127.
fn q8_quant(bits: u32) -> i8 {
    // The four bytes added pairwise in parallel, then the two pair sums.
    let pairs = (bits & 0x00FF_00FF) + ((bits >> 8) & 0x00FF_00FF);
    let sum = (pairs & 0xFFFF) + (pairs >> 16);
    Q8_OF_SUM[sum as usize]
}

/// [`q8_of_sum`] of every sum of four bytes.
static Q8_OF_SUM: [i8; 1021] = {
    let mut table = [0i8; 1021];
    let mut sum = 0;
    while sum < table.len() {
        table[sum] = q8_of_sum(sum as i32);
        sum += 1;
    }
    table
};

/// `(sum - 510) * 127 / 510` rounded half away from zero: within -127..=127 for sums in 0..=1020.
const fn q8_of_sum(sum: i32) -> i8 {
    let scaled = (sum - 510) * 127;
    ((scaled + 255 * scaled.signum()) / 510) as i8
}

/// Four random nibbles summed (0..=60, bell-shaped around 30), as a stored Q4_0 nibble 0..=15 (weight -8..=7).
fn q4_quant(bits: u16) -> u8 {
    Q4_OF_BITS[usize::from(bits)]
}

/// [`q4_quant`] of every 16 bits: one lookup per weight instead of four additions and a division.
static Q4_OF_BITS: [u8; 1 << 16] = {
    let mut table = [0u8; 1 << 16];
    let mut bits = 0;
    while bits < table.len() {
        let sum = (bits & 0xF) + ((bits >> 4) & 0xF) + ((bits >> 8) & 0xF) + (bits >> 12);
        table[bits] = q4_of_sum(sum as i32);
        bits += 1;
    }
    table
};

/// `(sum - 30) * 8 / 30` rounded half away from zero, clamped to -8..=7, plus 8.
const fn q4_of_sum(sum: i32) -> u8 {
    let scaled = (sum - 30) * 8;
    let weight = (scaled + 15 * scaled.signum()) / 30;
    let weight = if weight > 7 { 7 } else { weight };
    (weight + 8) as u8
}

/// About N(0, 1): four uniform 16-bit numbers summed (Irwin–Hall: mean 131070, standard deviation 65536/sqrt(3)).
fn standard_normalish(bits: u64) -> f32 {
    let pairs = (bits & 0x0000_FFFF_0000_FFFF) + ((bits >> 16) & 0x0000_FFFF_0000_FFFF);
    let sum = (pairs & 0xFFFF_FFFF) + (pairs >> 32);
    (sum as f32 - 131_070.0) * (3f32.sqrt() / 65_536.0)
}

/// SplitMix64 (Steele, Lea and Flood, 2014): one add and two multiplies per number; statistically more than good
/// enough for weights. Its state only advances by a constant, so streams must start from hashed seeds
/// ([`mix64`]) or neighbouring streams would be shifted copies of each other.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> SplitMix64 {
        SplitMix64(mix64(seed))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }
}

/// SplitMix64's output function: a bijective 64-bit hash whose every output bit depends on every input bit.
fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of the tensor name: each tensor gets its own streams, independent of its position in the file.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::{dequantize_q4_0, dequantize_q8_0};

    /// Mean and standard deviation of a distribution given as (value, weight) pairs.
    fn moments(distribution: impl Iterator<Item = (f64, f64)>) -> (f64, f64) {
        let (mut n, mut sum, mut sum_sq) = (0.0, 0.0, 0.0);
        for (value, weight) in distribution {
            n += weight;
            sum += weight * value;
            sum_sq += weight * value * value;
        }
        let mean = sum / n;
        (mean, (sum_sq / n - mean * mean).sqrt())
    }

    /// Counts of each sum of four independent uniform digits in 0..base.
    fn sums_of_four(base: usize) -> Vec<f64> {
        let mut counts = vec![1.0];
        for _ in 0..4 {
            let mut next = vec![0.0; counts.len() + base - 1];
            for (s, c) in counts.iter().enumerate() {
                for d in 0..base {
                    next[s + d] += c;
                }
            }
            counts = next;
        }
        counts
    }

    #[test]
    fn quant_spreads_are_the_stated_constants() {
        let q8 = sums_of_four(256);
        let (mean, std) = moments(
            q8.iter()
                .enumerate()
                .map(|(sum, &count)| (f64::from(q8_of_sum(sum as i32)), count)),
        );
        assert!(mean.abs() < 1e-9, "{mean}");
        assert!((std - f64::from(Q8_STEPS_STD)).abs() < 0.001, "{std}");
        assert_eq!((q8_of_sum(0), q8_of_sum(1020)), (-127, 127));
        assert_eq!(q8_quant(u32::from_le_bytes([255, 255, 0, 0])), 0);

        let q4 = sums_of_four(16);
        let (mean, std) = moments(
            q4.iter()
                .enumerate()
                .map(|(sum, &count)| (f64::from(q4_of_sum(sum as i32)) - 8.0, count)),
        );
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((std - f64::from(Q4_STEPS_STD)).abs() < 0.001, "{std}");
        assert_eq!((q4_of_sum(0), q4_of_sum(30), q4_of_sum(60)), (0, 8, 15));
        assert_eq!(q4_quant(0xF0F0), 8);
    }

    #[test]
    fn blocks_have_the_asked_spread_and_sane_scales() {
        let std = 0.02f32;
        let mut rng = SplitMix64::new(7);
        let q8: Vec<BlockQ8_0> = (0..4096).map(|_| random_q8_block(&mut rng, std)).collect();
        let q4: Vec<BlockQ4_0> = (0..4096).map(|_| random_q4_block(&mut rng, std)).collect();
        assert!(
            q8.iter()
                .all(|b| b.d.to_f32().is_normal() && b.d.to_f32() > 0.0)
        );
        assert!(
            q4.iter()
                .all(|b| b.d.to_f32().is_normal() && b.d.to_f32() > 0.0)
        );
        let mut values = vec![0.0; 4096 * BLOCK_LEN];
        dequantize_q8_0(&q8, &mut values);
        let (mean, got) = moments(values.iter().map(|&v| (f64::from(v), 1.0)));
        // the per-block factor in 0.75..1.25 has root mean square 1.0104
        assert!(
            mean.abs() < 1e-3 && (got / f64::from(std) - 1.01).abs() < 0.03,
            "{mean} {got}"
        );
        dequantize_q4_0(&q4, &mut values);
        let (mean, got) = moments(values.iter().map(|&v| (f64::from(v), 1.0)));
        assert!(
            mean.abs() < 1e-3 && (got / f64::from(std) - 1.01).abs() < 0.03,
            "{mean} {got}"
        );

        let floats: Vec<f64> = (0..100_000)
            .map(|_| f64::from(standard_normalish(rng.next())))
            .collect();
        let (mean, got) = moments(floats.iter().map(|&v| (v, 1.0)));
        assert!(
            mean.abs() < 0.02 && (got - 1.0).abs() < 0.02,
            "{mean} {got}"
        );
        assert!(floats.iter().all(|v| v.abs() < 3.47));
    }

    #[test]
    fn streams_of_neighbouring_tasks_differ() {
        let mut a = SplitMix64::new(mix64(1));
        let mut b = SplitMix64::new(mix64(2));
        let first: Vec<u64> = (0..64).map(|_| a.next()).collect();
        let second: Vec<u64> = (0..64).map(|_| b.next()).collect();
        assert!(first.iter().all(|x| !second.contains(x)));
    }
}
