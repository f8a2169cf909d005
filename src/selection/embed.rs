//! Optional semantic ranking: a sentence-embedding model the user keeps on disk.
//!
//! `toolFiltering.embeddings.model` names a directory in the sentence-transformers layout
//! (`config.json`, `tokenizer.json`, `model.safetensors`, optionally `1_Pooling/config.json`
//! and `sentence_bert_config.json`) holding a BERT-family encoder such as
//! all-MiniLM-L6-v2. Nothing is downloaded: the relay reads the directory, tokenizes with
//! the model's own `tokenizer.json` (the `tokenizers` crate) and runs the encoder on the CPU
//! (matrix products through `ndarray`). The encoder is the plain BERT forward pass
//! (embeddings, then per layer self-attention and a GELU feed-forward, each with a residual
//! and layer norm), then mean or CLS pooling and L2 normalization; written here rather than
//! pulled in with a general ML framework, which would cost minutes of build time for the
//! 100 lines used.

use crate::sync::lock;
use ndarray::{Array1, Array2, ArrayView2, Axis, s};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

/// Why a model directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable embedding model: {what}")]
    Model { path: PathBuf, what: String },
    #[error("the embedding model cannot embed the text: {0}")]
    Text(String),
}

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pooling {
    Mean,
    Cls,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    ff_in: Linear,
    ff_out: Linear,
    ff_norm: Norm,
}

/// `y = x·Wᵀ + b`, with `W` stored as the checkpoint stores it (`[out, in]`).
struct Linear {
    weight: Array2<f32>,
    bias: Array1<f32>,
}

impl Linear {
    fn apply(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        x.dot(&self.weight.t()) + &self.bias
    }
}

struct Norm {
    weight: Array1<f32>,
    bias: Array1<f32>,
}

/// A loaded sentence-embedding model.
pub struct Model {
    dir: PathBuf,
    tokenizer: tokenizers::Tokenizer,
    words: Array2<f32>,
    positions: Array2<f32>,
    token_type: Array1<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    eps: f32,
    exact_gelu: bool,
    pooling: Pooling,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("dir", &self.dir)
            .field("layers", &self.layers.len())
            .field("dim", &self.dim())
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, EmbedError> {
    std::fs::read(path).map_err(|source| EmbedError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Value, EmbedError> {
    serde_json::from_slice(&read(path)?).map_err(|e| EmbedError::Model {
        path: path.to_owned(),
        what: format!("not JSON ({e})"),
    })
}

/// The pooling of `1_Pooling/config.json` (mean when the file is absent); other modes and
/// modules beyond Transformer, Pooling and Normalize are refused, since they would change the
/// vectors.
fn pooling(dir: &Path) -> Result<Pooling, EmbedError> {
    let modules = dir.join("modules.json");
    if modules.is_file() {
        let list = read_json(&modules)?;
        for m in list.as_array().into_iter().flatten() {
            let kind = m.get("type").and_then(Value::as_str).unwrap_or_default();
            let known = ["Transformer", "Pooling", "Normalize"]
                .iter()
                .any(|k| kind.ends_with(&format!("models.{k}")));
            if !known {
                return Err(EmbedError::Model {
                    path: modules,
                    what: format!(
                        "module `{kind}` is not supported (Transformer, Pooling and Normalize are)"
                    ),
                });
            }
        }
    }
    let path = dir.join("1_Pooling/config.json");
    if !path.is_file() {
        return Ok(Pooling::Mean);
    }
    let config = read_json(&path)?;
    let on = |key: &str| config.get(key) == Some(&Value::Bool(true));
    let modes: Vec<&str> = [
        "pooling_mode_cls_token",
        "pooling_mode_mean_tokens",
        "pooling_mode_max_tokens",
        "pooling_mode_mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens",
        "pooling_mode_lasttoken",
    ]
    .into_iter()
    .filter(|k| on(k))
    .collect();
    match modes[..] {
        ["pooling_mode_cls_token"] => Ok(Pooling::Cls),
        ["pooling_mode_mean_tokens"] => Ok(Pooling::Mean),
        _ => Err(EmbedError::Model {
            path,
            what: format!("pooling {modes:?} is not supported (exactly one of mean or CLS token)"),
        }),
    }
}

/// Loaded models by directory: sessions, snapshots and reloads share one copy.
static LOADED: LazyLock<Mutex<HashMap<PathBuf, Arc<Model>>>> = LazyLock::new(Mutex::default);

/// Whether the model in `dir` is loaded already.
pub fn is_loaded(dir: &Path) -> bool {
    lock(&LOADED).contains_key(dir)
}

/// The model in `dir`, loaded once per process (a failed load is retried on the next call).
///
/// The lock is held while a model loads (rare, ~150 ms), so concurrent first uses read the
/// files once.
pub fn shared(dir: &Path) -> Result<Arc<Model>, EmbedError> {
    let mut loaded = lock(&LOADED);
    if let Some(m) = loaded.get(dir) {
        return Ok(m.clone());
    }
    let model = Arc::new(Model::load(dir)?);
    // Models nothing uses any more (the config now names another) are let go.
    loaded.retain(|_, m| Arc::strong_count(m) > 1);
    loaded.insert(dir.to_owned(), model.clone());
    Ok(model)
}

impl Model {
    /// Loads the model in `dir` (sentence-transformers layout, float32 safetensors).
    pub fn load(dir: &Path) -> Result<Model, EmbedError> {
        let bad = |path: &Path, what: String| EmbedError::Model {
            path: path.to_owned(),
            what,
        };
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let num = |key: &str| config.get(key).and_then(Value::as_u64).map(|n| n as usize);
        let (Some(hidden), Some(heads), Some(layers)) = (
            num("hidden_size"),
            num("num_attention_heads"),
            num("num_hidden_layers"),
        ) else {
            return Err(bad(
                &config_path,
                "needs hidden_size, num_attention_heads and num_hidden_layers (a BERT-family encoder)".into(),
            ));
        };
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("bert");
        if model_type != "bert" {
            return Err(bad(
                &config_path,
                format!(
                    "model_type `{model_type}` is not supported; a BERT encoder (model_type \"bert\", e.g. all-MiniLM-L6-v2, bge-small-en-v1.5) is needed"
                ),
            ));
        }
        if let Some(p) = config
            .get("position_embedding_type")
            .and_then(Value::as_str)
            && p != "absolute"
        {
            return Err(bad(
                &config_path,
                format!("position_embedding_type `{p}` is not supported (absolute only)"),
            ));
        }
        if hidden == 0 || heads == 0 || hidden % heads != 0 {
            return Err(bad(
                &config_path,
                format!("hidden_size {hidden} is not a multiple of num_attention_heads {heads}"),
            ));
        }
        let act = config
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        let exact_gelu = match act {
            "gelu" => true,
            "gelu_new" | "gelu_pytorch_tanh" => false,
            other => {
                return Err(bad(
                    &config_path,
                    format!("activation `{other}` is not supported (gelu, gelu_new)"),
                ));
            }
        };
        let eps = config
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-12) as f32;
        let pooling = pooling(dir)?;
        let max_positions = num("max_position_embeddings").unwrap_or(512);
        let max_len = read_json(&dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|c| c.get("max_seq_length").and_then(Value::as_u64))
            .map_or(256, |n| n as usize)
            .min(max_positions);

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(read(&tokenizer_path)?)
            .map_err(|e| bad(&tokenizer_path, e.to_string()))?;
        tokenizer.with_padding(None);
        // Truncation keeps room for the special tokens; too small a length cannot.
        let special = tokenizer
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        if max_len < 8 || special >= max_len {
            return Err(bad(
                &config_path,
                format!("max_seq_length {max_len} is too small (at least 8 tokens)"),
            ));
        }
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| bad(&tokenizer_path, e.to_string()))?;

        let weights_path = dir.join("model.safetensors");
        let bytes = read(&weights_path)?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(&weights_path, e.to_string()))?;
        let prefix = if tensors.tensor("embeddings.word_embeddings.weight").is_ok() {
            ""
        } else {
            "bert."
        };
        let tensor = |name: &str| -> Result<(Vec<usize>, Vec<f32>), EmbedError> {
            let full = format!("{prefix}{name}");
            let t = tensors
                .tensor(&full)
                .map_err(|_| bad(&weights_path, format!("has no tensor `{full}`")))?;
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(bad(
                    &weights_path,
                    format!(
                        "tensor `{full}` is {:?}; only float32 weights are supported",
                        t.dtype()
                    ),
                ));
            }
            let data = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok((t.shape().to_vec(), data))
        };
        let matrix = |name: &str, cols: usize| -> Result<Array2<f32>, EmbedError> {
            let (shape, data) = tensor(name)?;
            match shape[..] {
                [r, c] if c == cols => Array2::from_shape_vec((r, c), data)
                    .map_err(|e| bad(&weights_path, format!("tensor `{name}`: {e}"))),
                _ => Err(bad(
                    &weights_path,
                    format!("tensor `{name}` has shape {shape:?}, expected [_, {cols}]"),
                )),
            }
        };
        let vector = |name: &str, len: usize| -> Result<Array1<f32>, EmbedError> {
            let (shape, data) = tensor(name)?;
            if shape != [len] {
                return Err(bad(
                    &weights_path,
                    format!("tensor `{name}` has shape {shape:?}, expected [{len}]"),
                ));
            }
            Ok(Array1::from_vec(data))
        };
        let linear = |name: &str, cols: usize, rows: usize| -> Result<Linear, EmbedError> {
            let weight = matrix(&format!("{name}.weight"), cols)?;
            if weight.nrows() != rows {
                return Err(bad(
                    &weights_path,
                    format!(
                        "tensor `{name}.weight` has {} rows, expected {rows}",
                        weight.nrows()
                    ),
                ));
            }
            Ok(Linear {
                weight,
                bias: vector(&format!("{name}.bias"), rows)?,
            })
        };
        let norm = |name: &str| -> Result<Norm, EmbedError> {
            Ok(Norm {
                weight: vector(&format!("{name}.weight"), hidden)?,
                bias: vector(&format!("{name}.bias"), hidden)?,
            })
        };
        let words = matrix("embeddings.word_embeddings.weight", hidden)?;
        let positions = matrix("embeddings.position_embeddings.weight", hidden)?;
        if positions.nrows() < max_len {
            return Err(bad(
                &weights_path,
                format!(
                    "has {} positions, fewer than the {max_len} tokens of max_seq_length",
                    positions.nrows()
                ),
            ));
        }
        let token_types = matrix("embeddings.token_type_embeddings.weight", hidden)?;
        if words.nrows() == 0 || token_types.nrows() == 0 || max_len == 0 {
            return Err(bad(
                &weights_path,
                "has an empty vocabulary, no token types or no positions".into(),
            ));
        }
        let token_type = token_types.row(0).to_owned();
        let embed_norm = norm("embeddings.LayerNorm")?;
        let inner = num("intermediate_size").unwrap_or(4 * hidden);
        // Grown as layers are found (`layers` comes from the file: no allocation up front).
        let mut stack = Vec::new();
        for l in 0..layers {
            let p = format!("encoder.layer.{l}");
            stack.push(Layer {
                query: linear(&format!("{p}.attention.self.query"), hidden, hidden)?,
                key: linear(&format!("{p}.attention.self.key"), hidden, hidden)?,
                value: linear(&format!("{p}.attention.self.value"), hidden, hidden)?,
                attn_out: linear(&format!("{p}.attention.output.dense"), hidden, hidden)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                ff_in: linear(&format!("{p}.intermediate.dense"), hidden, inner)?,
                ff_out: linear(&format!("{p}.output.dense"), inner, hidden)?,
                ff_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        let vocab = words.nrows();
        if tokenizer.get_vocab_size(true) > vocab {
            return Err(bad(
                &tokenizer_path,
                format!(
                    "has {} tokens, more than the model's {vocab} word embeddings",
                    tokenizer.get_vocab_size(true)
                ),
            ));
        }
        Ok(Model {
            dir: dir.to_owned(),
            tokenizer,
            words,
            positions,
            token_type,
            embed_norm,
            layers: stack,
            heads,
            eps,
            exact_gelu,
            pooling,
        })
    }

    /// The length of the vectors [`Model::embed`] returns.
    pub fn dim(&self) -> usize {
        self.words.ncols()
    }

    /// The text's unit-length embedding.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EmbedError::Text(e.to_string()))?;
        let ids = encoding.get_ids();
        let n = ids.len().min(self.positions.nrows());
        if n == 0 {
            return Err(EmbedError::Text("the text has no tokens".into()));
        }
        let ids = &ids[..n];
        let dim = self.dim();
        let mut x = Array2::<f32>::zeros((n, dim));
        for (i, &id) in ids.iter().enumerate() {
            // The tokenizer's vocabulary was checked against the embeddings at load.
            let word = self.words.row((id as usize).min(self.words.nrows() - 1));
            let mut row = x.row_mut(i);
            row += &word;
            row += &self.positions.row(i);
            row += &self.token_type;
        }
        self.layer_norm(&mut x, &self.embed_norm);
        let head = dim / self.heads;
        let scale = 1.0 / (head as f32).sqrt();
        for layer in &self.layers {
            let q = layer.query.apply(x.view());
            let k = layer.key.apply(x.view());
            let v = layer.value.apply(x.view());
            let mut context = Array2::<f32>::zeros((n, dim));
            for h in 0..self.heads {
                let cols = s![.., h * head..(h + 1) * head];
                let mut scores = q.slice(cols).dot(&k.slice(cols).t()) * scale;
                for mut row in scores.rows_mut() {
                    let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    row.mapv_inplace(|v| (v - max).exp());
                    let sum = row.sum();
                    row /= sum;
                }
                context.slice_mut(cols).assign(&scores.dot(&v.slice(cols)));
            }
            let mut attended = layer.attn_out.apply(context.view()) + &x;
            self.layer_norm(&mut attended, &layer.attn_norm);
            let mut inner = layer.ff_in.apply(attended.view());
            let exact = self.exact_gelu;
            inner.mapv_inplace(|v| gelu(v, exact));
            let mut out = layer.ff_out.apply(inner.view()) + &attended;
            self.layer_norm(&mut out, &layer.ff_norm);
            x = out;
        }
        let pooled = match self.pooling {
            Pooling::Cls => x.row(0).to_owned(),
            Pooling::Mean => x.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(dim)),
        };
        let norm = pooled.dot(&pooled).sqrt();
        if !norm.is_finite() || norm < 1e-12 {
            return Err(EmbedError::Text(
                "the model gave no usable vector (its weights may be corrupt)".into(),
            ));
        }
        Ok(pooled.iter().map(|v| v / norm).collect())
    }

    fn layer_norm(&self, x: &mut Array2<f32>, norm: &Norm) {
        let dim = x.ncols() as f32;
        for mut row in x.rows_mut() {
            let mean = row.sum() / dim;
            let var = row.fold(0.0, |a, &v| a + (v - mean) * (v - mean)) / dim;
            let inv = 1.0 / (var + self.eps).sqrt();
            row.mapv_inplace(|v| (v - mean) * inv);
            row *= &norm.weight;
            row += &norm.bias;
        }
    }
}

fn gelu(x: f32, exact: bool) -> f32 {
    if exact {
        0.5 * x * (1.0 + libm::erff(x / std::f32::consts::SQRT_2))
    } else {
        let c = (2.0 / std::f32::consts::PI).sqrt();
        0.5 * x * (1.0 + (c * (x + 0.044_715 * x * x * x)).tanh())
    }
}

/// Cosine similarity of two unit vectors (0 when their lengths differ).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
