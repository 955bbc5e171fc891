//! dora-serve's integration tests, one binary.

mod adapters;
mod cli;
mod engine;
mod hostile;
mod http;
mod loaders;
mod parity;
mod props;
mod real_model;
mod util;
mod web;
