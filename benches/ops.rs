//! Micro-benchmarks of the tensor paths that decide serving speed:
//! - `small_matmul`: the decode-step kernel against candle's gemm, by row count;
//! - `adapted_linear`: one SmolLM2-sized projection (576 → 1536) at 1, 8 and 64 rows with
//!   0, 1, 4 or 8 distinct rank-16 DoRA adapters, unmerged, against merged and base;
//! - `dora_norm`: the row-at-a-time norm for `g` against forming `W0 + s·B·A` with tensors;
//! - `merge`: merging one module;
//! - `adapter`: loading a rank-16 DoRA adapter on all seven projections from disk (parse,
//!   validate, precompute `g`), merging all of it, and a cache hit — on SmolLM2 when
//!   `scripts/fetch-model.sh` has fetched it, else on the tiny test model.
//!
//! `cargo bench --bench ops` (add a filter such as `small_matmul` to run one group).

use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dora_serve::ops::{
    dora_norm, dora_norm_reference, small_matmul, AdaptedLinear, AdapterWeights, Apply, BaseWeight,
    LoraModule, MergedWeights, ProjKind, RowGroup,
};

const IN: usize = 576;
const OUT: usize = 1536;

fn randn(shape: (usize, usize)) -> Tensor {
    Tensor::randn(0f32, 0.05, shape, &Device::Cpu).unwrap()
}

fn small_matmul_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("small_matmul");
    let w_t = randn((IN, OUT));
    let w = w_t.t().unwrap().contiguous().unwrap();
    for rows in [1usize, 2, 4, 8, 16, 32] {
        let x = randn((rows, IN));
        g.bench_with_input(BenchmarkId::new("kernel", rows), &rows, |b, _| {
            b.iter(|| black_box(small_matmul::matmul_t(&x, &w).unwrap()))
        });
        g.bench_with_input(
            BenchmarkId::new("candle_contiguous", rows),
            &rows,
            |b, _| b.iter(|| black_box(x.matmul(&w_t).unwrap())),
        );
        g.bench_with_input(
            BenchmarkId::new("candle_transposed_view", rows),
            &rows,
            |b, _| b.iter(|| black_box(x.matmul(&w.t().unwrap()).unwrap())),
        );
    }
    g.finish();
}

fn adapter(id: u64, rank: usize, lin: &AdaptedLinear) -> AdapterWeights {
    let a = randn((rank, IN));
    let b = randn((OUT, rank));
    let n = dora_norm(&lin.weight().to_f32().unwrap(), &a, &b, 2.0).unwrap();
    let g = (Tensor::ones(OUT, DType::F32, &Device::Cpu).unwrap() / n).unwrap();
    let mut w = AdapterWeights::new(id, 1);
    w.insert(
        0,
        ProjKind::Up,
        LoraModule::new(&a, &b, 2.0, Some(&g), DType::F32).unwrap(),
    );
    w
}

fn adapted_linear_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("adapted_linear");
    let lin = AdaptedLinear::new(&randn((OUT, IN)), None, 0, ProjKind::Up).unwrap();
    let adapters: Vec<AdapterWeights> = (0..8).map(|i| adapter(i + 1, 16, &lin)).collect();
    let mut merged = MergedWeights::new(1, 1);
    merged.insert(
        0,
        ProjKind::Up,
        BaseWeight::Dense(
            lin.merged_weight(adapters[0].get(0, ProjKind::Up).unwrap())
                .unwrap(),
        ),
    );
    for rows in [1usize, 2, 4, 8, 16, 64] {
        let x = randn((rows, IN));
        g.bench_function(BenchmarkId::new("base", rows), |b| {
            b.iter(|| black_box(lin.forward(&x, Apply::Base).unwrap()))
        });
        g.bench_function(BenchmarkId::new("merged", rows), |b| {
            b.iter(|| black_box(lin.forward(&x, Apply::Merged(&merged)).unwrap()))
        });
        for n_adapters in [1usize, 4, 8] {
            if n_adapters > rows {
                continue;
            }
            let per = rows / n_adapters;
            let groups: Vec<RowGroup> = (0..n_adapters)
                .map(|i| RowGroup {
                    start: i * per,
                    len: if i + 1 == n_adapters {
                        rows - i * per
                    } else {
                        per
                    },
                    adapter: Some(&adapters[i]),
                })
                .collect();
            g.bench_function(
                BenchmarkId::new(format!("unmerged_{n_adapters}_adapters"), rows),
                |b| b.iter(|| black_box(lin.forward(&x, Apply::Rows(&groups)).unwrap())),
            );
        }
    }
    g.finish();
}

fn dora_norm_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("dora_norm");
    let w0 = randn((OUT, IN));
    for rank in [8usize, 16, 64] {
        let a = randn((rank, IN));
        let b = randn((OUT, rank));
        g.bench_function(BenchmarkId::new("rows", rank), |bch| {
            bch.iter(|| black_box(dora_norm(&w0, &a, &b, 2.0).unwrap()))
        });
        g.bench_function(BenchmarkId::new("tensors", rank), |bch| {
            bch.iter(|| black_box(dora_norm_reference(&w0, &a, &b, 2.0).unwrap()))
        });
    }
    g.finish();
}

fn merge_bench(c: &mut Criterion) {
    let lin = AdaptedLinear::new(&randn((OUT, IN)), None, 0, ProjKind::Up).unwrap();
    let a = adapter(1, 16, &lin);
    let m = a.get(0, ProjKind::Up).unwrap();
    c.bench_function("merge/one_module_576x1536_r16", |b| {
        b.iter(|| black_box(lin.merged_weight(m).unwrap()))
    });
}

fn adapter_bench(c: &mut Criterion) {
    use dora_serve::adapter::{self, AdapterCache, SynthSpec};
    use dora_serve::model::{self, LoadOptions};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let real = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (path, label) = if real.is_file() {
        (real, "smollm2")
    } else {
        (root.join("tests/fixtures/tiny-llama"), "tiny")
    };
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        stored: false,
    };
    let m = model::load(&path, &opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        rank: 16,
        alpha: 32.0,
        targets: ProjKind::SEPARATE.to_vec(),
        dora: true,
        seed: 7,
    };
    let a_dir = dir.path().join("a");
    adapter::write_random_adapter(&a_dir, &m.model, &spec).unwrap();
    let mut g = c.benchmark_group("adapter");
    g.sample_size(10);
    g.bench_function(format!("load_from_disk_r16_all/{label}"), |b| {
        b.iter(|| black_box(adapter::load_dir(&a_dir, &m.model).unwrap()))
    });
    let a = adapter::load_dir(&a_dir, &m.model).unwrap();
    g.bench_function(format!("merge_whole_r16_all/{label}"), |b| {
        b.iter(|| black_box(m.model.merge(&a.weights).unwrap()))
    });
    let mut cache = AdapterCache::new(1 << 30);
    cache.insert(a.clone(), 0.0);
    g.bench_function("cache_hit", |b| {
        b.iter(|| black_box(cache.get("a").unwrap()))
    });
    g.finish();
}

criterion_group!(
    benches,
    small_matmul_bench,
    adapted_linear_bench,
    dora_norm_bench,
    merge_bench,
    adapter_bench
);
criterion_main!(benches);
