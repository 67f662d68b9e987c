//! LoRAs changed on a loaded engine, between generations (`Engine::set_loras`).

use std::ffi::c_char;

use super::engine::tcd_engine;
use super::status::{borrow_mut, guard, string, tcd_status, Failure};
use crate::pipeline::LoraSpec;

/// Applies `count` LoRAs (`sources[i]`: a `.safetensors` file, a directory or a hub id, at
/// `weights[i]`) on top of those the engine loaded with, replacing the ones of the previous
/// call; `count` 0 goes back to the loaded state. On a model exported with `--lora-slots` the
/// UNet keeps its session and the slots are swapped in (a fraction of a second); modules
/// without a slot and text-encoder LoRAs rebuild only the graphs they change. On failure the
/// engine keeps the LoRAs it had. Errors: `TCD_ERR_INVALID_ARGUMENT` (a missing file, a
/// weight that is not finite, a LoRA for another model), `TCD_ERR_MODEL` (a malformed file).
///
/// # Safety
///
/// `engine` is NULL or a live engine no other call uses during this one; when `count` > 0,
/// `sources` and `weights` point to `count` elements, each source a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_set_loras(
    engine: *mut tcd_engine,
    sources: *const *const c_char,
    weights: *const f32,
    count: usize,
) -> tcd_status {
    guard("tcd_engine_set_loras", || {
        // SAFETY: the caller's contract.
        let engine = unsafe { borrow_mut(engine, "engine") }?;
        if engine.poisoned {
            return Err(Failure::poisoned("engine"));
        }
        let mut specs = Vec::with_capacity(count);
        if count > 0 {
            if sources.is_null() {
                return Err(Failure::null("sources"));
            }
            if weights.is_null() {
                return Err(Failure::null("weights"));
            }
            for i in 0..count {
                // SAFETY: both arrays hold `count` elements by the caller's contract.
                let (source, weight) = unsafe { (*sources.add(i), *weights.add(i)) };
                // SAFETY: each source is NULL or NUL-terminated by the caller's contract.
                let source = unsafe { string(source, "sources[i]") }?;
                specs.push(LoraSpec {
                    source,
                    weight,
                    weight_name: None,
                });
            }
        }
        engine.engine.set_loras(&specs)?;
        Ok(())
    })
}
