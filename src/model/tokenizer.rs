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

/// Qwen2/2.5/3's split (llama.cpp's `qwen2`, HF's Qwen2 `tokenizer.json`): Llama 3's with
/// single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's word-boundary mark.
const SPIECE: &str = "\u{2581}";

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
        let split = |pattern: &str| -> Result<PreTokenizerWrapper, ModelError> {
            let split = Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err(path, e))?;
            Ok(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into())
        };
        let mut nfc = false;
        let (pre_tokenizer, ignore_merges): (PreTokenizerWrapper, bool) = match parts.pre.as_str() {
            "default" | "gpt2" | "smollm" | "gpt-2" => (ByteLevel::new(false, true, true).into(), false),
            "llama-bpe" | "llama3" => (split(LLAMA3_SPLIT)?, true),
            "qwen2" => {
                // HF's Qwen2 tokenizer normalises to NFC first.
                nfc = true;
                (split(QWEN2_SPLIT)?, false)
            }
            other => {
                return Err(tok_err(
                    path,
                    format!(
                        "GGUF tokenizer.ggml.pre = {other:?} is not supported (supported: gpt2, smollm, llama-bpe, qwen2); \
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
        if nfc {
            inner
                .with_normalizer(Some(tokenizers::normalizers::unicode::NFC))
                .map_err(|e| tok_err(path, e))?;
        }
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
        Self::finish(inner, special, added, parts.prepend_bos, path)
    }

    /// Rebuild a GGUF `llama`-type (SentencePiece) tokenizer the way transformers converts one
    /// (`GGUFLlamaConverter`, `SentencePieceExtractor`): a BPE over the pieces with byte
    /// fallback, whose merges are every split of a piece into two pieces, ranked by the merged
    /// piece's score (SentencePiece merges the highest-scoring pair first); spaces become `▁`
    /// (with one prepended to the text when `add_space_prefix`); control tokens special,
    /// user-defined ones added.
    pub fn from_gguf_spm(parts: GgufSpm, path: &Path) -> Result<Self, ModelError> {
        use std::collections::HashMap;
        use tokenizers::decoders::byte_fallback::ByteFallback;
        use tokenizers::decoders::fuse::Fuse;
        use tokenizers::decoders::sequence::Sequence as DecoderSequence;
        use tokenizers::decoders::strip::Strip;
        use tokenizers::normalizers::{Prepend, Replace};
        use tokenizers::{DecoderWrapper, NormalizerWrapper};

        let GgufSpm {
            tokens,
            scores,
            types,
            add_space_prefix,
            prepend_bos,
            unk,
        } = parts;
        if scores.len() != tokens.len() || types.len() != tokens.len() {
            return Err(tok_err(
                path,
                format!(
                    "{} tokens but {} scores and {} token types",
                    tokens.len(),
                    scores.len(),
                    types.len()
                ),
            ));
        }
        let vocab: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i as u32))
            .collect();
        // Merges, as transformers' extractor makes them: for each piece (in id order), every
        // split into two pieces of the vocabulary, ordered by the ids of the halves; then all
        // of them by the merged piece's score, descending (a stable sort, then by the halves'
        // lengths).
        let mut merges: Vec<(u32, u32, f32)> = Vec::new();
        for (id, piece) in tokens.iter().enumerate() {
            let mut local = Vec::new();
            for (cut, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(cut);
                if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                    local.push((a, b, scores[id]));
                }
            }
            local.sort_by_key(|&(a, b, _)| (a, b));
            merges.extend(local);
        }
        let len = |i: u32| tokens[i as usize].chars().count();
        merges.sort_by(|x, y| {
            y.2.partial_cmp(&x.2)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(len(y.0).cmp(&len(x.0)))
                .then(len(y.1).cmp(&len(x.1)))
        });
        let merges: Vec<(String, String)> = merges
            .into_iter()
            .map(|(a, b, _)| (tokens[a as usize].clone(), tokens[b as usize].clone()))
            .collect();
        let bpe_vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(bpe_vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(u) = unk {
            builder = builder.unk_token(tokens[u as usize].clone());
        }
        let bpe = builder.build().map_err(|e| tok_err(path, e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let replace = Replace::new(" ", SPIECE).map_err(|e| tok_err(path, e))?;
        let normalizer: NormalizerWrapper = if add_space_prefix {
            tokenizers::normalizers::Sequence::new(vec![
                Prepend::new(SPIECE.to_string()).into(),
                replace.into(),
            ])
            .into()
        } else {
            replace.into()
        };
        inner
            .with_normalizer(Some(normalizer))
            .map_err(|e| tok_err(path, e))?;
        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new(SPIECE, " ")
                .map_err(|e| tok_err(path, e))?
                .into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        inner.with_decoder(Some(DecoderSequence::new(decoders)));
        let of_type = |ty: i64| {
            types
                .iter()
                .enumerate()
                .filter(move |(_, &t)| t == ty)
                .map(|(i, _)| i)
        };
        let special: Vec<AddedToken> = of_type(3)
            .map(|i| AddedToken::from(tokens[i].clone(), true))
            .collect();
        let added: Vec<AddedToken> = of_type(4)
            .map(|i| AddedToken::from(tokens[i].clone(), false).normalized(false))
            .collect();
        Self::finish(inner, special, added, prepend_bos, path)
    }

    /// A GGUF tokenizer with its control tokens registered as special and its user-defined
    /// ones as added tokens.
    fn finish(
        mut inner: tokenizers::Tokenizer,
        special: Vec<AddedToken>,
        added: Vec<AddedToken>,
        prepend: Option<u32>,
        path: &Path,
    ) -> Result<Self, ModelError> {
        inner
            .add_special_tokens(special)
            .map_err(|e| tok_err(path, e))?;
        inner.add_tokens(added).map_err(|e| tok_err(path, e))?;
        Ok(Self { inner, prepend })
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

    /// Token ids for `text` without the BOS token or any other post-processing (HF's
    /// `encode(text, add_special_tokens=False)`).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
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

/// What a GGUF file says about its SentencePiece (`llama`-type) tokenizer.
#[derive(Debug, Clone)]
pub struct GgufSpm {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    /// llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte.
    pub types: Vec<i64>,
    /// `tokenizer.ggml.add_space_prefix` (true unless the file says otherwise; Gemma false).
    pub add_space_prefix: bool,
    pub prepend_bos: Option<u32>,
    /// The unknown token's id.
    pub unk: Option<u32>,
}
