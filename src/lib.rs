//! # dora-serve
//!
//! An inference server for one resident base LLM and many DoRA (and plain LoRA) adapters,
//! numerically exact to HF PEFT. The design is in `DESIGN.md` of the project; this doc keeps
//! the code's layout true.
//!
//! # Layout
//!
//! Dependencies point one way (checked by reading the `use` lines):
//!
//! ```text
//! main → { config, http, engine, model, bench }
//! config → { engine, adapter, ops }        (the typed choices only: AdapterMode, SynthSpec, ProjKind)
//! http → engine → { model, adapter } → ops → candle
//! bench → { config, model, adapter }        (an HTTP client; model and adapter only for --make-adapters)
//! ```
//!
//! `model` and `adapter` do not import each other: adapters see the base model only through
//! [`ops::BaseLinears`], and the model sees adapters only as [`ops::AdapterWeights`]. `http`
//! never sees a tensor and never loads, resolves or caches an adapter: it calls the engine's
//! verbs (validate, submit, upload, delete, register, unregister, list).
//!
//! - [`config`] — raw CLI arguments (clap) and the typed choices they turn into.
//! - [`bench`] — `dora-serve bench`, the load generator: an HTTP client of the API (it imports
//!   no engine code; only `--make-adapters` borrows `model` and `adapter` for shapes), with a
//!   seeded workload (Zipf adapters, Poisson or closed-loop arrivals), reports and plots.
//! - [`http`] — the OpenAI-compatible API on axum, built by [`http::app`]: thin handlers that
//!   parse their DTO, build an [`engine::EngineRequest`] and render the result; one stream
//!   builder (`http/stream.rs`) for the JSON and SSE answers of both chat and completions;
//!   models, adapter upload and management, vLLM's load/unload (all through the engine's
//!   verbs), health, Prometheus metrics, and the OpenAPI document generated with utoipa.
//!   Errors are one enum mapped to status and stable `code` in one match, and a loader's
//!   error maps the same wherever the load happened; a deadline layer ends generations past
//!   `--request-timeout`.
//! - [`engine`] — the serving engine: an [`engine::Engine`] handle to one worker thread that
//!   owns every sequence's KV cache and the adapter caches, and the [`adapter::Catalog`] of
//!   every adapter name; [`engine::Engine::validate`] is the one function that makes a
//!   [`engine::ValidRequest`], the only type `submit` takes. It runs continuous batching under the
//!   pure [`engine::scheduler`] (admission, chunked prefill under a token budget, apply mode:
//!   unmerged, merged in turns, or auto with hysteresis), loads cold adapters off-thread (one
//!   load per adapter however many requests wait), streams tokens with stop strings, and
//!   cancels on drop. Also sampling (per-request seeds), OpenAI-style log-probabilities,
//!   [`engine::generate`], the plain reference generation loop, and test hooks: a
//!   [`engine::StepGate`] that holds every step until a test allows it (and can inject a failed
//!   step), and a per-step delay, so tests decide when the engine moves instead of racing it.
//!   Steps are counted by how adapters applied: merged, unmerged, or base-only. The
//!   [`engine::prefix_cache`] keeps the KV of full 16-token prompt blocks under a byte budget
//!   (`--prefix-cache-bytes`), keyed by a chained SHA-256 of the tokens and of what shaped
//!   them (base, or adapter name + digest), LRU-evicted except for blocks running sequences
//!   hold; the worker restores a prompt's cached blocks at admission and stores new ones
//!   after each prefill chunk.
//! - [`adapter`] — PEFT LoRA/DoRA adapters: `adapter_config.json` (every field understood,
//!   harmless, or refused by name), `adapter_model.safetensors` (every tensor must map to a
//!   targeted module of the base, with the config's rank), `g = m/‖W0 + s·B·A‖` precomputed at
//!   load, a content digest naming each version, the byte-budgeted LRU
//!   [`adapter::AdapterCache`] whose `Arc` leases pin adapters in use, the
//!   [`adapter::AdapterStore`] (`file://DIR`: temporary folder, fsync, one-step swap; or
//!   `s3://bucket/prefix` through `object_store`, shared by replicas: versioned objects named
//!   by a manifest written with a conditional put, a byte-budgeted disk cache below the
//!   in-memory LRU, manifests refreshed by polling and re-read on a cache miss), the
//!   [`adapter::Catalog`] (names → store or registered folder, refusals, per-name generations,
//!   validation of uploads and registrations against the base), and random adapters for
//!   benchmarks.
//! - [`model`] — one decoder for every family (candle style: serde `Config` with HF names,
//!   `new(cfg, vb)`; `model/family.rs` names how Mistral, Qwen2/3, Gemma 2/3 and Phi-3 differ
//!   from llama, `model/layer.rs` builds a layer's norms, attention and MLP from that,
//!   `model/rope.rs` the rope scalings: llama3, linear, YaRN, LongRoPE), its
//!   per-sequence KV cache (sliding-window layers drop what no later query sees), the
//!   HF-folder and GGUF loaders (per-family GGUF metadata and tensor names; with
//!   `--dtype auto`, GGUF matrices stay in their block format, memory-mapped, and bf16/f16
//!   safetensors stay 16-bit; otherwise tensors are converted at load; either way llama.cpp's
//!   Q/K row permutation is undone, as a row map over stored matrices, so weights are in HF
//!   layout, and Gemma's `+ 1` on GGUF norm weights too), a summary of the formats held, and
//!   the tokenizer (HF `tokenizer.json`, or rebuilt from GGUF metadata: byte-level BPE, or
//!   SentencePiece as transformers converts it).
//! - [`ops`] — [`ops::kernels`], the one switch between this CPU's fast paths and candle's
//!   tensor ops only (`--kernels generic`: the device-generic code a GPU runs);
//!   [`ops::AdaptedLinear`], the one linear type of every projection, keyed by
//!   `(layer, ProjKind)`, weights kept `[out, in]` as checkpoints store them: base, unmerged
//!   grouped LoRA/DoRA (`y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b` per row group, fused over slices
//!   on the CPU) and merged weights, each with a plain reference beside it; the DoRA norm
//!   (row by row on the CPU, the identity elsewhere) and its reference; base weights as
//!   [`ops::BaseWeight`]: a dense tensor or an [`ops::StoredMatrix`] (GGUF blocks or 16-bit
//!   floats, dequantised on the fly: fast paths bit-equal to candle's `to_float`, on AVX-512
//!   `dequant/strip.rs` for Q4_K, Q5_K, Q6_K and Q8_0 (a strip of rows' blocks per call,
//!   scales worked out ahead, tables for the 4- and 5-bit values, byte lanes for Q6_K) and
//!   `dequant/table.rs` for Q4_0–Q5_1; on AVX2 without AVX-512 `dequant/avx2/` for Q4_0,
//!   Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K, values bit for bit the portable ones, as are
//!   the one-row dots of the 32-value formats (over an input in a split order that a byte
//!   shuffle reaches; the k-quants' one-row dots `avx2/kdot.rs`, sub-block sums scaled in
//!   the same order, exact up to rounding), and products of
//!   2–8 rows equal to the AVX2 tiles' sums with no dequantised strip (`avx2/many.rs`: the
//!   input rows interleaved, a tile of weight rows a pass of positions at a time); candle's
//!   for the rest); the small-row f32 matmul kernel for decode steps (register tiles in AVX-512
//!   and in AVX2 intrinsics, each shaped for its registers, a portable version of the same
//!   tiling, and on AVX-512 a transposed tiling for more rows: input rows packed in vector
//!   lanes, weights broadcast), its stored-format forms (a fused one-row dot per block; for
//!   Q4_K, Q5_K and Q6_K `dequant/kdot.rs`, each sub-block summed then scaled over an input
//!   permuted to the packed values' lanes, exact up to rounding; dequantised strips through
//!   the same tiles, for long rows dequantised 256 positions at a
//!   time into an L1 block), the prefill tiling (`small_matmul/prefill.rs`: the transposed
//!   tile blocked GotoBLAS-style over row groups, output groups and 256-position blocks,
//!   dense or stored weights alike; candle's gemm where there is no AVX-512), the opt-in
//!   int8 kernels (`small_matmul/int8/`, `--int8-activations`: input rows rounded to
//!   int8, weights as bytes by `dequant/unsigned.rs`; AVX-512 VNNI for 2+ rows in
//!   `mod.rs`, its tiling on AVX2 for 5+ rows in `avx2.rs`, the K-quants' one-row kernel
//!   in `row.rs` (1-4 rows on AVX2; one row with VNNI's `vpdpbusd`), each block read straight
//!   into registers; not exact, a setting of each stored
//!   matrix),
//!   the gated MLP's `silu(gate)·up` in one pass
//!   (`activation.rs`, candle's formula bit for bit) and the spinning helper pool they and
//!   the unmerged rows run on;
//!   [`ops::attention`]: decode attention (a decode step's sequences all at once, on the pool)
//!   and the tiled causal prefill attention (online
//!   softmax over 64-key blocks, four query rows per key tile, GQA-aware, query blocks on the pool, sliding windows and
//!   soft-caps as [`ops::attention::Scores`] says; candle's masked attention is its reference
//!   and the generic path). The
//!   engine thread runs inside its own rayon pool, so candle's parallel ops share work with it.
//!
//! The forward pass is packed: all sequences' new tokens form one `[tokens, hidden]` matrix
//! for every projection, and attention runs per sequence against its own cache.

pub mod adapter;
pub mod bench;
pub mod config;
pub mod engine;
pub mod http;
pub mod model;
pub mod ops;
