//! The real `dora-serve serve` process, over sockets: killed hard in the middle of an upload,
//! stopped with SIGTERM while a request streams, and flooded past its capacity.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::fixtures;

/// A server process on the tiny model.
struct Proc {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Proc {
    fn start(store: &Path, extra: &[&str]) -> Proc {
        Self::start_on(&fixtures().join("tiny-llama"), store, extra)
    }

    // The child is waited for in `Drop`, which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    fn start_on(model: &Path, store: &Path, extra: &[&str]) -> Proc {
        let log = store.with_extension(format!("log-{}", std::process::id()));
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dora-serve"))
            .args(["serve", "--model"])
            .arg(model)
            .arg("--adapters-dir")
            .arg(store)
            .args(["--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(rest) = text.split("listening on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
                return Proc { child, addr, log };
            }
            if Instant::now() > deadline {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not start: {text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn rss_peak_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// One HTTP/1.1 exchange on a fresh connection: (status, headers, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    ctype: &str,
    body: &[u8],
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    c.write_all(body)?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw.get(split + 4..).unwrap_or_default().to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, head, body))
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
    out
}

fn post_json(addr: SocketAddr, path: &str, v: &Value) -> std::io::Result<(u16, String, Vec<u8>)> {
    http(
        addr,
        "POST",
        path,
        "application/json",
        v.to_string().as_bytes(),
    )
}

fn multipart_body(name: &str, cfg: &[u8], st: &[u8]) -> (String, Vec<u8>) {
    let b = "dora-proc-boundary";
    let mut body = Vec::new();
    for (field, value) in [
        ("name", name.as_bytes()),
        ("adapter_config", cfg),
        ("adapter_model", st),
    ] {
        body.extend_from_slice(format!("--{b}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{field}\"\r\n\r\n").as_bytes());
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{b}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={b}"), body)
}

/// A large (≈11 MB) valid LoRA adapter for the tiny model, so that a write takes a while.
fn big_adapter(dir: &Path, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let out = dir.join(format!("big-src-{seed}"));
    let st = Command::new(env!("CARGO_BIN_EXE_dora-serve"))
        .args(["adapter", "random", "--model"])
        .arg(fixtures().join("tiny-llama"))
        .arg("--out")
        .arg(&out)
        .args(["--rank", "2048", "--lora", "--seed", &seed.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let files = (
        std::fs::read(out.join("adapter_config.json")).unwrap(),
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
    );
    std::fs::remove_dir_all(&out).unwrap();
    files
}

fn stored(store: &Path, name: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let d = store.join(name);
    Some((
        std::fs::read(d.join("adapter_config.json")).ok()?,
        std::fs::read(d.join("adapter_model.safetensors")).ok()?,
    ))
}

/// Hidden folders in the store: what an interrupted write leaves.
fn dotted(store: &Path) -> Vec<String> {
    std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[derive(Debug, Default)]
struct Kills {
    /// The store kept the previous state / holds the new upload.
    kept: usize,
    landed: usize,
    /// Kills that left a partial write on disk (which the restart must clean).
    partial: usize,
}

/// Upload version `v` of "big" to a fresh server, kill it hard when `kill_when` returns, then
/// restart and check the store holds the old whole version, the new whole one, or (for a
/// first upload) nothing, with no leftovers, and that whatever it holds serves.
fn kill_during_upload(
    store: &Path,
    i: usize,
    v: &(Vec<u8>, Vec<u8>),
    server_args: &[&str],
    kill_when: impl FnOnce(&Path),
    k: &mut Kills,
) {
    let p = Proc::start(store, server_args);
    let before = stored(store, "big");
    let (ctype, body) = multipart_body("big", &v.0, &v.1);
    let path = if before.is_some() {
        "/v1/adapters?replace=true"
    } else {
        "/v1/adapters"
    };
    let addr = p.addr;
    let path2 = path.to_string();
    std::thread::spawn(move || {
        let _ = http(addr, "POST", &path2, &ctype, &body);
    });
    kill_when(store);
    p.kill();
    if !dotted(store).is_empty() {
        k.partial += 1;
    }
    // Restart: the store recovers; the adapter is the old whole, the new whole, or absent.
    let p = Proc::start(store, &[]);
    let now = stored(store, "big");
    match (&before, &now) {
        (_, Some(n)) if n == v => k.landed += 1,
        (Some(b), Some(n)) => {
            assert!(n == b, "kill {i}: the stored adapter is neither version");
            k.kept += 1;
        }
        (None, None) => k.kept += 1,
        (Some(_), None) => panic!("kill {i}: a replace lost the old version"),
        (None, Some(_)) => panic!("kill {i}: the stored adapter is not the upload"),
    }
    let leftovers = dotted(store);
    assert!(
        leftovers.is_empty(),
        "kill {i}: leftovers after restart: {leftovers:?}"
    );
    if now.is_some() {
        let (st, _, body) =
            http(p.addr, "GET", "/v1/adapters/big", "application/json", b"").unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (st, v["state"].as_str()),
            (200, Some("on_disk")),
            "kill {i}: {v}"
        );
        let (st, _, body) = post_json(
            p.addr,
            "/v1/completions",
            &json!({"prompt": "Hi", "adapter": "big", "max_tokens": 2}),
        )
        .unwrap();
        assert_eq!(st, 200, "kill {i}: {}", String::from_utf8_lossy(&body));
    }
    p.kill();
}

#[test]
fn killed_mid_upload_the_store_holds_the_whole_adapter_or_none() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let versions = [big_adapter(tmp.path(), 1), big_adapter(tmp.path(), 2)];
    // Time one whole upload, to spread the kills over it.
    let p = Proc::start(&store, &[]);
    let (ctype, body) = multipart_body("timing", &versions[0].0, &versions[0].1);
    let t = Instant::now();
    let (status, _, text) = http(p.addr, "POST", "/v1/adapters", &ctype, &body).unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&text));
    let whole = t.elapsed();
    p.kill();
    let mut k = Kills::default();
    // Kills spread in time, from early in the body to just past the answer: where they land
    // depends on the machine.
    let at = [
        0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.96, 1.0, 1.05, 1.1, 1.2,
    ];
    for (i, frac) in at.into_iter().enumerate() {
        kill_during_upload(
            &store,
            i,
            &versions[i % 2],
            &[],
            |_| std::thread::sleep(whole.mul_f64(frac)),
            &mut k,
        );
    }
    // Kills that certainly land mid-write: the server pauses between the two files of each
    // write (a hidden test flag), and the kill comes once the first file is on disk.
    for i in 0..4 {
        kill_during_upload(
            &store,
            at.len() + i,
            &versions[i % 2],
            &["--test-store-write-pause-ms", "60000"],
            |store| {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let mid = dotted(store).iter().any(|d| {
                        d.starts_with(".tmp-")
                            && store.join(d).join("adapter_config.json").is_file()
                    });
                    if mid {
                        break;
                    }
                    assert!(Instant::now() < deadline, "the write never started");
                    std::thread::sleep(Duration::from_millis(5));
                }
            },
            &mut k,
        );
    }
    eprintln!(
        "kills: {} left the previous state, {} the new upload; {} left a partial write that the restart cleaned",
        k.kept, k.landed, k.partial
    );
    assert!(
        k.partial >= 4,
        "the kills timed to land mid-write must leave partial writes: {k:?}"
    );
    assert_eq!(k.kept + k.landed, at.len() + 4);
}

#[test]
fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    // Each step pauses 20 ms (a hidden test flag): the 240-token stream below runs for at
    // least 4.8 s, so the shutdown certainly lands while it is in flight.
    let mut p = Proc::start(
        &tmp.path().join("store"),
        &["--shutdown-grace", "60", "--test-step-delay-ms", "20"],
    );
    let addr = p.addr;
    let body = json!({"prompt": "Hello", "max_tokens": 240, "ignore_eos": true, "n": 8, "stream": true, "temperature": 0});
    let inflight = std::thread::spawn(move || post_json(addr, "/v1/completions", &body).unwrap());
    // Wait until it is generating.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, _, m) = http(addr, "GET", "/metrics", "text/plain", b"").unwrap();
        // The gauge is written as a float ("0.0"): parse it, do not match the text.
        let running = String::from_utf8_lossy(&m)
            .lines()
            .find_map(|l| l.strip_prefix("dora_running_requests "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if running > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_ok()
        && http(addr, "GET", "/health", "text/plain", b"").is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "new connections are still accepted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !inflight.is_finished(),
        "connections were refused while the request was still in flight"
    );
    let (status, _, streamed) = inflight.join().unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&streamed);
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the in-flight stream finished: …{}",
        &text[text.len().saturating_sub(200)..]
    );
    assert_eq!(
        text.matches("\"finish_reason\":\"length\"").count(),
        8,
        "all 8 choices ran to max_tokens"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            break st.code();
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
}

#[test]
fn twice_the_sustainable_rate_is_shed_with_429_and_service_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let p = Proc::start(
        &tmp.path().join("store"),
        &["--max-running", "2", "--max-queued", "4"],
    );
    let addr = p.addr;
    let req =
        json!({"prompt": "Hello there", "max_tokens": 24, "ignore_eos": true, "temperature": 0});
    // Sustainable rate: a closed loop at the running limit.
    let t = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let req = req.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while t.elapsed() < Duration::from_secs(2) {
                    assert_eq!(post_json(addr, "/v1/completions", &req).unwrap().0, 200);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let done: u32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let rate = done as f64 / t.elapsed().as_secs_f64();
    let rss_before = p.rss_peak_kib();
    // Open loop at twice that rate for 3 s.
    let interval = Duration::from_secs_f64(1.0 / (2.0 * rate));
    let start = Instant::now();
    let mut senders = Vec::new();
    let mut k = 0u32;
    while start.elapsed() < Duration::from_secs(3) {
        let due = interval * k;
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let req = req.clone();
        senders.push(std::thread::spawn(move || {
            post_json(addr, "/v1/completions", &req).unwrap()
        }));
        k += 1;
    }
    let (mut ok, mut shed) = (0, 0);
    for s in senders {
        let (status, head, body) = s.join().unwrap();
        match status {
            200 => ok += 1,
            429 => {
                shed += 1;
                assert!(
                    head.to_ascii_lowercase().contains("retry-after: "),
                    "{head}"
                );
                let v: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["error"]["code"], "overloaded");
            }
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    assert!(
        shed > 0,
        "twice the sustainable rate ({rate:.1}/s) must shed load ({ok} served)"
    );
    assert!(ok > 0);
    // Bounded memory: the flood did not grow the peak by more than 64 MiB.
    let growth = p.rss_peak_kib().saturating_sub(rss_before);
    assert!(
        growth < 64 * 1024,
        "peak RSS grew by {growth} KiB under overload"
    );
    // Service resumes at once.
    let (status, _, body) = post_json(addr, "/v1/completions", &req).unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    eprintln!("sustainable {rate:.1} req/s; at 2×: {ok} served, {shed} shed with 429; peak RSS +{growth} KiB");
}

/// The base model is served under `--model` as typed (vLLM's convention), not the GGUF's own
/// `general.name`, which `GET /v1/models` shows as metadata; `--served-model-name` renames it.
#[test]
fn the_base_model_id_is_the_model_argument_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // Relative, as a user types it (the test runs in the package root).
    let typed = "tests/fixtures/tiny-llama.gguf";
    for (extra, want) in [
        (&[][..], typed),
        (&["--served-model-name", "base"][..], "base"),
    ] {
        let p = Proc::start_on(Path::new(typed), &store, extra);
        let (st, _, body) = http(p.addr, "GET", "/v1/models", "application/json", b"").unwrap();
        assert_eq!(st, 200);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"][0]["id"], want, "{v}");
        assert_eq!(v["data"][0]["base"]["name"], "tiny-llama", "{v}");
        assert_eq!(v["data"][0]["base"]["family"], "llama", "{v}");
        assert_eq!(v["data"][0]["base"]["max_model_len"], 256, "{v}");
        let (st, _, body) = post_json(
            p.addr,
            "/v1/completions",
            &json!({"model": want, "prompt": "Hi", "max_tokens": 1}),
        )
        .unwrap();
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        p.kill();
    }
}
