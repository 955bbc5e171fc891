//! Tensor operations shared by the model and the adapters: the adapter-ready linear layer,
//! the grouped LoRA/DoRA apply, merging, and the DoRA norm (each with its reference).

pub mod attention;
mod cpu;
mod fused;
mod linear;
mod lora;
mod pool;
pub mod small_matmul;

pub use linear::{AdaptedLinear, Apply, BaseLinears, ProjKind, RowGroup};
pub use lora::{dora_norm, dora_norm_reference, AdapterWeights, LoraModule, MergedWeights};
