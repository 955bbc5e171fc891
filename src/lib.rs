//! # dora-serve
//!
//! An inference server for one resident base LLM and many DoRA (and plain LoRA) adapters,
//! numerically exact to HF PEFT. The design is in `DESIGN.md` of the project; this doc keeps
//! the code's layout true.
//!
//! # Layout
//!
//! Dependencies point one way: `main → config → engine → model → ops → candle`.
//!
//! - [`config`] — raw CLI arguments (clap) and the typed choices they turn into (dtype,
//!   device).
//! - [`engine`] — generation on top of the model: sampling with per-request seeds,
//!   OpenAI-style log-probabilities, and the packed, batched generation loop.
//! - [`model`] — the llama-family decoder (candle style: serde `Config` with HF names,
//!   `new(cfg, vb)`), its per-sequence KV cache, the HF-folder and GGUF loaders (GGUF tensors
//!   are dequantised and llama.cpp's Q/K permutation undone, so weights are in HF layout), and
//!   the tokenizer (HF `tokenizer.json`, or a byte-level BPE rebuilt from GGUF metadata).
//! - [`ops`] — [`ops::AdaptedLinear`], the one linear type of every projection, keyed by
//!   `(layer, ProjKind)`; adapters attach there, never by copying the model.
//!
//! The forward pass is packed: all sequences' new tokens form one `[tokens, hidden]` matrix
//! for every projection, and attention runs per sequence against its own cache.

pub mod adapter;
pub mod config;
pub mod engine;
pub mod model;
pub mod ops;
