//! Where a model's weights come from and how they are held: checkpoint tensors beside the
//! matrices kept in their stored format, and a summary of the formats held.

use candle_core::Result;
use candle_nn::VarBuilder;

use crate::ops::{BaseWeight, StoredMatrix};

/// Base matrices kept in their stored format, by HF name (`model.layers.0.mlp.up_proj.weight`).
pub type StoredWeights = std::collections::HashMap<String, std::sync::Arc<StoredMatrix>>;

/// Where the weights come from: checkpoint tensors, and the matrices kept as stored.
#[derive(Clone)]
pub(super) struct Source<'a> {
    pub(super) vb: VarBuilder<'a>,
    pub(super) stored: &'a StoredWeights,
}

impl<'a> Source<'a> {
    pub(super) fn pp(&self, s: impl ToString) -> Self {
        Source {
            vb: self.vb.pp(s),
            stored: self.stored,
        }
    }

    /// The `[out, in]` matrix `name`: as stored if it is kept so, else a dense tensor.
    pub(super) fn matrix(&self, (out, inp): (usize, usize), name: &str) -> Result<BaseWeight> {
        let prefix = self.vb.prefix();
        let full = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        match self.stored.get(&full) {
            Some(m) if (m.rows(), m.cols()) == (out, inp) => Ok(BaseWeight::Stored(m.clone())),
            Some(m) => candle_core::bail!(
                "{full} is [{}, {}], expected [{out}, {inp}]",
                m.rows(),
                m.cols()
            ),
            None => Ok(BaseWeight::Dense(
                self.vb.get((out, inp), name)?.contiguous()?,
            )),
        }
    }
}

/// How a model's weights are held: how many tensors in each format, and their bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightsSummary {
    pub formats: std::collections::BTreeMap<&'static str, usize>,
    pub bytes: usize,
}

impl std::fmt::Display for WeightsSummary {
    /// `113 Q4_K, 17 Q6_K, 65 F32 (668.4 MB)`, most numerous first.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut v: Vec<_> = self.formats.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = v.iter().map(|(k, n)| format!("{n} {k}")).collect();
        write!(
            f,
            "{} ({:.1} MB)",
            parts.join(", "),
            self.bytes as f64 / 1e6
        )
    }
}
