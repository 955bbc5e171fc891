//! `adapter_config.json` as HF PEFT (0.21) writes it: what it means, or why it is refused.
//!
//! Every field either is understood (and honoured), is known to be harmless for inference
//! (initialisation and training options, metadata), or is refused by name. An unknown field
//! that is set is refused too: a newer PEFT option may change the math, and serving such an
//! adapter as if it did not would be silently wrong.

use regex::Regex;
use serde_json::{Map, Value};

use super::AdapterError;

/// Which modules an adapter targets (PEFT's `target_modules` / `exclude_modules`).
#[derive(Debug, Clone)]
pub enum ModuleSelector {
    /// Names: a module matches when its path equals one or ends with `.name`.
    Names(Vec<String>),
    /// A regex string, matched against the whole module path.
    Regex(Regex),
    /// PEFT's `"all-linear"`: every projection.
    AllLinear,
}

impl ModuleSelector {
    fn matches(&self, path: &str) -> bool {
        match self {
            ModuleSelector::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            ModuleSelector::Regex(re) => re.is_match(path),
            ModuleSelector::AllLinear => true,
        }
    }
}

/// A parsed, validated PEFT LoRA/DoRA configuration.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub use_dora: bool,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: ModuleSelector,
    pub exclude_modules: Option<ModuleSelector>,
    /// In the file's order: PEFT takes the first pattern that matches.
    pub rank_pattern: Vec<(Regex, String, usize)>,
    pub alpha_pattern: Vec<(Regex, String, f64)>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Vec<String>,
    layer_index_res: Vec<Regex>,
}

/// Fields that only matter for training, initialisation or bookkeeping.
const HARMLESS: &[&str] = &[
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "megatron_config",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
];

/// Fields that change the adapter's math when set, and that dora-serve does not implement.
const REFUSED_WHEN_SET: &[(&str, &str)] = &[
    (
        "modules_to_save",
        "fully fine-tuned extra modules are not supported",
    ),
    ("lora_bias", "LoRA bias terms are not supported"),
    (
        "trainable_token_indices",
        "trainable embedding tokens are not supported",
    ),
    ("layer_replication", "layer replication is not supported"),
    (
        "alora_invocation_tokens",
        "activated LoRA (aLoRA) is not supported",
    ),
    (
        "target_parameters",
        "adapters on raw parameters (target_parameters) are not supported",
    ),
    ("use_qalora", "QA-LoRA is not supported"),
    ("use_bdlora", "BD-LoRA is not supported"),
    ("arrow_config", "Arrow adapter routing is not supported"),
    ("monteclora_config", "MonteCLoRA is not supported"),
    ("kasa_config", "KaSA is not supported"),
    ("velora_config", "VeLoRA is not supported"),
];

/// `init_lora_weights` values whose adapters need a modified base model to be exact.
const BASE_CHANGING_INITS: &[&str] = &["pissa", "olora", "corda", "loftq", "lora_ga"];

fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(_) => false,
        Value::Bool(true) => false,
    }
}

fn field_err(field: &str, msg: impl Into<String>) -> AdapterError {
    AdapterError::ConfigField {
        field: field.to_string(),
        msg: msg.into(),
    }
}

fn unsupported(field: &str, msg: impl Into<String>) -> AdapterError {
    AdapterError::Unsupported {
        field: field.to_string(),
        msg: msg.into(),
    }
}

/// Compile a Python `re` pattern in Rust syntax, anchored as `wrap` says.
fn compile(
    field: &str,
    pattern: &str,
    wrap: impl Fn(&str) -> String,
) -> Result<Regex, AdapterError> {
    Regex::new(&wrap(pattern)).map_err(|e| {
        field_err(
            field,
            format!("pattern {pattern:?} is not a supported regular expression: {e}"),
        )
    })
}

fn selector(field: &str, v: &Value) -> Result<ModuleSelector, AdapterError> {
    match v {
        Value::String(s) if s == "all-linear" => Ok(ModuleSelector::AllLinear),
        // PEFT: re.fullmatch(pattern, module_path)
        Value::String(s) => compile(field, s, |p| format!("^(?:{p})$")).map(ModuleSelector::Regex),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    field_err(field, "must be a list of module names or a regex string")
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(ModuleSelector::Names),
        _ => Err(field_err(
            field,
            "must be a list of module names or a regex string",
        )),
    }
}

fn pattern_map<T>(
    field: &str,
    v: Option<&Value>,
    value: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<(Regex, String, T)>, AdapterError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let obj = v.as_object().ok_or_else(|| {
        field_err(
            field,
            "must be an object mapping module patterns to numbers",
        )
    })?;
    obj.iter()
        .map(|(k, v)| {
            // PEFT's get_pattern_key: re.match(rf"(.*\.)?({key})$", module_path)
            let re = compile(field, k, |p| format!(r"^(?:.*\.)?(?:{p})$"))?;
            let x = value(v).ok_or_else(|| {
                field_err(field, format!("value for {k:?} must be a positive number"))
            })?;
            Ok((re, k.clone(), x))
        })
        .collect()
}

fn positive_usize(v: &Value) -> Option<usize> {
    v.as_u64().filter(|&x| x > 0).map(|x| x as usize)
}

fn finite_number(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite() && *x != 0.0)
}

fn bool_field(obj: &Map<String, Value>, field: &str) -> Result<bool, AdapterError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(field_err(field, "must be true or false")),
    }
}

impl AdapterConfig {
    /// Parse `adapter_config.json`.
    pub fn parse(text: &[u8]) -> Result<Self, AdapterError> {
        let v: Value =
            serde_json::from_slice(text).map_err(|e| AdapterError::ConfigJson(e.to_string()))?;
        let obj = v.as_object().ok_or_else(|| {
            AdapterError::ConfigJson("the top level must be a JSON object".into())
        })?;

        check_peft_type(obj)?;
        let r = obj
            .get("r")
            .ok_or_else(|| field_err("r", "is missing"))
            .and_then(|v| {
                positive_usize(v).ok_or_else(|| field_err("r", "must be a positive integer"))
            })?;
        let lora_alpha = obj
            .get("lora_alpha")
            .ok_or_else(|| field_err("lora_alpha", "is missing"))
            .and_then(|v| {
                finite_number(v).ok_or_else(|| field_err("lora_alpha", "must be a non-zero number"))
            })?;
        let use_dora = bool_field(obj, "use_dora")?;
        let use_rslora = bool_field(obj, "use_rslora")?;
        check_unsupported_math(obj)?;
        let target_modules = match obj.get("target_modules") {
            None | Some(Value::Null) => {
                return Err(field_err(
                    "target_modules",
                    "is missing: say which modules the adapter targets",
                ))
            }
            Some(v) => selector("target_modules", v)?,
        };
        let exclude_modules = match obj.get("exclude_modules") {
            None | Some(Value::Null) => None,
            Some(v) => Some(selector("exclude_modules", v)?),
        };
        let rank_pattern = pattern_map("rank_pattern", obj.get("rank_pattern"), positive_usize)?;
        let alpha_pattern = pattern_map("alpha_pattern", obj.get("alpha_pattern"), finite_number)?;
        let layers_to_transform = layers_to_transform(obj)?;
        let (layers_pattern, layer_index_res) = layers_pattern(obj)?;

        check_unknown_fields(obj)?;
        Ok(Self {
            use_dora,
            r,
            lora_alpha,
            use_rslora,
            target_modules,
            exclude_modules,
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            layers_pattern,
            layer_index_res,
        })
    }

    /// Whether PEFT would put an adapter on the module at `path` (e.g.
    /// `model.layers.3.self_attn.q_proj`): PEFT's `check_target_module_exists`.
    pub fn targets(&self, path: &str) -> bool {
        if self
            .exclude_modules
            .as_ref()
            .is_some_and(|e| e.matches(path))
        {
            return false;
        }
        if !self.target_modules.matches(path) {
            return false;
        }
        // Layer filters apply to name lists only, as in PEFT.
        match (&self.target_modules, &self.layers_to_transform) {
            (ModuleSelector::Names(_), Some(layers)) => {
                let idx = self
                    .layer_index_res
                    .iter()
                    .find_map(|re| re.captures(path))
                    .and_then(|c| c.get(1))
                    .and_then(|m| m.as_str().parse::<usize>().ok());
                idx.is_some_and(|i| layers.contains(&i))
            }
            _ => true,
        }
    }

    /// Rank, alpha and scale of the module at `path`, after `rank_pattern` / `alpha_pattern`.
    pub fn module_params(&self, path: &str) -> (usize, f64, f64) {
        let r = self
            .rank_pattern
            .iter()
            .find(|(re, _, _)| re.is_match(path))
            .map_or(self.r, |(_, _, r)| *r);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(re, _, _)| re.is_match(path))
            .map_or(self.lora_alpha, |(_, _, a)| *a);
        (r, alpha, self.scale(r, alpha))
    }

    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

type Obj = Map<String, Value>;

fn check_peft_type(obj: &Obj) -> Result<(), AdapterError> {
    match obj.get("peft_type") {
        Some(Value::String(t)) if t == "LORA" => {}
        Some(Value::String(t)) => {
            return Err(unsupported(
                "peft_type",
                format!("{t:?} adapters are not supported; dora-serve serves LORA (with or without use_dora)"),
            ))
        }
        None => return Err(field_err("peft_type", "is missing; PEFT LoRA/DoRA configs say \"LORA\"")),
        Some(_) => return Err(field_err("peft_type", "must be the string \"LORA\"")),
    }
    Ok(())
}

/// Fields whose values change the adapter's math in ways dora-serve does not serve.
fn check_unsupported_math(obj: &Obj) -> Result<(), AdapterError> {
    if bool_field(obj, "fan_in_fan_out")? {
        return Err(unsupported(
            "fan_in_fan_out",
            "must be false: llama projections store weights as [out, in]",
        ));
    }
    match obj.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(b)) if b == "none" => {}
        Some(b) => {
            return Err(unsupported(
                "bias",
                format!("must be \"none\", got {b}: trained bias terms are not supported"),
            ))
        }
    }
    if let Some(init) = obj.get("init_lora_weights").and_then(Value::as_str) {
        let lower = init.to_ascii_lowercase();
        if BASE_CHANGING_INITS.iter().any(|p| lower.starts_with(p)) {
            return Err(unsupported(
                "init_lora_weights",
                format!(
                    "{init:?} adapters are only exact on the base model their initialisation modified; \
                     convert the adapter with PEFT's path_initial_model_for_weight_conversion first"
                ),
            ));
        }
    }
    Ok(())
}

fn layers_to_transform(obj: &Obj) -> Result<Option<Vec<usize>>, AdapterError> {
    Ok(match obj.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(v) => {
            let list: Option<Vec<usize>> = match v {
                Value::Number(n) => n.as_u64().map(|x| vec![x as usize]),
                Value::Array(a) => a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect(),
                _ => None,
            };
            Some(list.ok_or_else(|| {
                field_err(
                    "layers_to_transform",
                    "must be a layer index or a list of layer indices",
                )
            })?)
        }
    })
}

/// `layers_pattern`, and the regexes PEFT uses to find a module path's layer index with it.
fn layers_pattern(obj: &Obj) -> Result<(Vec<String>, Vec<Regex>), AdapterError> {
    let layers_pattern: Vec<String> = match obj.get("layers_pattern") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| field_err("layers_pattern", "must be a string or a list of strings"))?,
        Some(_) => {
            return Err(field_err(
                "layers_pattern",
                "must be a string or a list of strings",
            ))
        }
    };
    // PEFT's layer-index extraction (check_target_module_exists).
    let res = if layers_pattern.is_empty() {
        vec![Regex::new(r"^.*?\.[^.]*\.(\d+)\.").expect("static regex")]
    } else {
        layers_pattern
            .iter()
            .map(|p| {
                compile("layers_pattern", p, |p| {
                    format!(r"^(?:|.*?\.)(?:{p})\.(\d+)\.")
                })
            })
            .collect::<Result<_, _>>()?
    };
    Ok((layers_pattern, res))
}

/// Every field is understood, harmless, or refused by name: a set field dora-serve does not
/// know may change the math, so the adapter is refused.
fn check_unknown_fields(obj: &Obj) -> Result<(), AdapterError> {
    for (field, why) in REFUSED_WHEN_SET {
        if obj.get(*field).is_some_and(|v| !is_unset(v)) {
            return Err(unsupported(field, format!("is set: {why}")));
        }
    }
    const UNDERSTOOD: &[&str] = &[
        "peft_type",
        "r",
        "lora_alpha",
        "use_dora",
        "use_rslora",
        "fan_in_fan_out",
        "bias",
        "init_lora_weights",
        "target_modules",
        "exclude_modules",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
    ];
    for (k, v) in obj {
        let known = UNDERSTOOD.contains(&k.as_str())
            || HARMLESS.contains(&k.as_str())
            || REFUSED_WHEN_SET.iter().any(|(f, _)| f == k);
        if !known && !is_unset(v) {
            return Err(unsupported(
                k,
                "is not a field dora-serve knows, and it is set; it may change the adapter's math, so the adapter is refused",
            ));
        }
    }
    Ok(())
}
