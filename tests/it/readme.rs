//! Docs that run: every shell command of README.md, parsed out of the file (so the two cannot
//! drift), run in order against a live server on the fetched SmolLM2 model. Needs
//! `scripts/fetch-model.sh` first, hence ignored and named for the `real_model` filter that
//! `scripts/test.sh` runs.
//!
//! What "as typed" means here:
//! - `cargo run --release --` becomes the `dora-serve` binary this test build made (a release
//!   build would take CI 10–15 minutes for the same code);
//! - the quickstart's `serve` runs in the background with `--host 127.0.0.1 --port 0` added
//!   (tests bind loopback, on a free port), and `localhost:8000` in later commands becomes its
//!   address;
//! - `curl` fails on an HTTP error status (`--fail-with-body`), so a 4xx fails the test;
//! - everything runs in a scratch folder holding a copy of `adapters/` and links to `models/`
//!   and `scripts/`, so the walkthrough's uploads and deletes never touch the repository.
//!
//! Skipped, by name: `scripts/test.sh` (the suite that runs this test) and the fuzz commands
//! (`cargo +nightly`, which CI does not have).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The ```sh blocks of `text`, in order, with their comment lines removed.
fn sh_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```sh") => current = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => blocks.extend(current.take()),
            (Some(b), l) if l.starts_with('#') && !b.ends_with("\\\n") => {}
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start the quickstart's `serve …` (the words after `cargo run --release --`).
// The child is waited for in `Drop`, which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn serve(dir: &Path, args: &str) -> Server {
    let log = dir.join("server.log");
    let child = Command::new(env!("CARGO_BIN_EXE_dora-serve"))
        .args(args.split_whitespace())
        .args(["--host", "127.0.0.1", "--port", "0"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        addr: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // The README's walkthrough may list the adapters' states: wait for the start-up check.
        if text.contains("store checked") {
            if let Some(rest) = text.split("listening on http://").nth(1) {
                server.addr = rest.split_whitespace().next().unwrap().to_string();
                return server;
            }
        }
        assert!(Instant::now() < deadline, "server did not start: {text}");
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "server exited: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run `script` with bash in `dir`; its output, or a panic naming the block.
fn run(dir: &Path, script: &str, what: &str) -> String {
    // curl as typed, but an HTTP error status is a failure.
    let prelude = "set -euo pipefail\ncurl() { command curl --fail-with-body -sS \"$@\"; }\n";
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("{prelude}{script}"))
        .current_dir(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "README {what} failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
#[ignore = "needs models/ from scripts/fetch-model.sh"]
fn real_model_readme_commands_run_as_typed() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = sh_blocks(&readme);
    assert!(blocks.len() >= 4, "found {} sh blocks", blocks.len());
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    copy_dir(&root.join("adapters"), &dir.join("adapters"));
    for link in ["models", "scripts"] {
        std::os::unix::fs::symlink(root.join(link), dir.join(link)).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_dora-serve");
    let mut server: Option<Server> = None;
    let (mut ran, mut skipped) = (0, Vec::new());
    for block in &blocks {
        let text = block.trim();
        if text == "scripts/test.sh" || text.starts_with("cd fuzz") {
            skipped.push(text.lines().next().unwrap_or_default().to_string());
            continue;
        }
        if let Some((before, args)) = text.split_once("cargo run --release -- serve ") {
            // `scripts/fetch-model.sh && cargo run --release -- serve --model …`
            let setup = before.trim().trim_end_matches("&&").trim();
            if !setup.is_empty() {
                run(dir, setup, "quickstart set-up");
            }
            server = Some(serve(dir, &format!("serve {args}")));
            ran += 1;
            continue;
        }
        let addr = server
            .as_ref()
            .map(|s| s.addr.clone())
            .expect("a block that needs the server came before the quickstart");
        let script = text
            .replace("cargo run --release --", bin)
            .replace("localhost:8000", &addr);
        let out = run(dir, &script, "block");
        if script.contains("/v1/chat/completions") && script.contains("\"stream\": true") {
            assert!(out.contains("data: [DONE]"), "{out}");
        }
        ran += 1;
    }
    assert_eq!(
        skipped,
        [
            "scripts/test.sh",
            "cd fuzz && cargo +nightly fuzz run adapter_load /tmp/corpus-a corpus/adapter_load -- -max_total_time=600"
        ],
        "only the suite itself and the nightly fuzz commands are skipped"
    );
    assert!(ran >= 3, "{ran} blocks ran");
    // The walkthrough leaves the store as it found it (it uploads and deletes its own name).
    let names: Vec<String> = std::fs::read_dir(dir.join("adapters"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(!names.iter().any(|n| n == "my-pirate"), "{names:?}");
}
