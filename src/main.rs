use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;

use dora_serve::adapter::{self, AdapterStore, Catalog, Lease};
use dora_serve::config::{
    AdapterCommand, Cli, Command, GenerateArgs, InspectArgs, ModelArgs, RandomArgs, ServeArgs,
};
use dora_serve::engine::{
    AdapterSpec, Engine, EngineConfig, EngineRequest, Event, FinishReason, GenerateOutput,
    LogprobsAsk, SamplingParams,
};
use dora_serve::http::{self, AppState, HttpConfig};
use dora_serve::model::{self, LoadOptions, LoadedModel};

/// Once the model is loaded, glibc's malloc is told to keep up to 16 MiB of freed memory at
/// the top of its heap and to serve blocks of up to 64 MiB from it. Its default (an mmap
/// threshold that adapts, and giving memory back past twice it) faulted every prefill step's
/// few-MiB activations in afresh: a 512-token SmolLM2 F32 prefill spent ~7% in page faults.
/// Through HTTP, 7 interleaved rounds: 0.714 → 0.632 s. Peak RSS of a 16-sequence decode:
/// 1B-shaped Q4_K_M 786 → 781 MB, SmolLM2 Q8_0 231 → 233 MB. (Set before loading, or with a
/// 32 MiB threshold, it cost 13–60 MB of peak RSS: the loader's temporaries stayed in the heap.
/// A trim threshold of 8 MiB gave back most of the gain.) First, what the loader freed goes
/// back to the system (`malloc_trim`): the tokenizer's build from GGUF metadata leaves tens of
/// MB of freed heap behind. Peak RSS of that decode: Gemma 3 270M Q4_K_M (262k-token vocab)
/// 432 → 401 MB, SmolLM2 Q8_0 233 → 225 MB. The threshold went from 4 to 64 MiB for larger
/// models, whose prefill activations are bigger (512 rows × 8192 = 16 MiB): each was mapped
/// and unmapped afresh, with page faults and TLB-shootdown interrupts (~8% of the time in the
/// kernel). 1B-shaped Q4_K_M, 512-token TTFT through HTTP, 3 interleaved rounds: 4.60 → 3.92
/// s; its 16-sequence decode peak RSS 772 → 778 MB; SmolLM2's unchanged (its activations
/// were under 4 MiB already).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory; mallopt only changes tunables.
    unsafe {
        libc::malloc_trim(0);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

/// candle asks for its thread count on every parallel op and, unless `RAYON_NUM_THREADS` is
/// set, counts physical cores by reading `/proc/cpuinfo` each time (7,890 reads in a 16-token
/// batch of 8, ~3% of decode time in the kernel). Setting the variable once, to what rayon
/// would use anyway, answers it from the environment. Runs first in `main`, before any thread
/// exists, which is what makes `set_var` sound.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

fn main() -> anyhow::Result<()> {
    pin_thread_count();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Adapter(AdapterCommand::Inspect(args)) => run_inspect(args),
        Command::Adapter(AdapterCommand::Random(args)) => run_random(args),
        Command::Serve(args) => run_serve(args),
        Command::Bench(args) => dora_serve::bench::run(args),
        Command::Openapi => {
            print!("{}", dora_serve::http::openapi::yaml());
            Ok(())
        }
    }
}

/// Load the model, with a progress line on stderr (it takes seconds on a real model).
fn load_model(args: &ModelArgs) -> anyhow::Result<LoadedModel> {
    if let Some(k) = args
        .kernels
        .as_deref()
        .and_then(dora_serve::ops::kernels::Kernels::parse)
    {
        dora_serve::ops::kernels::set(k);
    }
    let device = args
        .device
        .open()
        .with_context(|| format!("cannot open device {:?}", args.device))?;
    let opts = LoadOptions {
        dtype: args.dtype.to_candle(),
        device,
        stored: args.dtype.stored(),
    };
    let start = Instant::now();
    eprint!("loading {} as {:?} …", args.model.display(), args.dtype);
    let _ = std::io::stderr().flush();
    let mut int8 = 0;
    let loaded = model::load(&args.model, &opts).and_then(|mut m| {
        m.model
            .set_merged_dtype(args.merged_dtype.to_ggml())
            .map_err(|source| model::ModelError::Weights {
                path: args.model.clone(),
                source,
            })?;
        int8 = m.model.set_int8_activations(args.int8_activations);
        Ok(m)
    });
    match &loaded {
        Ok(m) => {
            keep_freed_memory();
            let c = m.model.config();
            eprintln!(
                " done in {:.2}s ({}, {} layers, hidden {}, vocab {}, context {}); weights: {}; kernels: {}{}",
                start.elapsed().as_secs_f64(),
                c.family,
                c.num_hidden_layers,
                c.hidden_size,
                c.vocab_size,
                c.max_context,
                m.model.weights_summary(),
                dora_serve::ops::kernels::get().as_str(),
                match (args.int8_activations, int8) {
                    (false, _) => String::new(),
                    (true, 0) => " (--int8-activations: no matrix it applies to, all exact)".into(),
                    (true, n) => format!(" (int8 activations over {n} matrices)"),
                }
            );
        }
        Err(_) => eprintln!(" failed"),
    }
    Ok(loaded?)
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let loaded = load_model(&args.model)?;
    let adapter = adapter::load_dir(&args.dir, &loaded.model)
        .with_context(|| format!("adapter {} is not servable", args.dir.display()))?;
    // Merging once tells what merged mode costs for this adapter.
    let start = Instant::now();
    let merged = loaded.model.merge(&adapter.weights)?;
    let merge_secs = start.elapsed().as_secs_f64();
    if args.json {
        let mut v = serde_json::to_value(&adapter.info)?;
        v["merge_secs"] = merge_secs.into();
        v["merged_bytes"] = merged.bytes().into();
        v["base_weights"] = loaded.model.weights_summary().to_string().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("base:    {}", loaded.model.weights_summary());
        println!("adapter: {}", args.dir.display());
        print!("{}", adapter.info);
        println!(
            "merge:   {merge_secs:.3}s, {} bytes of merged weights",
            merged.bytes()
        );
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    for (name, v) in [
        ("--max-running", args.max_running),
        ("--max-step-tokens", args.max_step_tokens),
        ("--max-queued", args.max_queued),
    ] {
        if v == 0 {
            bail!("{name} must be positive");
        }
    }
    if !(args.adapter_refresh > 0.0 && args.adapter_refresh.is_finite()) {
        bail!("--adapter-refresh must be a positive number of seconds");
    }
    let store = match &args.adapter_store {
        None => AdapterStore::open(&args.adapters_dir).with_context(|| {
            format!(
                "cannot open the adapter store {}",
                args.adapters_dir.display()
            )
        })?,
        Some(url) => {
            let remote = adapter::RemoteOptions {
                disk_cache_dir: args.adapter_disk_cache_dir.clone().unwrap_or_else(|| {
                    // One folder per replica on a host: by port, or by process for --port 0.
                    let who = match args.port {
                        0 => format!("pid-{}", std::process::id()),
                        p => format!("port-{p}"),
                    };
                    std::env::temp_dir()
                        .join("dora-serve-adapter-cache")
                        .join(who)
                }),
                disk_cache_bytes: args.adapter_disk_cache_bytes as u64,
                ..Default::default()
            };
            AdapterStore::open_url(url, remote)
                .with_context(|| format!("cannot open the adapter store {url}"))?
        }
    };
    eprintln!("adapter store: {}", store.url());
    let remote = store.is_remote();
    let store = store.with_write_pause(std::time::Duration::from_millis(
        args.test_store_write_pause_ms,
    ));
    let catalog = Catalog::new(store, args.adapter_root.clone());
    let mut loaded = load_model(&args.model)?;
    // Served under `--model` as given (vLLM's convention) unless `--served-model-name` says.
    if let Some(name) = &args.served_model_name {
        loaded.info.id = name.clone();
    }
    let engine = Engine::start(
        loaded,
        catalog,
        EngineConfig {
            max_running: args.max_running,
            max_step_tokens: args.max_step_tokens,
            max_queued: args.max_queued,
            mode: args.adapter_mode,
            adapter_cache_bytes: args.adapter_cache_bytes,
            merged_cache_bytes: args.merged_cache_bytes,
            prefix_cache_bytes: args.prefix_cache_bytes,
            prefill_share: args.prefill_share,
            step_delay: std::time::Duration::from_millis(args.test_step_delay_ms),
            ..EngineConfig::default()
        },
    );
    let state = AppState::new(
        engine.clone(),
        HttpConfig {
            api_key: args.api_key.clone(),
            admin_key: args.admin_key.clone(),
            max_upload_bytes: args.max_upload_bytes,
            request_timeout: (args.request_timeout > 0)
                .then(|| std::time::Duration::from_secs(args.request_timeout)),
        },
    );
    // Refuse (with a log line) stored adapters that no longer validate; keep serving the rest.
    // In the background: a full load per adapter would delay listening by ~0.2 s per adapter.
    let checker = engine.clone();
    std::thread::Builder::new()
        .name("dora-store-check".into())
        .spawn(move || {
            let start = Instant::now();
            let bad = checker.check_adapters();
            // On stderr like the listening line: `dora-serve bench --spawn-model` waits for it
            // so that its clock never runs while the check loads every adapter.
            eprintln!(
                "dora-serve store checked in {:.1}s: {} adapter(s) refused",
                start.elapsed().as_secs_f64(),
                bad.len()
            );
        })?;
    if remote {
        // Other replicas' uploads, replaces and deletes reach this one within the interval.
        let refresher = engine.clone();
        let every = std::time::Duration::from_secs_f64(args.adapter_refresh);
        std::thread::Builder::new()
            .name("dora-store-refresh".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                if let Err(e) = refresher.refresh_adapters() {
                    tracing::debug!("adapter store refresh: {e}");
                }
            })?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!("dora-serve listening on http://{}", listener.local_addr()?);
        let grace = std::time::Duration::from_secs(args.shutdown_grace);
        axum::serve(listener, http::app(state))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!(
                    "shutting down: no new connections; in-flight requests get {}s",
                    grace.as_secs()
                );
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    eprintln!("grace period over; exiting");
                    std::process::exit(0);
                });
            })
            .await?;
        engine.shutdown();
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn run_random(args: RandomArgs) -> anyhow::Result<()> {
    args.synth.spec(0).map_err(anyhow::Error::msg)?;
    if args.count == 0 {
        bail!("--count must be positive");
    }
    let loaded = load_model(&args.model)?;
    for i in 0..args.count {
        let dir = if args.count == 1 {
            args.out.clone()
        } else {
            PathBuf::from(format!("{}-{i}", args.out.display()))
        };
        let spec = args
            .synth
            .spec(args.seed + i as u64)
            .map_err(anyhow::Error::msg)?;
        adapter::write_random_adapter(&dir, &loaded.model, &spec)?;
        let a = adapter::load_dir(&dir, &loaded.model)?;
        eprintln!(
            "wrote {} ({} r{}, {} bytes loaded)",
            dir.display(),
            a.info.kind,
            a.info.r,
            a.info.bytes
        );
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    prompt: String,
    #[serde(default)]
    adapter: Option<PathBuf>,
}

/// (prompt, adapter folder) pairs from `--prompt`/`--adapter` or `--batch`.
fn prompts_of(args: &GenerateArgs) -> anyhow::Result<Vec<(String, Option<PathBuf>)>> {
    if let Some(file) = &args.batch {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        return text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let line: BatchLine = serde_json::from_str(l).with_context(|| {
                    format!(
                        "{} line {}: expected {{\"prompt\": \"...\", \"adapter\": \"FOLDER\" | null}}",
                        file.display(),
                        i + 1
                    )
                })?;
                Ok((line.prompt, line.adapter))
            })
            .collect();
    }
    let adapter_of = |p: &PathBuf| (p.as_os_str() != "none").then(|| p.clone());
    match args.adapter.len() {
        0 => Ok(args.prompt.iter().map(|p| (p.clone(), None)).collect()),
        1 => Ok(args.prompt.iter().map(|p| (p.clone(), adapter_of(&args.adapter[0]))).collect()),
        n if n == args.prompt.len() => Ok(args
            .prompt
            .iter()
            .zip(&args.adapter)
            .map(|(p, a)| (p.clone(), adapter_of(a)))
            .collect()),
        n => bail!(
            "{n} --adapter for {} --prompt: give one adapter for all prompts, or one per prompt (`none` for the base model)",
            args.prompt.len()
        ),
    }
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let prompts = prompts_of(&args)?;
    if prompts.is_empty() {
        bail!("no prompts to run");
    }
    let loaded = load_model(&args.model)?;
    let mut adapters: HashMap<PathBuf, Lease> = HashMap::new();
    for dir in prompts.iter().filter_map(|(_, a)| a.as_ref()) {
        if !adapters.contains_key(dir) {
            let start = Instant::now();
            let a = adapter::load_dir(dir, &loaded.model)
                .with_context(|| format!("adapter {} is not servable", dir.display()))?;
            eprintln!(
                "adapter {}: {} r{} on {} modules, loaded in {:.3}s",
                dir.display(),
                a.info.kind,
                a.info.r,
                a.info.modules.len(),
                start.elapsed().as_secs_f64()
            );
            adapters.insert(dir.clone(), Arc::new(a));
        }
    }
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        ..SamplingParams::default()
    };
    let reqs = prompts
        .iter()
        .map(|(prompt, dir)| {
            Ok(EngineRequest {
                sampling: sampling.clone(),
                logprobs: args.logprobs.map(LogprobsAsk::top),
                ignore_eos: args.ignore_eos,
                adapter: dir
                    .as_ref()
                    .map(|d| AdapterSpec::Loaded(Arc::clone(&adapters[d.as_path()]))),
                ..EngineRequest::new(loaded.tokenizer.encode(prompt)?, args.max_tokens)
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // One batch: every prompt runs at once, prompts prefilled together.
    let total_prompt: usize = reqs.iter().map(|r| r.prompts[0].len()).sum();
    // Adapters here are folders loaded above, never names: the catalog is an empty scratch
    // store, removed at exit.
    let scratch = tempfile::tempdir().context("creating a scratch adapter store")?;
    let engine = Engine::start(
        loaded,
        Catalog::open(scratch.path())?,
        EngineConfig {
            max_running: reqs.len(),
            max_step_tokens: total_prompt.max(reqs.len()),
            max_queued: reqs.len(),
            mode: args.mode,
            merge_after: 0,
            ..EngineConfig::default()
        },
    );
    let start = Instant::now();
    // All rows in one command, so the first step prefills every prompt together.
    let valid = reqs
        .iter()
        .map(|r| engine.validate(r.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let streams: Vec<_> = engine.submit_all(valid)?.into_iter().flatten().collect();
    let mut outs = Vec::with_capacity(streams.len());
    let mut first_token_at: Option<Instant> = None;
    // The KV cache's peak, sampled once a step (the first sequence's tokens).
    let mut kv_peak = 0usize;
    for (req, mut stream) in reqs.into_iter().zip(streams) {
        let mut out = GenerateOutput {
            prompt_token_ids: req.prompts[0].clone(),
            token_ids: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Length,
            logprobs: req.logprobs.map(|_| Vec::new()),
        };
        while let Some(event) = stream.blocking_next() {
            match event {
                Event::Token {
                    token_id,
                    text,
                    logprob,
                } => {
                    // Prompts are prefilled in one step, so the first token to arrive marks
                    // the start of decoding for every sequence.
                    first_token_at.get_or_insert_with(Instant::now);
                    if outs.is_empty() {
                        kv_peak = kv_peak.max(engine.stats().kv_bytes);
                    }
                    out.token_ids.push(token_id);
                    out.text.push_str(&text);
                    if let (Some(lps), Some(lp)) = (out.logprobs.as_mut(), logprob) {
                        lps.push(lp);
                    }
                }
                Event::Done {
                    finish_reason,
                    text,
                    ..
                } => {
                    out.text.push_str(&text);
                    out.finish_reason = finish_reason;
                    break;
                }
                Event::Error(e) => return Err(e.into()),
                Event::PromptLogprobs(_) => {}
            }
        }
        outs.push(out);
    }
    let end = Instant::now();
    engine.shutdown();
    for ((prompt, _), out) in prompts.iter().zip(&outs) {
        if args.json {
            println!("{}", serde_json::to_string(out)?);
        } else {
            println!("{prompt}{}", out.text);
        }
    }
    let generated: usize = outs.iter().map(|o| o.token_ids.len()).sum();
    let decode_tokens = generated.saturating_sub(outs.len());
    let decode_secs = first_token_at.map_or(0.0, |t| (end - t).as_secs_f64());
    eprintln!(
        "{} sequence(s), {} prompt tokens; {} generated in {:.2}s; decode {:.1} tok/s; \
         KV cache peak {:.1} MB",
        outs.len(),
        total_prompt,
        generated,
        (end - start).as_secs_f64(),
        if decode_secs > 0.0 {
            decode_tokens as f64 / decode_secs
        } else {
            0.0
        },
        kv_peak as f64 / 1e6,
    );
    Ok(())
}
