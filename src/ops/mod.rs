//! Tensor operations shared by the model and the adapters: the adapter-ready linear layer,
//! the grouped LoRA/DoRA apply, merging, and the DoRA norm (each with its reference).

#[macro_use]
mod cpu;
mod activation;
pub mod attention;
mod base_weight;
mod dequant;
mod fused;
pub mod kernels;
mod linear;
mod lora;
mod pool;
pub mod small_matmul;
pub mod stored;

pub use activation::silu_mul;
pub use base_weight::BaseWeight;
pub use linear::{AdaptedLinear, Apply, BaseLinears, ProjKind, RowGroup};
pub use lora::{
    dora_norm, dora_norm_generic, dora_norm_reference, AdapterWeights, LoraModule, MergedWeights,
};
pub use stored::StoredMatrix;

/// The largest absolute difference between two tensors of one shape (for the unit tests).
#[cfg(test)]
fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of one shape")
}
