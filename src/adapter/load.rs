//! Loading an adapter folder (or its two files' bytes) into [`AdapterWeights`], validating
//! every tensor against the configuration and the base model.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use super::{AdapterConfig, AdapterError};
use crate::ops::{dora_norm, AdapterWeights, BaseLinears, LoraModule, ProjKind};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh id for a loaded adapter instance.
pub fn next_adapter_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    Dora,
    Lora,
}

impl fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdapterKind::Dora => "dora",
            AdapterKind::Lora => "lora",
        })
    }
}

/// One adapted module as loaded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleInfo {
    pub layer: usize,
    pub module: String,
    pub rank: usize,
    pub alpha: f64,
    pub scale: f64,
}

/// What was parsed, for `adapter inspect` and the API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterInfo {
    #[serde(rename = "type")]
    pub kind: AdapterKind,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// The scale of modules without a rank/alpha override.
    pub scale: f64,
    pub modules: Vec<ModuleInfo>,
    /// Bytes held on the device once loaded.
    pub bytes: usize,
    /// dtype of the tensors in the file.
    pub file_dtype: String,
    /// `sha256:<hex>` of the two files (see `load::digest`): names the exact version served.
    pub digest: String,
}

/// The content digest of an adapter: SHA-256 over the configuration's length (8 bytes, little
/// endian), the configuration and the weights, as `sha256:<64 hex digits>`. Stable across
/// restarts and machines, so a client can tell which upload served its request.
pub fn digest(config_json: &[u8], safetensors_bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((config_json.len() as u64).to_le_bytes());
    h.update(config_json);
    h.update(safetensors_bytes);
    let out = h.finalize();
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in out {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl fmt::Display for AdapterInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "type:    {}", self.kind)?;
        writeln!(
            f,
            "rank:    {}  alpha: {}  scale: {:.6}{}",
            self.r,
            self.lora_alpha,
            self.scale,
            if self.use_rslora {
                " (rsLoRA: alpha/sqrt(r))"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "weights: {} in the file, {} bytes loaded",
            self.file_dtype, self.bytes
        )?;
        writeln!(f, "digest:  {}", self.digest)?;
        let mut by_layer: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for m in &self.modules {
            let (r, _, _) = (m.rank, m.alpha, m.scale);
            let note = if r != self.r || (m.scale - self.scale).abs() > 1e-12 {
                format!(
                    "{}(r={}, alpha={}, scale={:.6})",
                    m.module, m.rank, m.alpha, m.scale
                )
            } else {
                m.module.clone()
            };
            by_layer.entry(m.layer).or_default().push(note);
        }
        writeln!(
            f,
            "modules: {} in {} layers",
            self.modules.len(),
            by_layer.len()
        )?;
        for (layer, mods) in by_layer {
            writeln!(f, "  layer {layer:>3}: {}", mods.join(", "))?;
        }
        Ok(())
    }
}

/// A loaded, validated adapter.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub name: String,
    pub info: AdapterInfo,
    pub weights: Arc<AdapterWeights>,
}

/// Load the adapter in folder `dir` (`adapter_config.json` + `adapter_model.safetensors`).
///
/// The store replaces an adapter by renaming a complete new folder into place, so the two files
/// are read from one folder version: if the folder changed between the reads (its inode
/// differs), they are read again. A configuration never pairs with another upload's weights.
pub fn load_dir(dir: &Path, base: &dyn BaseLinears) -> Result<Adapter, AdapterError> {
    let (config, weights) = read_consistent(dir)?;
    // Configuration problems first: they are the cheapest to find and usually the first to fix.
    let cfg = AdapterConfig::parse(&config)?;
    let Some(weights) = weights else {
        if dir.join("adapter_model.bin").is_file() {
            return Err(AdapterError::Pickle {
                path: dir.join("adapter_model.bin"),
            });
        }
        return Err(AdapterError::MissingFile {
            path: dir.join("adapter_model.safetensors"),
            what: "the adapter weights (adapter_model.safetensors)",
        });
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let digest = digest(&config, &weights);
    load_parsed(&name, cfg, &weights, digest, base)
}

/// Both files of one version of `dir` (the weights `None` when that file is missing).
fn read_consistent(dir: &Path) -> Result<(Vec<u8>, Option<Vec<u8>>), AdapterError> {
    let read = |name: &str, what: &'static str| {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(AdapterError::MissingFile { path, what });
        }
        std::fs::read(&path).map_err(|source| AdapterError::Io { path, source })
    };
    let mut attempts = 0;
    loop {
        let before = folder_identity(dir);
        let config = read(
            "adapter_config.json",
            "the adapter configuration (adapter_config.json)",
        )?;
        let weights = match read(
            "adapter_model.safetensors",
            "the adapter weights (adapter_model.safetensors)",
        ) {
            Ok(w) => Some(w),
            Err(AdapterError::MissingFile { .. }) => None,
            Err(e) => return Err(e),
        };
        if before == folder_identity(dir) {
            return Ok((config, weights));
        }
        attempts += 1;
        if attempts == 8 {
            return Err(AdapterError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::other(
                    "the adapter folder kept being replaced while it was read; retry",
                ),
            });
        }
    }
}

#[cfg(unix)]
fn folder_identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn folder_identity(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(dir).ok().and_then(|m| m.created().ok())
}

/// The parts of one module found in the file.
#[derive(Default)]
struct Parts {
    a: Option<(String, Tensor)>,
    b: Option<(String, Tensor)>,
    m: Option<(String, Tensor)>,
}

enum Part {
    A,
    B,
    M,
}

/// Magnitude spellings: PEFT's three and the NVlabs reference implementation's.
const SUFFIXES: &[(&str, Part)] = &[
    (".lora_A.weight", Part::A),
    (".lora_B.weight", Part::B),
    (".lora_magnitude_vector.default.weight", Part::M),
    (".lora_magnitude_vector.weight", Part::M),
    (".lora_magnitude_vector", Part::M),
    (".weight_m_wdecomp.weight", Part::M),
];

fn tensor_err(tensor: &str, msg: impl Into<String>) -> AdapterError {
    AdapterError::Tensor {
        tensor: tensor.to_string(),
        msg: msg.into(),
    }
}

fn module_err(module: &str, msg: impl Into<String>) -> AdapterError {
    AdapterError::Module {
        module: module.to_string(),
        msg: msg.into(),
    }
}

/// `model.layers.N.{self_attn|mlp}.{proj}` → (N, proj).
fn parse_module(path: &str, num_layers: usize) -> Result<(usize, ProjKind), AdapterError> {
    let lacks = || {
        if path.contains("embed_tokens") || path.contains("lm_head") {
            module_err(path, "embedding and lm_head adapters are not supported")
        } else {
            module_err(
                path,
                "the base model has no such module (adapters may target model.layers.N.self_attn.{q,k,v,o}_proj \
                 and model.layers.N.mlp.{gate,up,down}_proj, or Phi-3's fused self_attn.qkv_proj and mlp.gate_up_proj)",
            )
        }
    };
    let rest = path.strip_prefix("model.layers.").ok_or_else(lacks)?;
    let mut it = rest.split('.');
    let (Some(layer), Some(parent), Some(name), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(lacks());
    };
    let layer: usize = layer.parse().map_err(|_| lacks())?;
    let kind = ProjKind::from_module_name(name).ok_or_else(lacks)?;
    if kind.parent() != parent {
        return Err(lacks());
    }
    if layer >= num_layers {
        return Err(module_err(
            path,
            format!("layer {layer} does not exist: the base model has {num_layers} layers"),
        ));
    }
    Ok((layer, kind))
}

/// Load an adapter from the bytes of its two files, validating it against `base`.
pub fn load_bytes(
    name: &str,
    config_json: &[u8],
    safetensors_bytes: &[u8],
    base: &dyn BaseLinears,
) -> Result<Adapter, AdapterError> {
    load_parsed(
        name,
        AdapterConfig::parse(config_json)?,
        safetensors_bytes,
        digest(config_json, safetensors_bytes),
        base,
    )
}

fn load_parsed(
    name: &str,
    cfg: AdapterConfig,
    safetensors_bytes: &[u8],
    digest: String,
    base: &dyn BaseLinears,
) -> Result<Adapter, AdapterError> {
    // torch.save output (a pickle, or a zip holding one) sent in place of safetensors. A
    // safetensors file's 8-byte header length can begin with the same bytes, but its header
    // (byte 8 on) is a JSON object.
    let magic = matches!(safetensors_bytes, [0x80, 2..=5, ..])
        || safetensors_bytes.starts_with(b"PK\x03\x04");
    if magic && safetensors_bytes.get(8) != Some(&b'{') {
        return Err(AdapterError::Pickle {
            path: "adapter_model.safetensors".into(),
        });
    }
    let st = SafeTensors::deserialize(safetensors_bytes)
        .map_err(|e| AdapterError::Safetensors(e.to_string()))?;
    let num_layers = base.num_layers();
    // 1. Every tensor must be understood.
    let (modules, file_dtypes) = read_tensors(&st, num_layers)?;
    // 2. The file and the configuration must describe the same modules.
    check_targets(&cfg, &modules, base)?;
    // 3. Shapes, DoRA magnitudes, and the precomputed tensors.
    let mut weights = AdapterWeights::new(next_adapter_id(), num_layers);
    let mut infos = Vec::with_capacity(modules.len());
    for ((layer, kind), parts) in modules {
        let (module, info) = build_module(&cfg, layer, kind, parts, base)?;
        weights.insert(layer, kind, module);
        infos.push(info);
    }
    let info = AdapterInfo {
        kind: if cfg.use_dora {
            AdapterKind::Dora
        } else {
            AdapterKind::Lora
        },
        r: cfg.r,
        lora_alpha: cfg.lora_alpha,
        use_rslora: cfg.use_rslora,
        scale: cfg.scale(cfg.r, cfg.lora_alpha),
        modules: infos,
        bytes: weights.bytes(),
        file_dtype: file_dtypes.into_iter().collect::<Vec<_>>().join(","),
        digest,
    };
    Ok(Adapter {
        name: name.to_string(),
        info,
        weights: Arc::new(weights),
    })
}

type Modules = BTreeMap<(usize, ProjKind), Parts>;

fn module_path(layer: usize, kind: ProjKind) -> String {
    format!(
        "model.layers.{layer}.{}.{}",
        kind.parent(),
        kind.module_name()
    )
}

/// Every tensor of the file, mapped to its module and part (A, B or magnitude) as f32, each
/// finite; a tensor that is not understood is an error, never skipped. Also the file's dtypes.
fn read_tensors(
    st: &SafeTensors<'_>,
    num_layers: usize,
) -> Result<(Modules, std::collections::BTreeSet<String>), AdapterError> {
    let mut modules = Modules::new();
    let mut file_dtypes = std::collections::BTreeSet::new();
    for (key, view) in st.tensors() {
        let rest = key.strip_prefix("base_model.model.").ok_or_else(|| {
            tensor_err(&key, "is not a PEFT adapter tensor (expected base_model.model.<module>.lora_A.weight, …)")
        })?;
        let (path, part) = SUFFIXES
            .iter()
            .find_map(|(suffix, part)| rest.strip_suffix(suffix).map(|p| (p, part)))
            .ok_or_else(|| {
                tensor_err(
                    &key,
                    "is not understood (expected lora_A.weight, lora_B.weight or a DoRA magnitude); \
                     refusing to guess what it means",
                )
            })?;
        let (layer, kind) = parse_module(path, num_layers)?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(tensor_err(
                    &key,
                    format!("has dtype {other:?}; adapters must be f32, f16 or bf16"),
                ))
            }
        };
        file_dtypes.insert(format!("{dtype:?}").to_lowercase());
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| tensor_err(&key, e.to_string()))?;
        let values = t.flatten_all().and_then(|t| t.to_vec1::<f32>())?;
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(tensor_err(
                &key,
                format!("holds a non-finite value ({bad})"),
            ));
        }
        let parts = modules.entry((layer, kind)).or_default();
        let slot = match part {
            Part::A => &mut parts.a,
            Part::B => &mut parts.b,
            Part::M => &mut parts.m,
        };
        if let Some((other, _)) = slot {
            return Err(tensor_err(&key, format!("duplicates {other:?}")));
        }
        *slot = Some((key.clone(), t));
    }
    Ok((modules, file_dtypes))
}

/// Every module the configuration targets has tensors, and every tensor's module is targeted.
fn check_targets(
    cfg: &AdapterConfig,
    modules: &Modules,
    base: &dyn BaseLinears,
) -> Result<(), AdapterError> {
    for layer in 0..base.num_layers() {
        for kind in ProjKind::ALL {
            let present = modules.contains_key(&(layer, kind));
            // A family has either the fused or the separate projections: the ones it lacks
            // cannot be targeted (a tensor for one is refused below, by build_module).
            if base.linear(layer, kind).is_none() && !present {
                continue;
            }
            let path = module_path(layer, kind);
            let targeted = cfg.targets(&path);
            if targeted && !present {
                return Err(module_err(
                    &path,
                    "adapter_config.json targets it but adapter_model.safetensors has no tensors for it",
                ));
            }
            if present && !targeted {
                return Err(module_err(
                    &path,
                    "adapter_model.safetensors has tensors for it but adapter_config.json does not target it \
                     (check target_modules, exclude_modules, layers_to_transform)",
                ));
            }
        }
    }
    if modules.is_empty() {
        return Err(AdapterError::Safetensors(
            "it holds no adapter tensors".into(),
        ));
    }
    Ok(())
}

/// One module's tensors checked against the base and the config, with `g = m / ‖W0 + s·B·A‖`
/// precomputed for DoRA.
fn build_module(
    cfg: &AdapterConfig,
    layer: usize,
    kind: ProjKind,
    parts: Parts,
    base: &dyn BaseLinears,
) -> Result<(LoraModule, ModuleInfo), AdapterError> {
    let path = module_path(layer, kind);
    let lin = base
        .linear(layer, kind)
        .ok_or_else(|| module_err(&path, "the base model has no such module"))?;
    let (in_dim, out_dim) = (lin.in_dim(), lin.out_dim());
    let (r, alpha, scale) = cfg.module_params(&path);
    let (a_key, a) = parts
        .a
        .ok_or_else(|| module_err(&path, "lora_A.weight is missing"))?;
    let (b_key, b) = parts
        .b
        .ok_or_else(|| module_err(&path, "lora_B.weight is missing"))?;
    if a.dims() != [r, in_dim] {
        return Err(tensor_err(
            &a_key,
            format!("has shape {:?}, expected [{r}, {in_dim}] (rank {r} from the config, in-features of {path})", a.dims()),
        ));
    }
    if b.dims() != [out_dim, r] {
        return Err(tensor_err(
            &b_key,
            format!("has shape {:?}, expected [{out_dim}, {r}] (out-features of {path}, rank {r} from the config)", b.dims()),
        ));
    }
    let device = &lin.weight().device();
    let a = a.to_device(device)?;
    let b = b.to_device(device)?;
    let g = match (cfg.use_dora, parts.m) {
        (false, None) => None,
        (false, Some((key, _))) => {
            return Err(tensor_err(
                &key,
                "is a DoRA magnitude, but adapter_config.json has use_dora false: \
                 this checkpoint would be served wrongly as plain LoRA",
            ))
        }
        (true, None) => {
            return Err(module_err(
                &path,
                "use_dora is true but the module has no magnitude vector",
            ))
        }
        (true, Some((key, m))) => {
            let m = match m.dims() {
                [n] if *n == out_dim => m,
                [n, 1] if *n == out_dim => m.squeeze(1)?,
                d => {
                    return Err(tensor_err(
                        &key,
                        format!("has shape {d:?}, expected [{out_dim}] (out-features of {path})"),
                    ))
                }
            };
            let n = dora_norm(&lin.weight().to_f32()?, &a, &b, scale)?;
            let norms = n.to_vec1::<f32>()?;
            if let Some(i) = norms.iter().position(|&x| !(x > 0.0 && x.is_finite())) {
                return Err(module_err(
                    &path,
                    format!(
                        "‖W0 + s·B·A‖ of output row {i} is {}; DoRA cannot divide by it",
                        norms[i]
                    ),
                ));
            }
            Some((m.to_device(device)? / n)?)
        }
    };
    let module = LoraModule::new(&a, &b, scale, g.as_ref(), base.dtype())?;
    let info = ModuleInfo {
        layer,
        module: format!("{}.{}", kind.parent(), kind.module_name()),
        rank: r,
        alpha,
        scale,
    };
    Ok((module, info))
}
