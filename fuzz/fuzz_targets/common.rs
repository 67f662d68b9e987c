//! What the LoRA targets do with a set that parsed: everything the engine asks of it before it
//! knows the model, and the deltas small enough to compute.

use tcd_ort::lora::LoraSet;

/// Deltas are as large as the weights they patch, which the engine checks against the model
/// before computing them; the targets compute only small ones.
const MAX_DELTA: usize = 1 << 16;

pub fn exercise(set: &LoraSet) {
    let _ = set.formats();
    let _ = set.module_count();
    for target in set.targets() {
        let _ = target.check_base_shape(Some(&target.shape));
    }
    if let Ok(pending) = set.pending() {
        for delta in pending {
            let size = delta
                .shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d));
            if size.is_some_and(|n| n <= MAX_DELTA) {
                let _ = delta.values();
            }
        }
    }
}
