//! dora-serve's integration tests, one binary.

mod cli;
mod loaders;
mod parity;
mod real_model;
mod util;
