use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

use dora_serve::config::{Cli, Command, GenerateArgs, ModelArgs};
use dora_serve::engine::{generate_with_stats, GenerateRequest, SamplingParams};
use dora_serve::model::{self, LoadOptions, LoadedModel};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => run_generate(args),
    }
}

/// Load the model, with a progress line on stderr (it takes seconds on a real model).
fn load_model(args: &ModelArgs) -> anyhow::Result<LoadedModel> {
    let device = args
        .device
        .open()
        .with_context(|| format!("cannot open device {:?}", args.device))?;
    let opts = LoadOptions {
        dtype: args.dtype.to_candle(),
        device,
    };
    let start = Instant::now();
    eprint!("loading {} as {:?} …", args.model.display(), args.dtype);
    let _ = std::io::stderr().flush();
    let loaded = model::load(&args.model, &opts);
    match &loaded {
        Ok(m) => {
            let c = m.model.config();
            eprintln!(
                " done in {:.2}s ({} layers, hidden {}, vocab {}, context {})",
                start.elapsed().as_secs_f64(),
                c.num_hidden_layers,
                c.hidden_size,
                c.vocab_size,
                c.max_context
            );
        }
        Err(_) => eprintln!(" failed"),
    }
    Ok(loaded?)
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = load_model(&args.model)?;
    let prompt_ids = loaded.tokenizer.encode(&args.prompt)?;
    let req = GenerateRequest {
        prompt_token_ids: prompt_ids,
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        logprobs: args.logprobs,
        stop_token_ids: loaded.info.eos_token_ids.clone(),
    };
    let (mut outs, stats) = generate_with_stats(&loaded.model, &loaded.tokenizer, std::slice::from_ref(&req))?;
    let out = outs.pop().context("generation returned no output")?;
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}{}", args.prompt, out.text);
    }
    eprintln!(
        "{} prompt tokens in {:.3}s; {} generated, decode {:.1} tok/s; finish: {}",
        out.prompt_token_ids.len(),
        stats.prefill_secs,
        out.token_ids.len(),
        stats.decode_tokens_per_sec(),
        serde_json::to_string(&out.finish_reason)?.trim_matches('"'),
    );
    Ok(())
}
