//! `dora-serve bench`: a load generator for a running server (or one it starts). Closed-loop
//! clients or open-loop Poisson arrivals, adapters chosen with Zipf popularity and a base
//! fraction, fixed or ranged prompt and output lengths (run to length with `ignore_eos`), all
//! from one seed. Reports throughput, TTFT/TPOT/end-to-end percentiles, errors by code, and the
//! server's adapter-cache and apply-mode counters over the run; JSON, SVG and `--compare`.

pub mod client;
pub mod plot;
pub mod report;
pub mod workload;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::config::BenchArgs;
use client::Record;
use report::{Report, ServerSide};
use workload::Workload;

/// A server this run started; stopped when dropped.
struct Spawned {
    child: Child,
    _store: tempfile::TempDir,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(model: &Path, extra: &[String]) -> anyhow::Result<(Spawned, String)> {
    let store = tempfile::tempdir()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--port", "0"]);
    if !extra.iter().any(|a| a.starts_with("--adapters-dir")) {
        cmd.arg("--adapters-dir").arg(store.path());
    }
    let mut child = cmd
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the server")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tail = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split("listening on ").nth(1) {
                let _ = tx.send(Ok(Some(url.trim().to_string())));
            }
            if line.contains("store checked in") {
                let _ = tx.send(Ok(None));
            }
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
        let _ = tx.send(Err(tail.join("\n")));
    });
    let spawned = Spawned {
        child,
        _store: store,
    };
    // Ready once it listens and its start-up store check (a full load of every stored
    // adapter, ~0.2 s each on two cores) is over: a run measured during the check measures
    // the check too (100 adapters took most of a 20 s run's CPU).
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let (mut url, mut checked) = (None, false);
    while url.is_none() || !checked {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(Some(u))) => url = Some(u),
            Ok(Ok(None)) => checked = true,
            Ok(Err(log)) => bail!("the server exited before it was ready:\n{log}"),
            Err(_) => {
                bail!("the server was not ready (listening, store checked) within 10 minutes")
            }
        }
    }
    Ok((spawned, url.context("the server gave no address")?))
}

async fn get_text(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
) -> anyhow::Result<String> {
    let mut req = client.get(url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("GET {url}: {status}: {text}");
    }
    Ok(text)
}

/// Write `n` random adapters for `model`'s shapes and upload them as `bench-000`….
async fn make_adapters(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    model: &Path,
    args: &BenchArgs,
) -> anyhow::Result<Vec<String>> {
    let opts = crate::model::LoadOptions {
        dtype: candle_core::DType::F32,
        device: candle_core::Device::Cpu,
        stored: true,
    };
    let loaded = crate::model::load(model, &opts)?;
    let dir = tempfile::tempdir()?;
    let mut names = Vec::new();
    for i in 0..args.make_adapters {
        let name = format!("bench-{i:03}");
        let d = dir.path().join(&name);
        let spec = args
            .synth
            .spec(args.seed.wrapping_add(i as u64))
            .map_err(anyhow::Error::msg)?;
        crate::adapter::write_random_adapter(&d, &loaded.model, &spec)?;
        let part = |f: &str| -> anyhow::Result<reqwest::multipart::Part> {
            Ok(reqwest::multipart::Part::bytes(std::fs::read(d.join(f))?).file_name(f.to_string()))
        };
        let form = reqwest::multipart::Form::new()
            .text("name", name.clone())
            .part("adapter_config", part("adapter_config.json")?)
            .part("adapter_model", part("adapter_model.safetensors")?);
        let mut req = client
            .post(format!("{url}/v1/adapters?replace=true"))
            .multipart(form);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            bail!(
                "uploading {name}: {}: {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        names.push(name);
    }
    Ok(names)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(files) = &args.compare {
        let read = |p: &PathBuf| -> anyhow::Result<Report> {
            Ok(serde_json::from_slice(
                &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            )?)
        };
        print!("{}", report::compare(&read(&files[0])?, &read(&files[1])?));
        return Ok(());
    }
    if args.concurrency.is_some() && args.rate.is_some() {
        bail!("give --concurrency (closed loop) or --rate (open loop), not both");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of requests per second");
    }
    if args
        .base_fraction
        .is_some_and(|f| !(0.0..=1.0).contains(&f))
    {
        bail!("--base-fraction must be between 0 and 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: BenchArgs) -> anyhow::Result<()> {
    let (_server, url) = match &args.spawn_model {
        Some(m) => {
            let (s, u) = spawn(m, &args.server_arg)?;
            (Some(s), u)
        }
        None => (None, args.url.trim_end_matches('/').to_string()),
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    let key = args.api_key.as_deref();
    let adapters = choose_adapters(&client, &url, &args).await?;
    let base_fraction = args
        .base_fraction
        .unwrap_or(if adapters.is_empty() { 1.0 } else { 0.0 });
    let workload = Arc::new(Mutex::new(
        Workload::new(
            args.seed,
            adapters.clone(),
            args.zipf,
            base_fraction,
            args.prompt_words,
            args.max_tokens,
        )
        .with_shared_prefixes(args.seed, args.shared_prefixes, args.prefix_words),
    ));
    if args.preload {
        preload(&client, &url, key, &adapters, args.quiet).await?;
    }
    let metrics_url = format!("{url}/metrics");
    let before = report::scrape(&get_text(&client, &metrics_url, key).await?).0;

    let records = Arc::new(Mutex::new(Vec::<Record>::new()));
    let sent = Arc::new(AtomicUsize::new(0));
    let limit = args.requests.unwrap_or(usize::MAX);
    let duration = Duration::from_secs_f64(args.duration);
    let bar = progress(&args);
    let t0 = Instant::now();
    let ignore_eos = !args.allow_eos;
    // Claims the next request slot, or None once the run is over.
    let claim = {
        let sent = Arc::clone(&sent);
        move || {
            (t0.elapsed() < duration && sent.fetch_add(1, Ordering::SeqCst) < limit).then_some(())
        }
    };
    let one = {
        let (client, url, key, records, bar) = (
            client.clone(),
            url.clone(),
            key.map(str::to_string),
            Arc::clone(&records),
            bar.clone(),
        );
        move |spec| {
            let (client, url, key, records, bar) = (
                client.clone(),
                url.clone(),
                key.clone(),
                Arc::clone(&records),
                bar.clone(),
            );
            async move {
                let rec = client::send(&client, &url, key.as_deref(), spec, ignore_eos, t0).await;
                records.lock().unwrap().push(rec);
                bar.inc(1);
            }
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut dropped = 0;
    let arrivals = if let Some(rate) = args.rate {
        let inflight = Arc::new(AtomicUsize::new(0));
        let mut next = 0.0;
        loop {
            next += workload.lock().unwrap().gap(rate);
            tokio::time::sleep_until((t0 + Duration::from_secs_f64(next)).into()).await;
            if claim().is_none() {
                break;
            }
            let spec = workload.lock().unwrap().next_spec();
            if inflight.load(Ordering::SeqCst) >= args.max_inflight {
                dropped += 1;
                continue;
            }
            inflight.fetch_add(1, Ordering::SeqCst);
            let (fut, inflight) = (one(spec), Arc::clone(&inflight));
            tasks.spawn(async move {
                fut.await;
                inflight.fetch_sub(1, Ordering::SeqCst);
            });
        }
        format!("Poisson, {rate} req/s")
    } else {
        let c = args.concurrency.unwrap_or(1).max(1);
        for _ in 0..c {
            let (one, claim, workload) = (one.clone(), claim.clone(), Arc::clone(&workload));
            tasks.spawn(async move {
                while claim().is_some() {
                    let spec = workload.lock().unwrap().next_spec();
                    one(spec).await;
                }
            });
        }
        format!("closed loop, {c} clients")
    };
    while tasks.join_next().await.is_some() {}
    bar.finish_and_clear();
    let (after, mode) = report::scrape(&get_text(&client, &metrics_url, key).await?);
    let records = std::mem::take(&mut *records.lock().unwrap());
    let rep = Report::build(
        &url,
        arrivals,
        adapters,
        args.zipf,
        base_fraction,
        args.warmup,
        records,
        dropped,
        ServerSide::delta(&before, &after, mode),
    );
    print!("{}", rep.table());
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&rep)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.plot {
        plot::write_svg(&rep, p)?;
    }
    Ok(())
}

/// The adapters a run uses: `--make-adapters` uploaded first, then `--adapters` more from the
/// server's list (sorted by name, valid ones only).
async fn choose_adapters(
    client: &reqwest::Client,
    url: &str,
    args: &BenchArgs,
) -> anyhow::Result<Vec<String>> {
    let key = args.api_key.as_deref();
    let mut adapters = Vec::new();
    if args.make_adapters > 0 {
        let model = args.spawn_model.as_ref().or(args.model.as_ref()).context(
            "--make-adapters needs the base model's shapes: give --spawn-model or --model",
        )?;
        let admin = args.admin_key.as_deref().or(key);
        adapters = make_adapters(client, url, admin, model, args).await?;
    }
    if args.adapters > 0 {
        let v: serde_json::Value =
            serde_json::from_str(&get_text(client, &format!("{url}/v1/adapters"), key).await?)?;
        let mut names: Vec<String> = v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] != "invalid")
            .filter_map(|a| a["name"].as_str().map(str::to_string))
            .filter(|n| !adapters.contains(n))
            .collect();
        names.sort();
        if names.len() < args.adapters {
            bail!(
                "--adapters {} but the server has {} usable adapters",
                args.adapters,
                names.len()
            );
        }
        adapters.extend(names.into_iter().take(args.adapters));
    }
    Ok(adapters)
}

/// One 1-token request per adapter, so that every adapter is loaded before the clock starts.
async fn preload(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    adapters: &[String],
    quiet: bool,
) -> anyhow::Result<()> {
    let t = Instant::now();
    for a in adapters {
        let spec = workload::Spec {
            adapter: Some(a.clone()),
            prompt: "warm".into(),
            max_tokens: 1,
        };
        let r = client::send(client, url, key, spec, true, t).await;
        if !r.ok() {
            bail!("preloading adapter {a}: {}", r.outcome);
        }
    }
    if !quiet {
        eprintln!(
            "preloaded {} adapters in {:.1} s",
            adapters.len(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn progress(args: &BenchArgs) -> indicatif::ProgressBar {
    if args.quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match args.requests {
        Some(n) => indicatif::ProgressBar::new(n as u64),
        None => indicatif::ProgressBar::no_length(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} {pos} requests done {wide_bar} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
