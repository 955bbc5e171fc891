//! The gated MLP's `silu(gate) · up` in one pass on the CPU.
//!
//! As two candle ops it reads and writes every value twice, each pass sharing out its work
//! anew across threads; a 512-token SmolLM2 prefill spent ~5% of its time there (the scalar
//! `expf`, the element-wise passes and their thread hand-offs). Here each part of the pool
//! computes candle's own formula, `g / (1 + e^(−g)) · u` with the same `f32::exp`, so the
//! values are candle's bit for bit.

use candle_core::{Result, Tensor};

use super::cpu::{view, Out};

/// Values per part: the pool's hand-off costs a few microseconds, these take tens.
const PART: usize = 1 << 14;

/// `silu(gate) · up` for two tensors of one shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() == up.shape() {
        if let (Some(g), Some(u)) = (view(gate), view(up)) {
            let (g, u) = (g.values(), u.values());
            let mut y = Vec::<f32>::with_capacity(g.len());
            let out = Out(y.as_mut_ptr());
            super::pool::run(g.len().div_ceil(PART), &|p| {
                let (a, b) = (p * PART, ((p + 1) * PART).min(g.len()));
                // SAFETY: each part writes its own range of `y`, which has room for them all
                // and outlives the pool's run.
                let y = unsafe { out.slice(a, b - a) };
                for ((y, &g), &u) in y.iter_mut().zip(&g[a..b]).zip(&u[a..b]) {
                    *y = g / (1.0 + (-g).exp()) * u;
                }
            });
            // SAFETY: the parts wrote every value; f32 has no invalid values.
            unsafe { y.set_len(g.len()) };
            return Tensor::from_vec(y, gate.shape(), gate.device());
        }
    }
    gate.silu()? * up
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    /// Bit for bit candle's `silu` then `mul`, over every magnitude (and past the ends of
    /// `exp`'s range), in more than one part.
    #[test]
    fn silu_mul_is_candles_silu_times_up_bit_for_bit() {
        let dev = Device::Cpu;
        let n = 3 * super::PART + 17;
        let g = (Tensor::randn(0f32, 1.0, (n / 17, 17), &dev).unwrap() * 40.0).unwrap();
        let u = Tensor::randn(0f32, 1.0, (n / 17, 17), &dev).unwrap();
        let want = (g.silu().unwrap() * &u).unwrap();
        let got = super::silu_mul(&g, &u).unwrap();
        let (want, got) = (
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(want
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
