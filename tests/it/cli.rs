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

    for bad in ["0", "1.5", "x"] {
        let out = dora()
            .args(["serve", "--model"])
            .arg(fixtures().join("tiny-llama"))
            .args(["--prefill-share", bad])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--prefill-share") && err.contains("(0, 1]"),
            "{err}"
        );
    }
}

#[derive(serde::Deserialize)]
struct AdapterExpected {
    prompt_token_ids: Vec<Vec<u32>>,
    adapters: std::collections::HashMap<String, AdapterGreedy>,
}

#[derive(serde::Deserialize)]
struct AdapterGreedy {
    unmerged_greedy: Vec<Vec<u32>>,
}

fn adapter_expected() -> AdapterExpected {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("adapters/expected.json")).unwrap(),
    )
    .unwrap()
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A JSONL batch mixing adapters and the base model: one output line per input line, in
/// order, each with its own adapter's tokens, in both modes.
#[test]
fn generate_batch_file_mixes_adapters_in_input_order() {
    let exp = adapter_expected();
    let base = &expected()["tiny-llama"];
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "def add(a, b):\n    return",
    ];
    let rows: Vec<(usize, Option<&str>)> = vec![
        (0, Some("dora-all-r8")),
        (1, None),
        (2, Some("lora-r8")),
        (1, Some("dora-all-r8")),
        (0, Some("dora-qv-r4-rslora")),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let batch = tmp.path().join("batch.jsonl");
    let lines: Vec<String> = rows
        .iter()
        .map(|(p, a)| {
            serde_json::json!({
                "prompt": prompts[*p],
                "adapter": a.map(|a| fixtures().join("adapters").join(a)),
            })
            .to_string()
        })
        .collect();
    std::fs::write(&batch, lines.join("\n")).unwrap();
    for mode in ["unmerged", "merged", "auto"] {
        let out = dora()
            .args(["generate", "--model"])
            .arg(fixtures().join("tiny-llama"))
            .arg("--batch")
            .arg(&batch)
            .args(["--max-tokens", "4", "--json", "--mode", mode])
            .output()
            .unwrap();
        let outs = json_lines(&out);
        assert_eq!(outs.len(), rows.len());
        for (i, ((p, a), o)) in rows.iter().zip(&outs).enumerate() {
            let ids: Vec<u32> = serde_json::from_value(o["prompt_token_ids"].clone()).unwrap();
            assert_eq!(ids, exp.prompt_token_ids[*p], "{mode} line {i}");
            let got: Vec<u32> = serde_json::from_value(o["token_ids"].clone()).unwrap();
            let want = match a {
                Some(a) => exp.adapters[*a].unmerged_greedy[*p][..4].to_vec(),
                None => base[*p].greedy_token_ids[..4].to_vec(),
            };
            assert_eq!(got, want, "{mode} line {i} ({a:?})");
        }
    }
}

#[test]
fn generate_pairs_adapters_with_prompts() {
    let exp = adapter_expected();
    let out = dora()
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-llama"))
        .args([
            "--prompt",
            "The capital of France is",
            "--prompt",
            "Once upon a time",
        ])
        .arg("--adapter")
        .arg(fixtures().join("adapters/lora-r8"))
        .args(["--adapter", "none", "--max-tokens", "3", "--json"])
        .output()
        .unwrap();
    let outs = json_lines(&out);
    let got: Vec<u32> = serde_json::from_value(outs[0]["token_ids"].clone()).unwrap();
    assert_eq!(got, exp.adapters["lora-r8"].unmerged_greedy[0][..3]);
    let got: Vec<u32> = serde_json::from_value(outs[1]["token_ids"].clone()).unwrap();
    assert_eq!(got, expected()["tiny-llama"][1].greedy_token_ids[..3]);

    let out = dora()
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-llama"))
        .args([
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--prompt",
            "c",
            "--adapter",
            "x",
            "--adapter",
            "y",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("one per prompt"));
}

#[test]
fn adapter_inspect_describes_or_explains() {
    let out = dora()
        .args(["adapter", "inspect"])
        .arg(fixtures().join("adapters/dora-patterns"))
        .arg("--model")
        .arg(fixtures().join("tiny-llama"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "type:    dora",
        "rank:    4",
        "self_attn.k_proj(r=2",
        "layer   1:",
        "bytes loaded",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    let out = dora()
        .args(["adapter", "inspect", "--json"])
        .arg(fixtures().join("adapters/lora-r8"))
        .arg("--model")
        .arg(fixtures().join("tiny-llama.gguf"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "lora");
    assert_eq!(v["modules"].as_array().unwrap().len(), 14);
    assert!(v["bytes"].as_u64().unwrap() > 0);

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        r#"{"peft_type": "IA3"}"#,
    )
    .unwrap();
    let out = dora()
        .args(["adapter", "inspect"])
        .arg(tmp.path())
        .arg("--model")
        .arg(fixtures().join("tiny-llama"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("IA3"));
}

#[test]
fn bench_shared_prefixes_hit_the_prefix_cache_per_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("p.json");
    let out = dora()
        .args(["bench", "--spawn-model"])
        .arg(fixtures().join("tiny-llama"))
        .args([
            "--make-adapters",
            "1",
            "--rank",
            "4",
            "--base-fraction",
            "0.5",
        ])
        .args(["--shared-prefixes", "1", "--prefix-words", "64"])
        .args(["--requests", "10", "--concurrency", "1", "--warmup", "0"])
        .args([
            "--max-tokens",
            "2",
            "--prompt-words",
            "3",
            "--quiet",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("from the prefix cache"), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let mut records: Vec<&serde_json::Value> = r["records"].as_array().unwrap().iter().collect();
    records.sort_by(|a, b| {
        a["start"]
            .as_f64()
            .partial_cmp(&b["start"].as_f64())
            .unwrap()
    });
    // One client, one shared prefix: the first request on the base and the first on the
    // adapter compute it; every later one on the same base or adapter reuses its full blocks,
    // and none reuses the other's.
    let mut seen = std::collections::BTreeSet::new();
    for x in &records {
        let key = x["adapter"].to_string();
        let cached = x["cached_tokens"].as_u64().unwrap();
        let prompt = x["prompt_tokens"].as_u64().unwrap();
        if seen.insert(key) {
            assert_eq!(cached, 0, "{x}");
        } else {
            assert!(cached >= 64 && cached < prompt && cached % 16 == 0, "{x}");
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "both the base and the adapter ran: {records:?}"
    );
    assert!(r["cached_prompt_fraction"].as_f64().unwrap() > 0.3, "{r}");
}

#[test]
fn bench_drives_a_spawned_server_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let (json, svg) = (tmp.path().join("a.json"), tmp.path().join("a.svg"));
    let out = dora()
        .args(["bench", "--spawn-model"])
        .arg(fixtures().join("tiny-llama"))
        .args([
            "--make-adapters",
            "2",
            "--rank",
            "4",
            "--requests",
            "16",
            "--concurrency",
            "4",
        ])
        .args([
            "--warmup",
            "0",
            "--max-tokens",
            "8",
            "--prompt-words",
            "4:12",
            "--quiet",
            "--json",
        ])
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("output tok/s") && stdout.contains("p99"),
        "{stdout}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        (r["requests"].as_u64(), r["ok"].as_u64()),
        (Some(16), Some(16)),
        "{r}"
    );
    assert_eq!(r["errors"], serde_json::json!({}));
    assert_eq!(r["adapters"], serde_json::json!(["bench-000", "bench-001"]));
    assert_eq!(r["server"]["mode"], "auto");
    // The bench uploaded its adapters before the clock: an upload goes into the cache as it
    // was validated, so the run itself loads nothing and every adapter request is a hit.
    assert_eq!(
        (
            r["server"]["adapter_loads"].as_f64(),
            r["server"]["cache_misses"].as_f64()
        ),
        (Some(0.0), Some(0.0)),
        "{}",
        r["server"]
    );
    assert!(
        r["server"]["cache_hits"].as_f64().unwrap() >= 16.0,
        "{}",
        r["server"]
    );
    let records = r["records"].as_array().unwrap();
    assert!(
        records
            .iter()
            .all(|x| x["output_tokens"] == 8 && x["adapter"].is_string()),
        "ignore_eos runs every request to max_tokens on an adapter"
    );
    assert!(r["ttft_s"]["p50"].as_f64().unwrap() > 0.0);
    assert!(r["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    let cmp = dora()
        .args(["bench", "--compare"])
        .arg(&json)
        .arg(&json)
        .output()
        .unwrap();
    let cmp = String::from_utf8_lossy(&cmp.stdout);
    assert!(
        cmp.contains("output tok/s") && cmp.contains("1.000"),
        "{cmp}"
    );
    let bad = dora()
        .args(["bench", "--rate", "5", "--concurrency", "2"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not both"));
}
