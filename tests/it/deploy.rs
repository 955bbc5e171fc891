//! The deployment files name only flags the server has, and the HAProxy configuration routes
//! on the fields the API reads (`adapter`, `model`). The replicas test
//! (`tests/replicas/run.sh`) runs deploy/haproxy.cfg itself; the Kubernetes manifests and the
//! Dockerfile cannot run here, so at least their command lines are checked against the binary.

use std::process::Command;

fn serve_help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dora-serve"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// `--flag` names in `text` (each `--name` or `--name=value` token).
fn flags(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for token in text.split(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
        if let Some(rest) = token.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn kubernetes_deployment_uses_only_real_serve_flags() {
    let help = serve_help();
    let text = std::fs::read_to_string("deploy/kubernetes/deployment.yaml").unwrap();
    let args: String = text
        .lines()
        .filter(|l| l.trim_start().starts_with("- --"))
        .collect::<Vec<_>>()
        .join("\n");
    let found = flags(&args);
    assert!(found.len() >= 8, "{found:?}");
    for f in found {
        assert!(
            help.contains(&format!("--{f}")),
            "deployment.yaml passes --{f}, which serve does not take"
        );
    }
    // The probes hit a route the server has.
    assert!(text.contains("path: /health"));
}

#[test]
fn haproxy_routes_on_the_fields_requests_name_adapters_by() {
    let cfg = std::fs::read_to_string("deploy/haproxy.cfg").unwrap();
    for needle in [
        "option http-buffer-request",
        "json_query('$.adapter')",
        "json_query('$.model')",
        "balance hash var(txn.route)",
        "hash-type consistent",
        "option httpchk GET /health",
    ] {
        assert!(cfg.contains(needle), "deploy/haproxy.cfg lacks {needle:?}");
    }
    let docker = std::fs::read_to_string("Dockerfile").unwrap();
    assert!(docker.contains("ENTRYPOINT [\"dora-serve\"]"));
}
