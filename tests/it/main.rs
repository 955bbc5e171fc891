//! dora-serve's integration tests, one binary.

mod adapters;
mod api;
mod catalog;
mod cli;
mod deploy;
mod engine;
mod families;
mod generic;
mod hostile;
mod http;
mod loaders;
mod parity;
#[cfg(target_os = "linux")]
mod process;
mod props;
#[cfg(target_os = "linux")]
mod readme;
mod real_gemma_http;
mod real_model;
mod shared_store;
mod stored;
mod storms;
mod util;
mod validation;
mod vocab;
mod web;
