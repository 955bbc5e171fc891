//! Command-line arguments (clap) and their validated, typed form.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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

/// How adapters are applied during generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Adapter terms added per row group; any mix of adapters in one batch.
    Unmerged,
    /// Adapters merged into their own weight copies; adapters take turns.
    Merged,
    /// Merged while one adapter has all running rows, unmerged otherwise.
    Auto,
}

impl ModeArg {
    pub fn policy(self) -> crate::engine::scheduler::ModePolicy {
        use crate::engine::scheduler::ModePolicy;
        match self {
            ModeArg::Unmerged => ModePolicy::Unmerged,
            ModeArg::Merged => ModePolicy::Merged,
            ModeArg::Auto => ModePolicy::Auto,
        }
    }
}

/// Serving dtype of the model's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl DTypeArg {
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            DTypeArg::F32 => candle_core::DType::F32,
            DTypeArg::F16 => candle_core::DType::F16,
            DTypeArg::Bf16 => candle_core::DType::BF16,
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
    /// Serving dtype. f32 is the fast and exact choice on CPU.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
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
    #[arg(long, visible_alias = "adapter-mode", value_enum, default_value_t = ModeArg::Unmerged)]
    pub mode: ModeArg,
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
