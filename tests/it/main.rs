//! dora-serve's integration tests, one binary.

mod adapters;
mod cli;
mod engine;
mod http;
mod loaders;
mod parity;
mod real_model;
mod util;
