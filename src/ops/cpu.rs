//! Borrowing a candle CPU tensor's f32 values, and sharing an output buffer between the
//! threads of [`super::pool`]: what the hand-written CPU paths (the decode kernel, the fused
//! unmerged rows, merging and DoRA norms) need from candle.

use candle_core::{DType, Storage, Tensor};

/// `fn $name(args) -> R` that runs `$plain` (an `#[inline(always)]` function of plain loops)
/// compiled for AVX-512F, else for AVX2 and FMA, else as is, by what the CPU has: the
/// compiler vectorises the loops for the features of the function they are inlined into.
/// (Closures inside `$plain` would not inherit them: keep its loops closure-free.)
macro_rules! simd_dispatch {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $plain:ident) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $plain($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $plain($($arg),*)
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $plain($($arg),*)
        }
    };
}

/// A contiguous f32 CPU tensor's values, borrowed for as long as the view lives.
pub(super) struct View<G> {
    guard: G,
    start: usize,
    end: usize,
}

impl<G: std::ops::Deref<Target = Storage>> View<G> {
    pub(super) fn values(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(cpu) => &cpu.as_slice::<f32>().expect("checked f32")[self.start..self.end],
            _ => unreachable!("checked CPU"),
        }
    }
}

/// `t`'s values if it is a contiguous f32 tensor on the CPU.
pub(super) fn view(t: &Tensor) -> Option<View<impl std::ops::Deref<Target = Storage> + '_>> {
    if t.dtype() != DType::F32 || !super::kernels::fast_on(t.device()) {
        return None;
    }
    let (guard, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    if !matches!(&*guard, Storage::Cpu(_)) {
        return None;
    }
    Some(View { guard, start, end })
}

/// An output buffer shared by parts that each write their own disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct Out(pub(super) *mut f32);
// SAFETY: parts write disjoint elements of one buffer that outlives them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The buffer from element `n` on. Takes `self` whole, as [`slice`](Self::slice) does.
    ///
    /// # Safety
    /// The buffer holds at least `n` values.
    pub(super) unsafe fn add(self, n: usize) -> Out {
        Out(self.0.add(n))
    }

    /// Elements `at..at + len`. Taking `self` whole keeps closures from capturing the bare
    /// pointer field, which is neither `Send` nor `Sync`.
    ///
    /// # Safety
    /// The buffer holds at least `at + len` values and no one else uses them meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}
