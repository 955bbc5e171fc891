//! Which kernels run: this machine's CPU kernels (the default on the CPU), or only candle's
//! tensor ops, the device-generic path a GPU runs (`--kernels generic`, or
//! `DORA_KERNELS=generic` for tests). With `generic`, every fast path declines (the f32 views,
//! the fused unmerged rows, the decode attention, the row-by-row DoRA norm) and stored-format
//! weights are dequantised at load as on a GPU, so the CPU runs exactly the code `cuda` and
//! `metal` would, and the parity tests prove that code exact without a GPU.
//!
//! One choice per process, made before the model loads.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// The CPU fast paths where they apply (candle's ops elsewhere).
    Cpu,
    /// candle's tensor ops only.
    Generic,
}

impl Kernels {
    pub fn as_str(self) -> &'static str {
        match self {
            Kernels::Cpu => "cpu",
            Kernels::Generic => "generic",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Kernels::Cpu),
            "generic" => Some(Kernels::Generic),
            _ => None,
        }
    }
}

const UNSET: u8 = 0;
const CPU: u8 = 1;
const GENERIC: u8 = 2;

static CHOICE: AtomicU8 = AtomicU8::new(UNSET);

/// Choose the kernels for this process (the CLI's `--kernels`; overrides `DORA_KERNELS`).
pub fn set(k: Kernels) {
    CHOICE.store(
        match k {
            Kernels::Cpu => CPU,
            Kernels::Generic => GENERIC,
        },
        Ordering::Relaxed,
    );
}

/// The kernels in use: as [`set`], else `DORA_KERNELS` (`cpu` or `generic`), else `cpu`.
pub fn get() -> Kernels {
    match CHOICE.load(Ordering::Relaxed) {
        CPU => Kernels::Cpu,
        GENERIC => Kernels::Generic,
        _ => {
            let k = std::env::var("DORA_KERNELS")
                .ok()
                .and_then(|v| Kernels::parse(v.trim()))
                .unwrap_or(Kernels::Cpu);
            set(k);
            k
        }
    }
}

/// Whether the CPU fast paths may run on `device`.
pub fn fast_on(device: &candle_core::Device) -> bool {
    device.is_cpu() && get() == Kernels::Cpu
}
