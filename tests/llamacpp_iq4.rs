//! IQ4_NL and IQ4_XS files made by llama.cpp's own `llama-quantize` (`tests/fixtures/llamacpp-iq4`, see its
//! README) run, and Quarry's converter makes the same files.
//!
//! * Every tensor of our `quarry quantize --type iq4_nl|iq4_xs` of the same checkpoint has llama.cpp's type and
//!   bytes (the block quantizers are checked block by block in `quantize/tests/iq4_vectors.rs`; this is the
//!   recipe and the whole file).
//! * llama.cpp's files against the exact math of their own weights (an F32 copy of the dequantized values), on
//!   every kernel set: what is left is Quarry's arithmetic, chiefly the activations rounded to Q8_0 before each
//!   product. Measured over the 532 positions of the fixture's four prompts: mean KL 0.0177 (IQ4_NL) and 0.0126
//!   (IQ4_XS), top-1 0.944 to 0.949, alike on every set; the bounds are those of `llamacpp_files.rs`'s k-quant
//!   files (0.06, 0.88), which a wrong level table or scale exceeds by nats.

mod support;

use support::*;

fn llamacpp_iq4(ty: &str) -> std::path::PathBuf {
    root().join(format!(
        "tests/fixtures/llamacpp-iq4/granitemoe-kquant-dev.{ty}.gguf"
    ))
}

#[test]
fn our_converter_writes_llamacpps_iq4_files_tensor_for_tensor() {
    use quarry::gguf::GgufFile;
    let dir = fixture_dir("granitemoe-kquant-dev").unwrap();
    for ty in ["iq4_nl", "iq4_xs"] {
        let theirs = GgufFile::open(llamacpp_iq4(ty)).unwrap();
        let ours = GgufFile::open(gguf("granitemoe-kquant-dev", &dir, ty)).unwrap();
        assert_eq!(ours.tensors().len(), theirs.tensors().len(), "{ty}");
        let mut quantized = 0;
        for t in theirs.tensors() {
            let o = ours
                .tensors()
                .iter()
                .find(|o| o.name == t.name)
                .unwrap_or_else(|| panic!("{ty}: no {} in our file", t.name));
            assert_eq!((o.ty, &o.dims), (t.ty, &t.dims), "{ty}: {}", t.name);
            assert!(
                *ours.tensor_data(o) == *theirs.tensor_data(t),
                "{ty}: {} ({}) has other bytes than llama.cpp's",
                t.name,
                t.ty
            );
            quantized += usize::from(t.ty.name() == ty);
        }
        assert_eq!(quantized, 14, "{ty}: every matrix but the head in the type");
    }
}

#[test]
fn llamacpp_iq4_files_compute_their_own_weights() {
    let dir = fixture_dir("granitemoe-kquant-dev").unwrap();
    let prompts = prompts(&reference(&dir));
    for ty in ["iq4_nl", "iq4_xs"] {
        let path = llamacpp_iq4(ty);
        let exact = dequantized_copy(&path);
        for kernel in kernel_sets() {
            // Over every position of every prompt: one prompt is a single position, where a near-tie alone
            // would move a mean over prompts by a quarter.
            let (mut kl_sum, mut top1_sum, mut n) = (0.0, 0.0, 0.0);
            for (_, ids, _, _) in &prompts {
                let (shape, got) = logits(kernel, &path, ids, &[]);
                let (_, want) = logits("scalar", &exact, ids, &[]);
                let (kl, top1) = kl_and_top1(&want, &got, shape[1]);
                let positions = shape[0] as f64;
                kl_sum += kl * positions;
                top1_sum += top1 * positions;
                n += positions;
            }
            let (kl, top1) = (kl_sum / n, top1_sum / n);
            eprintln!(
                "{ty} {kernel}: mean KL {kl:.4}, top-1 {top1:.3} against its own weights in f32"
            );
            assert!(
                kl <= 0.06 && top1 >= 0.88,
                "{ty} kernel {kernel}: mean KL {kl:.4}, top-1 {top1:.3} against its own weights in f32"
            );
        }
    }
}
