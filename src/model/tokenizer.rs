//! Text ↔ token ids: an HF `tokenizer.json`, or a byte-level BPE rebuilt from GGUF metadata.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::ModelError;

/// Llama 3's pre-tokenizer split (llama.cpp's `llama-bpe`, HF's Llama 3 `tokenizer.json`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The model's tokenizer. `encode` parses special tokens written in the text (as HF does)
/// and applies the tokenizer's own post-processing (e.g. a BOS token).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend this id on encode: GGUF's `add_bos_token`, which has no post-processor.
    prepend: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("prepend", &self.prepend)
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

impl Tokenizer {
    /// Load an HF `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                what: "the tokenizer (tokenizer.json)",
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        Ok(Self {
            inner,
            prepend: None,
        })
    }

    /// Rebuild a GGUF `gpt2`-type tokenizer: byte-level BPE from `tokens` and `merges`, with
    /// control tokens registered as special tokens and user-defined ones as added tokens.
    pub fn from_gguf_bpe(parts: GgufBpe, path: &Path) -> Result<Self, ModelError> {
        let vocab: Vocab = parts
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = parts
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        tok_err(
                            path,
                            format!("merge {m:?} is not two tokens separated by a space"),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (pre_tokenizer, ignore_merges): (PreTokenizerWrapper, bool) = match parts.pre.as_str() {
            "default" | "gpt2" | "smollm" | "gpt-2" => (ByteLevel::new(false, true, true).into(), false),
            "llama-bpe" | "llama3" => {
                let split = Split::new(
                    SplitPattern::Regex(LLAMA3_SPLIT.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| tok_err(path, e))?;
                let seq = Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]);
                (seq.into(), true)
            }
            other => {
                return Err(tok_err(
                    path,
                    format!(
                        "GGUF tokenizer.ggml.pre = {other:?} is not supported (supported: gpt2, smollm, llama-bpe); \
                         serve the model from its HF folder instead"
                    ),
                ))
            }
        };
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| tok_err(path, e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = parts
            .special
            .iter()
            .map(|&i| AddedToken::from(parts.tokens[i as usize].clone(), true))
            .collect();
        let added: Vec<AddedToken> = parts
            .user_defined
            .iter()
            .map(|&i| AddedToken::from(parts.tokens[i as usize].clone(), false))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| tok_err(path, e))?;
        inner.add_tokens(added).map_err(|e| tok_err(path, e))?;
        Ok(Self {
            inner,
            prepend: parts.prepend_bos,
        })
    }

    /// Token ids for `text`, special tokens written in it recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        ids.extend(self.prepend);
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text for `ids`; special tokens are left out when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Encode(e.to_string()))
    }

    /// The id of a token written exactly as in the vocabulary (special tokens too).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// What a GGUF file says about its byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct GgufBpe {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    /// Ids of control tokens (type 3).
    pub special: Vec<u32>,
    /// Ids of user-defined tokens (type 4).
    pub user_defined: Vec<u32>,
    pub prepend_bos: Option<u32>,
}
