//! The model's tensors as plain structs, each borrowing its bytes from the memory-mapped GGUF file, or holding a
//! copy in the layout its kernel set reads fastest (`kernels::Layout`), made once at load.

use quarry_quantize::gguf::{GgmlType, GgufFile, GgufProblem, MappedBytes, TensorInfo};

use super::ModelError;
use super::config::{Architecture, ModelConfig};
use crate::kernels::{self, INTERLEAVE_ROWS, Kernels, Layout, PackJob, PackedWeights, WeightRows};

/// A 2-D weight: `rows` output features of `cols` input weights each.
#[derive(Debug)]
pub struct Matrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    data: MappedBytes,
    packed: Option<PackedWeights>,
}

impl Matrix {
    pub fn view(&self) -> WeightRows<'_> {
        view(self.ty, self.rows, self.cols, &self.data, &self.packed)
    }

    /// The bytes the matrix takes in the file (and in any layout).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn packable(&mut self) -> Packable<'_> {
        Packable {
            ty: self.ty,
            rows: self.rows,
            unit: self.rows,
            cols: self.cols,
            data: &self.data,
            packed: &mut self.packed,
        }
    }
}

/// All experts of one projection, stacked as in the GGUF `*_exps` tensors: `[n_expert][rows][cols]`.
#[derive(Debug)]
pub struct ExpertMatrices {
    pub ty: GgmlType,
    pub n_expert: usize,
    pub rows: usize,
    pub cols: usize,
    data: MappedBytes,
    packed: Option<PackedWeights>,
}

impl ExpertMatrices {
    /// One expert's matrix; the other experts' bytes are not touched.
    pub fn expert(&self, e: usize) -> WeightRows<'_> {
        let all = view(
            self.ty,
            self.n_expert * self.rows,
            self.cols,
            &self.data,
            &self.packed,
        );
        all.sub_rows(e * self.rows, self.rows)
    }

    fn packable(&mut self) -> Packable<'_> {
        Packable {
            ty: self.ty,
            rows: self.n_expert * self.rows,
            unit: self.rows,
            cols: self.cols,
            data: &self.data,
            packed: &mut self.packed,
        }
    }
}

/// A matrix's bytes as the kernels read them: the packed copy if there is one, else the file's rows.
fn view<'a>(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &'a MappedBytes,
    packed: &'a Option<PackedWeights>,
) -> WeightRows<'a> {
    let (layout, data) = match packed {
        Some(p) => (p.layout(), p.bytes()),
        None => (Layout::Rows, &data[..]),
    };
    WeightRows {
        ty,
        layout,
        rows,
        cols,
        data,
    }
}

/// A matrix's bytes and shape, as [`ModelWeights::pack_for`] rewrites them: `rows` rows, taken `unit` at a
/// time (an expert's rows of a stacked tensor, or all of them).
struct Packable<'a> {
    ty: GgmlType,
    rows: usize,
    unit: usize,
    cols: usize,
    data: &'a MappedBytes,
    packed: &'a mut Option<PackedWeights>,
}

impl Packable<'_> {
    /// The layout kernel set `k` reads this matrix fastest in: its type's, where the matrix can take it. Rows
    /// past the last whole group stay as they lie, which each product cut from the matrix must allow: a
    /// stacked expert tensor is interleaved only when each expert is whole groups.
    fn layout_for(&self, k: &Kernels) -> Layout {
        let fits = if self.unit < self.rows {
            self.unit.is_multiple_of(INTERLEAVE_ROWS)
        } else {
            self.rows >= INTERLEAVE_ROWS
        };
        if fits {
            Layout::for_kernels(k, self.ty)
        } else {
            Layout::Rows
        }
    }
}

/// The routed experts of one layer.
#[derive(Debug)]
pub struct ExpertWeights {
    /// Router, `[n_expert][n_embd]`, F32 in every file we and llama.cpp write.
    pub router: Matrix,
    pub gate: ExpertMatrices,
    pub up: ExpertMatrices,
    pub down: ExpertMatrices,
}

/// The dense SwiGLU MLP of the `granite` architecture.
#[derive(Debug)]
pub struct DenseMlp {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

#[derive(Debug)]
pub enum FeedForward {
    Experts(ExpertWeights),
    Dense(DenseMlp),
}

#[derive(Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    pub ffn: FeedForward,
}

#[derive(Debug)]
pub struct ModelWeights {
    pub token_embd: Matrix,
    /// The output head when it is not tied to the token embedding.
    pub output: Option<Matrix>,
    pub output_norm: Vec<f32>,
    pub layers: Vec<LayerWeights>,
}

impl ModelWeights {
    /// Stores every matrix in the layout the kernel set `k` reads fastest ([`Layout::for_kernels`]), in
    /// parallel; matrices already so are left alone. The token embedding too: it is the output head of a model
    /// whose head is tied to it, and a token's row is gathered back from its group when it is looked up.
    pub fn pack_for(&mut self, k: &Kernels) {
        let mut all: Vec<Packable> = vec![self.token_embd.packable()];
        if let Some(out) = self.output.as_mut() {
            all.push(out.packable());
        }
        for l in &mut self.layers {
            all.extend([&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo].map(Matrix::packable));
            match &mut l.ffn {
                FeedForward::Experts(e) => {
                    all.push(e.router.packable());
                    all.extend([&mut e.gate, &mut e.up, &mut e.down].map(ExpertMatrices::packable));
                }
                FeedForward::Dense(d) => {
                    all.extend([&mut d.gate, &mut d.up, &mut d.down].map(Matrix::packable))
                }
            }
        }
        let want: Vec<Layout> = all.iter().map(|p| p.layout_for(k)).collect();
        let have = |p: &Packable| p.packed.as_ref().map_or(Layout::Rows, |c| c.layout());
        if all.iter().zip(&want).all(|(p, &w)| have(p) == w) {
            return;
        }
        // Every copy is made anew, into one arena (this happens once per model, and again only when tests switch
        // kernel sets): the old ones go first, so memory holds one set of copies at a time.
        for p in &mut all {
            *p.packed = None;
        }
        let (jobs, sources): (Vec<PackJob>, Vec<&MappedBytes>) = all
            .iter()
            .zip(&want)
            .filter(|&(_, &layout)| layout != Layout::Rows)
            .map(|(p, &layout)| {
                let job = PackJob {
                    layout,
                    ty: p.ty,
                    rows: p.rows,
                    cols: p.cols,
                    data: p.data,
                };
                (job, p.data)
            })
            .unzip();
        // Each copy is what the kernels read from then on: the file's pages of its matrix would only double the
        // resident memory (they are reloaded from the file if the rows are ever needed again).
        let mut packed = PackedWeights::pack_all(&jobs, |i| sources[i].release_pages()).into_iter();
        drop(jobs);
        for (p, &layout) in all.into_iter().zip(&want) {
            if layout != Layout::Rows {
                *p.packed = packed.next();
            }
        }
    }

    /// The matrix that maps the final hidden state to logits.
    pub fn output_head(&self) -> &Matrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// Finds every tensor the architecture needs and checks its shape and type against the config.
    pub fn from_gguf(file: &GgufFile, cfg: &ModelConfig) -> Result<ModelWeights, ModelError> {
        let loader = Loader { file };
        let (h, v, ff) = (cfg.n_embd, cfg.n_vocab, cfg.n_ff);
        let token_embd = loader.matrix("token_embd.weight", v, h)?;
        let output = match file.tensor("output.weight") {
            Some(_) => Some(loader.matrix("output.weight", v, h)?),
            None => None,
        };
        let output_norm = loader.vector("output_norm.weight", h)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let ffn = match cfg.arch {
                Architecture::GraniteMoe => {
                    let e = cfg.n_expert;
                    FeedForward::Experts(ExpertWeights {
                        router: loader.matrix(&n("ffn_gate_inp"), e, h)?,
                        gate: loader.experts(&n("ffn_gate_exps"), e, ff, h)?,
                        up: loader.experts(&n("ffn_up_exps"), e, ff, h)?,
                        down: loader.experts(&n("ffn_down_exps"), e, h, ff)?,
                    })
                }
                Architecture::Granite => FeedForward::Dense(DenseMlp {
                    gate: loader.matrix(&n("ffn_gate"), ff, h)?,
                    up: loader.matrix(&n("ffn_up"), ff, h)?,
                    down: loader.matrix(&n("ffn_down"), h, ff)?,
                }),
            };
            layers.push(LayerWeights {
                attn_norm: loader.vector(&n("attn_norm"), h)?,
                wq: loader.matrix(&n("attn_q"), cfg.n_head * cfg.head_dim, h)?,
                wk: loader.matrix(&n("attn_k"), cfg.kv_dim(), h)?,
                wv: loader.matrix(&n("attn_v"), cfg.kv_dim(), h)?,
                wo: loader.matrix(&n("attn_output"), h, cfg.n_head * cfg.head_dim)?,
                ffn_norm: loader.vector(&n("ffn_norm"), h)?,
                ffn,
            });
        }
        // A layer past `block_count` would be silently ignored: the file says one depth and holds another.
        for t in file.tensors() {
            let layer = t
                .name
                .strip_prefix("blk.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|i| i.parse::<usize>().ok());
            if let Some(i) = layer
                && i >= cfg.n_layer
            {
                return Err(loader.bad(format!(
                    "tensor '{}' belongs to layer {i}, but {}.block_count is {}",
                    t.name,
                    cfg.arch.gguf_name(),
                    cfg.n_layer
                )));
            }
        }
        Ok(ModelWeights {
            token_embd,
            output,
            output_norm,
            layers,
        })
    }
}

struct Loader<'a> {
    file: &'a GgufFile,
}

impl Loader<'_> {
    fn bad(&self, msg: String) -> ModelError {
        ModelError::Gguf(self.file.error(GgufProblem::Corrupt(msg)))
    }

    fn find(&self, name: &str, dims: &[usize]) -> Result<&TensorInfo, ModelError> {
        let t = self
            .file
            .tensor(name)
            .ok_or_else(|| self.bad(format!("missing tensor '{name}'")))?;
        let want: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        if t.dims != want {
            return Err(self.bad(format!(
                "tensor '{name}' has shape {:?}, the model's hyper-parameters need {want:?}",
                t.dims
            )));
        }
        if !kernels::supported(t.ty) {
            return Err(ModelError::UnsupportedTensorType {
                path: self.file.path().to_path_buf(),
                tensor: name.to_string(),
                ty: t.ty,
            });
        }
        // Blocks are read through typed slices; every type's alignment divides 4, and offsets that are not
        // multiples of it only come from writers that ignore the GGUF alignment rule.
        if t.offset % 4 != 0 {
            return Err(self.bad(format!(
                "tensor '{name}' starts at an unaligned offset {}",
                t.offset
            )));
        }
        Ok(t)
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, ModelError> {
        let t = self.find(name, &[cols, rows])?;
        Ok(Matrix {
            ty: t.ty,
            rows,
            cols,
            data: self.file.tensor_data(t),
            packed: None,
        })
    }

    fn experts(
        &self,
        name: &str,
        n_expert: usize,
        rows: usize,
        cols: usize,
    ) -> Result<ExpertMatrices, ModelError> {
        let t = self.find(name, &[cols, rows, n_expert])?;
        Ok(ExpertMatrices {
            ty: t.ty,
            n_expert,
            rows,
            cols,
            data: self.file.tensor_data(t),
            packed: None,
        })
    }

    /// A norm weight, copied out as f32 (it is tiny and used in f32 arithmetic).
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.find(name, &[len])?;
        let m = Matrix {
            ty: t.ty,
            rows: 1,
            cols: len,
            data: self.file.tensor_data(t),
            packed: None,
        };
        let mut out = vec![0.0; len];
        m.view().dequantize_row(0, &mut out);
        // Norm weights scale every activation of their layer: one NaN turns every logit into NaN, and the reply
        // into whatever token sampling makes of that. The matrices are too large to scan at load (their pages
        // are read only when used); `quarry quantize` refuses non-finite source weights.
        if let Some(at) = out.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Gguf(self.file.error(GgufProblem::Corrupt(
                format!(
                    "tensor '{name}' holds {} at index {at}: a norm weight must be a finite number",
                    out[at]
                ),
            ))));
        }
        Ok(out)
    }
}
