//! Tensor operations shared by the model: the adapter-ready linear layer.

mod linear;

pub use linear::{AdaptedLinear, ProjKind};
