//! `dora-serve generate` as a user runs it.

use std::process::Command;

use crate::util::{expected, fixtures};

fn dora() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dora-serve"))
}

#[test]
fn generate_json_has_the_documented_shape() {
    let exp = &expected()["tiny-llama"][0];
    let out = dora()
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-llama.gguf"))
        .args([
            "--prompt",
            &exp.prompt,
            "--max-tokens",
            "5",
            "--logprobs",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "exactly one JSON object: {stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(v["prompt_token_ids"].clone()).unwrap();
    assert_eq!(ids, exp.prompt_token_ids);
    let toks: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
    assert_eq!(toks, exp.greedy_token_ids[..5]);
    assert!(v["text"].is_string());
    assert_eq!(v["finish_reason"], "length");
    let lps = v["logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), 5);
    for (lp, tok) in lps.iter().zip(&toks) {
        assert_eq!(lp["token_id"], *tok);
        let top = lp["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy picks the most likely token: it heads the list, with the same log-probability.
        assert_eq!(top[0]["token_id"], *tok);
        assert_eq!(top[0]["logprob"], lp["logprob"]);
        let x = lp["logprob"].as_f64().unwrap();
        assert!(x <= 0.0 && x.is_finite());
        assert!(top[1]["logprob"].as_f64().unwrap() <= x);
    }
}

#[test]
fn generate_without_logprobs_omits_them_and_reports_errors() {
    let out = dora()
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-llama"))
        .args([
            "--prompt",
            "Hello",
            "--max-tokens",
            "2",
            "--json",
            "--temperature",
            "0.8",
            "--seed",
            "3",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("logprobs").is_none());

    let out = dora()
        .args(["generate", "--model", "/nonexistent", "--prompt", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));

    let out = dora()
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-llama"))
        .args(["--prompt", "x", "--temperature=-1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));
}
