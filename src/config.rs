//! Command-line arguments (clap) and their validated, typed form.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::AdapterMode;

/// dora-serve: one base LLM, many DoRA/LoRA adapters.
#[derive(Debug, Parser)]
#[command(name = "dora-serve", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate completions without a server (one prompt, several, or a JSONL batch).
    Generate(GenerateArgs),
    /// Work with adapters.
    #[command(subcommand)]
    Adapter(AdapterCommand),
    /// Run the OpenAI-compatible HTTP server.
    Serve(ServeArgs),
    /// Print the OpenAPI document (YAML) of the HTTP API.
    Openapi,
    /// Load-test a server over HTTP (or one it starts) and report throughput and latency.
    Bench(BenchArgs),
}

/// An inclusive range `A:B`, or one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub lo: usize,
    pub hi: usize,
}

pub fn parse_range(s: &str) -> Result<Range, String> {
    let num = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("{t:?} is not a whole number"))
    };
    let (lo, hi) = match s.split_once(':') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(s)?, num(s)?),
    };
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: give N or A:B with 1 ≤ A ≤ B"));
    }
    Ok(Range { lo, hi })
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The server to drive.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Start a server on this model (on a free port, with a fresh adapter store) instead.
    #[arg(long)]
    pub spawn_model: Option<PathBuf>,
    /// An extra argument for the spawned server (repeatable), e.g. --server-arg=--adapter-mode=merged.
    #[arg(long, allow_hyphen_values = true)]
    pub server_arg: Vec<String>,
    #[arg(long, env = "DORA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// For --make-adapters when the server has an admin key.
    #[arg(long, hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Closed loop: this many clients, each sending its next request when the last finishes.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: requests in flight beyond this are not sent (counted as `client_dropped`).
    #[arg(long, default_value_t = 512)]
    pub max_inflight: usize,
    /// Stop sending after this many seconds.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Stop after this many requests.
    #[arg(long)]
    pub requests: Option<usize>,
    /// Requests that start in the first seconds are run but not counted.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Use N adapters from the server's GET /v1/adapters (sorted by name).
    #[arg(long, default_value_t = 0)]
    pub adapters: usize,
    /// Upload N random adapters first (needs --spawn-model or --model for their shapes).
    #[arg(long, default_value_t = 0)]
    pub make_adapters: usize,
    /// Base model for --make-adapters against a running server.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The shape of --make-adapters.
    #[command(flatten)]
    pub synth: SynthArgs,
    /// Adapter popularity: Zipf exponent over the adapters (0 = uniform).
    #[arg(long, default_value_t = 0.0)]
    pub zipf: f64,
    /// Fraction of requests on the base model (default: 0 with adapters, else 1).
    #[arg(long)]
    pub base_fraction: Option<f64>,
    /// Prompt length in words (about one token each): N or A:B.
    #[arg(long, default_value = "32", value_parser = parse_range)]
    pub prompt_words: Range,
    /// Shared-prefix workload: N system prompts of --prefix-words words each; every request
    /// starts with one of them (chosen uniformly, whatever its adapter) followed by its own
    /// --prompt-words words. 0: no shared prefixes.
    #[arg(long, default_value_t = 0)]
    pub shared_prefixes: usize,
    /// Length of each shared prefix in words (about one token each).
    #[arg(long, default_value_t = 2000)]
    pub prefix_words: usize,
    /// Output tokens per request: N or A:B (generated to that length: ignore_eos).
    #[arg(long, default_value = "64", value_parser = parse_range)]
    pub max_tokens: Range,
    /// Let requests stop at end-of-sequence instead of running to max_tokens.
    #[arg(long)]
    pub allow_eos: bool,
    /// Before the clock starts, send one 1-token request per adapter so that every adapter is
    /// loaded (steady state; leave it off to measure cold loads).
    #[arg(long)]
    pub preload: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG: latency CDFs and throughput over time.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print B ÷ A for two JSON reports and exit.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub compare: Option<Vec<PathBuf>>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// A share in (0, 1].
pub fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        _ => Err(format!("{s:?} is not a share in (0, 1], e.g. 0.25 or 1")),
    }
}

/// Byte sizes: plain numbers or with a KiB/MiB/GiB (or K/M/G) suffix.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = [
        ("GiB", 1usize << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ]
    .iter()
    .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim(), *m)))
    .unwrap_or((t, 1));
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a byte size (e.g. 1073741824, 512MiB, 2GiB)"))
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The adapter store: adapter NAME is the folder ADAPTERS_DIR/NAME.
    #[arg(long, env = "DORA_ADAPTERS_DIR", default_value = "adapters")]
    pub adapters_dir: PathBuf,
    /// Where adapters are stored: file://DIR (the default, as --adapters-dir) or
    /// s3://BUCKET/PREFIX, shared by replicas (credentials and endpoint from AWS_* variables).
    #[arg(long, env = "DORA_ADAPTER_STORE")]
    pub adapter_store: Option<String>,
    /// Local disk cache of adapters fetched from an object store (default: a folder per port
    /// under the temporary directory).
    #[arg(long, env = "DORA_ADAPTER_DISK_CACHE_DIR")]
    pub adapter_disk_cache_dir: Option<PathBuf>,
    /// Byte budget of that disk cache (LRU).
    #[arg(long, default_value = "4GiB", value_parser = parse_bytes)]
    pub adapter_disk_cache_bytes: usize,
    /// Seconds between looks at a shared store for uploads, replaces and deletes made by
    /// other replicas.
    #[arg(long, default_value_t = 2.0)]
    pub adapter_refresh: f64,
    /// load_lora_adapter paths must lie under this folder (default: the adapters folder;
    /// with an object store, registrations need it).
    #[arg(long)]
    pub adapter_root: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The id clients use for the base model (default: the --model argument as given, as vLLM
    /// does; a GGUF file's own general.name is shown in GET /v1/models metadata).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on every /v1 route.
    #[arg(long, env = "DORA_API_KEY")]
    pub api_key: Option<String>,
    /// Additionally required for adapter upload, delete, load and unload.
    #[arg(long, env = "DORA_ADMIN_KEY")]
    pub admin_key: Option<String>,
    /// Largest accepted request body (adapter uploads included).
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub max_upload_bytes: usize,
    /// How adapters are applied.
    #[arg(long, value_enum, default_value_t = AdapterMode::Auto)]
    pub adapter_mode: AdapterMode,
    /// Byte budget of loaded adapters (LRU; adapters in use may exceed it).
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub adapter_cache_bytes: usize,
    /// Byte budget of merged weight copies (merged and auto modes).
    #[arg(long, default_value = "2GiB", value_parser = parse_bytes)]
    pub merged_cache_bytes: usize,
    /// Byte budget of the prefix cache: keys and values of full 16-token prompt blocks, per
    /// base or adapter version, shared by every request (LRU; blocks in use by running
    /// sequences stay). 0 turns it off.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub prefix_cache_bytes: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub max_running: usize,
    /// Tokens per engine step (prefill chunks + decodes).
    #[arg(long, default_value_t = 512)]
    pub max_step_tokens: usize,
    /// While sequences decode, the most of the step time that steps carrying prompt chunks
    /// may take, in (0, 1]: lower keeps decoding streams' time per token nearer their pace
    /// alone (about 1/(1 − share) of it) and makes long prompts wait longer for their first
    /// token. Below 1, a step that decodes also carries at most share × --max-step-tokens
    /// prompt tokens (at least 64), so the stalls are short. 1 (the default): prompts use
    /// every step's spare token budget.
    #[arg(long, default_value_t = 1.0, value_parser = parse_share)]
    pub prefill_share: f64,
    /// Requests waiting beyond the running ones; more get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queued: usize,
    /// Seconds in-flight requests get to finish on SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    /// Seconds a generation request may run (queueing included) before it ends with
    /// `request_timeout` and its sequences are cancelled; 0 for no limit.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Test hook (hidden): pause this many milliseconds after every engine step, so that a
    /// test of the real process can act while a request is still running.
    #[arg(long, default_value_t = 0, hide = true)]
    pub test_step_delay_ms: u64,
    /// Test hook (hidden): pause this many milliseconds in the middle of every adapter write
    /// (between its two files), so that a test can kill the process mid-write.
    #[arg(long, default_value_t = 0, hide = true)]
    pub test_store_write_pause_ms: u64,
}

#[derive(Debug, Subcommand)]
pub enum AdapterCommand {
    /// Parse and validate an adapter folder against the base model, and print what it holds.
    Inspect(InspectArgs),
    /// Write random PEFT-format adapters for the base model (for benchmarks and load tests).
    Random(RandomArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RandomArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder to write into; with --count N, adapters go to OUT-0 … OUT-(N-1).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    #[command(flatten)]
    pub synth: SynthArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The shape of random adapters (`adapter random`, `bench --make-adapters`).
#[derive(Debug, Clone, Args)]
pub struct SynthArgs {
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// lora_alpha (default: 2 × rank).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Comma-separated projections, e.g. q_proj,v_proj (default: all seven).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub targets: Vec<String>,
    /// Plain LoRA instead of DoRA.
    #[arg(long)]
    pub lora: bool,
}

impl SynthArgs {
    /// The adapter to write with `seed`, or what is wrong with the arguments.
    pub fn spec(&self, seed: u64) -> Result<crate::adapter::SynthSpec, String> {
        if self.rank == 0 {
            return Err("--rank must be positive".into());
        }
        let targets = self
            .targets
            .iter()
            .map(|t| {
                crate::ops::ProjKind::from_module_name(t)
                    .ok_or_else(|| format!("unknown projection {t:?} in --targets"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::adapter::SynthSpec {
            rank: self.rank,
            alpha: self.alpha.unwrap_or(2.0 * self.rank as f64),
            targets,
            dora: !self.lora,
            seed,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The adapter folder (adapter_config.json + adapter_model.safetensors).
    pub dir: PathBuf,
    /// Print the description as JSON.
    #[arg(long)]
    pub json: bool,
}

// `--adapter-mode` / `--mode` take the engine's own enum (one vocabulary); its values and
// help are spelled here, where clap is.
impl ValueEnum for AdapterMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            AdapterMode::Unmerged,
            AdapterMode::Merged,
            AdapterMode::Auto,
        ]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        use clap::builder::PossibleValue;
        Some(match self {
            AdapterMode::Unmerged => PossibleValue::new("unmerged")
                .help("Adapter terms added per row group; any mix of adapters in one batch"),
            AdapterMode::Merged => PossibleValue::new("merged")
                .help("Adapters merged into their own weight copies; adapters take turns"),
            AdapterMode::Auto => PossibleValue::new("auto")
                .help("Merged while one adapter has all running rows, unmerged otherwise"),
        })
    }
}

/// The dtype of the model's weights (and activations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// Weights as stored (GGUF block formats, bf16/f16 safetensors) on the CPU, dequantised
    /// on the fly; activations and everything else in f32. On other devices, f32.
    Auto,
    /// Every weight converted to f32 at load.
    F32,
    /// Every weight and activation converted to f16 at load.
    F16,
    /// Every weight and activation converted to bf16 at load.
    Bf16,
}

impl DTypeArg {
    /// The serving dtype: of activations, and of every weight not kept as stored.
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            DTypeArg::Auto | DTypeArg::F32 => candle_core::DType::F32,
            DTypeArg::F16 => candle_core::DType::F16,
            DTypeArg::Bf16 => candle_core::DType::BF16,
        }
    }

    /// Whether base matrices stay in their stored format.
    pub fn stored(self) -> bool {
        self == DTypeArg::Auto
    }
}

/// What merged weights over a base kept as stored are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MergedDTypeArg {
    /// Exact: `W' = g ⊙ (dequant(W0) + s·B·A)` as computed; 4 bytes per weight.
    F32,
    /// Half the memory; each merged weight rounded to bf16 (8 bits of mantissa).
    Bf16,
    /// Half the memory; each merged weight rounded to f16.
    F16,
}

impl MergedDTypeArg {
    pub fn to_ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType;
        match self {
            MergedDTypeArg::F32 => GgmlDType::F32,
            MergedDTypeArg::Bf16 => GgmlDType::BF16,
            MergedDTypeArg::F16 => GgmlDType::F16,
        }
    }
}

/// Where tensors live. `cuda` and `metal` need the matching cargo feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

impl DeviceArg {
    pub fn open(self) -> candle_core::Result<candle_core::Device> {
        match self {
            DeviceArg::Cpu => Ok(candle_core::Device::Cpu),
            DeviceArg::Cuda => candle_core::Device::new_cuda(0),
            DeviceArg::Metal => candle_core::Device::new_metal(0),
        }
    }
}

/// Options every command that loads a model shares.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// An HF model folder (config.json, safetensors, tokenizer.json) or a llama .gguf file.
    #[arg(long, env = "DORA_MODEL")]
    pub model: PathBuf,
    /// Weight dtype: `auto` keeps weights as stored (GGUF Q4_K, Q8_0, …, bf16/f16 safetensors)
    /// and computes in f32; `f32`, `f16` and `bf16` convert every weight at load.
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,
    /// What merged weights over a base kept as stored (`--dtype auto`) are held in: f32 is
    /// exact; bf16 and f16 halve their memory and round every merged weight. Over a converted
    /// base they are in its dtype.
    #[arg(long, value_enum, default_value_t = MergedDTypeArg::F32)]
    pub merged_dtype: MergedDTypeArg,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// `cpu`: this machine's CPU kernels where they apply; `generic`: candle's tensor ops
    /// only, the code a GPU runs (stored formats are then dequantised at load). Default:
    /// DORA_KERNELS, else cpu.
    #[arg(long, value_parser = ["cpu", "generic"])]
    pub kernels: Option<String>,
    /// Round input rows to int8 where they multiply Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K or Q6_K
    /// weights, as llama.cpp does: with AVX-512 VNNI, decode steps of 2+ sequences and
    /// prompts, and one-sequence steps over the K-quants; on AVX2 CPUs without AVX-512,
    /// every decode step and prompt over the K-quants
    /// and 5+ rows over the other formats but Q8_0. Faster, not exact (the README gives the
    /// measured logit error). Off: every product is exact.
    #[arg(long)]
    pub int8_activations: bool,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A prompt, as raw text (special tokens written in it are recognised). Repeatable: all
    /// prompts run together as one batch.
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    pub prompt: Vec<String>,
    /// An adapter folder for the prompts: once for all of them, or once per --prompt, in
    /// order (`none` for the base model).
    #[arg(long, conflicts_with = "batch")]
    pub adapter: Vec<PathBuf>,
    /// A JSONL file of {"prompt": "...", "adapter": "FOLDER" | null} lines, run as one batch;
    /// the output is one JSON object per line, in input order.
    #[arg(long)]
    pub batch: Option<PathBuf>,
    /// How adapters are applied.
    #[arg(long, visible_alias = "adapter-mode", value_enum, default_value_t = AdapterMode::Unmerged)]
    pub mode: AdapterMode,
    /// Keep generating past end-of-sequence tokens (fixed-length runs for benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Report the log-probability of each generated token and this many alternatives (0–20).
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Print exactly one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}
