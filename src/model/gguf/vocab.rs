//! The tokenizer a GGUF file describes: byte-level BPE (`gpt2`) or SentencePiece (`llama`),
//! rebuilt from `tokenizer.ggml.*`.

use std::path::Path;

use super::meta::Meta;
use super::open;
use crate::model::tokenizer::{GgufBpe, GgufSpm};
use crate::model::{ModelError, Tokenizer};

/// The tokenizer of a GGUF file alone (a full model, or a vocabulary-only file such as
/// llama.cpp's `models/ggml-vocab-*.gguf`).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, ModelError> {
    let (_, content) = open(path)?;
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    gguf_tokenizer(&meta, tokens)
}

pub(super) fn gguf_tokenizer(meta: &Meta, tokens: Vec<String>) -> Result<Tokenizer, ModelError> {
    let model = meta
        .string("tokenizer.ggml.model")?
        .ok_or_else(|| meta.err("metadata tokenizer.ggml.model is missing".into()))?;
    if model != "gpt2" && model != "llama" {
        return Err(meta.err(format!(
            "tokenizer.ggml.model = {model:?} is not supported from GGUF (supported: gpt2, the byte-level BPE, \
             and llama, SentencePiece); serve this model from its HF folder instead"
        )));
    }
    let types = meta.ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    if model == "llama" {
        return spm_tokenizer(meta, tokens, types);
    }
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(meta.err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let of_type = |ty: i64| -> Vec<u32> {
        types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == ty)
            .map(|(i, _)| i as u32)
            .collect()
    };
    let bos = meta.u32("tokenizer.ggml.bos_token_id")?;
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let parts = GgufBpe {
        merges: meta.strings("tokenizer.ggml.merges")?,
        pre: meta
            .string("tokenizer.ggml.pre")?
            .unwrap_or_else(|| "default".into()),
        special: of_type(3),
        user_defined: of_type(4),
        prepend_bos: if add_bos { bos } else { None },
        tokens,
    };
    for id in parts
        .special
        .iter()
        .chain(&parts.user_defined)
        .chain(&parts.prepend_bos)
    {
        if *id as usize >= parts.tokens.len() {
            return Err(meta.err(format!("token id {id} is outside the vocabulary")));
        }
    }
    Tokenizer::from_gguf_bpe(parts, meta.path)
}

/// A SentencePiece (`tokenizer.ggml.model = llama`) tokenizer: Llama 2, Mistral, TinyLlama,
/// Phi-3, Gemma files.
fn spm_tokenizer(
    meta: &Meta,
    tokens: Vec<String>,
    types: Vec<i64>,
) -> Result<Tokenizer, ModelError> {
    let n = tokens.len();
    let scores: Vec<f32> =
        match meta.get("tokenizer.ggml.scores") {
            Some(v) => v
                .to_vec()
                .map_err(|e| meta.err(format!("metadata tokenizer.ggml.scores: {e}")))?
                .iter()
                .map(|x| {
                    x.to_f32()
                        .map_err(|e| meta.err(format!("metadata tokenizer.ggml.scores: {e}")))
                })
                .collect::<Result<_, _>>()?,
            None => return Err(meta.err(
                "metadata tokenizer.ggml.scores is missing (a SentencePiece vocabulary needs it)"
                    .into(),
            )),
        };
    let types = if types.is_empty() { vec![1; n] } else { types };
    let id = |key: &str| -> Result<Option<u32>, ModelError> {
        match meta.u32(key)? {
            Some(i) if i as usize >= n => {
                Err(meta.err(format!("{key} {i} is outside the vocabulary")))
            }
            other => Ok(other),
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(true);
    let parts = GgufSpm {
        scores,
        add_space_prefix: meta
            .bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true),
        prepend_bos: if add_bos { bos } else { None },
        unk: id("tokenizer.ggml.unknown_token_id")?,
        tokens,
        types,
    };
    Tokenizer::from_gguf_spm(parts, meta.path)
}
