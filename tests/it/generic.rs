//! The device-generic path (candle's tensor ops only, what `cuda` and `metal` run) must be as
//! exact as the CPU kernels: this test runs the whole-model parity tests again in a child
//! process with `DORA_KERNELS=generic` (every family, PEFT fixtures, merged vs unmerged vs reference, mixed
//! batches, the HTTP paths). `scripts/test.sh` does the same for the real-model tests. Left
//! out: the stored-format tests, which check that GGUF blocks stay in memory (the generic path
//! dequantises them at load, as on a GPU).

use std::process::Command;

use dora_serve::ops::kernels::{self, Kernels};

#[test]
fn kernels_follow_the_environment() {
    let want = match std::env::var("DORA_KERNELS").as_deref() {
        Ok("generic") => Kernels::Generic,
        _ => Kernels::Cpu,
    };
    assert_eq!(kernels::get(), want);
}

#[test]
fn the_generic_path_passes_the_whole_model_parity_tests() {
    if std::env::var("DORA_KERNELS").is_ok() {
        return; // the child run itself
    }
    let modules = [
        "parity::",
        "families::",
        "adapters::",
        "engine::",
        "props::",
        "catalog::",
        "api::",
        "http::",
        "loaders::",
        "validation::",
        "shared_store::",
        "generic::kernels_follow",
    ];
    let out = Command::new(std::env::current_exe().unwrap())
        .env("DORA_KERNELS", "generic")
        .args(modules)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the generic path failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passed: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        passed >= 60,
        "only {passed} tests ran on the generic path:\n{text}"
    );
}
