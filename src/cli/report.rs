//! What `tcd-ort run` says about a loaded engine: the providers each graph's nodes run on,
//! IoBinding, segments, the session cache, the engine's notes and what the LoRAs did.

use tcd_ort::pipeline::{Engine, LoraReport, SessionReport};
use tcd_ort::runtime::CacheStatus;

/// A note for a graph exported with fused attention whose main provider cannot run ONNX
/// Runtime's contrib ops (TensorRT, CoreML): ONNX Runtime hands those nodes to the next provider,
/// splitting the graph around every attention.
fn fused_attention_note(fused: bool, session: &SessionReport) -> Option<String> {
    const NO_CONTRIB_OPS: [&str; 2] = ["TensorrtExecutionProvider", "CoreMLExecutionProvider"];
    let (first, rest) = session.assignment.split_first()?;
    if !fused || rest.is_empty() || !NO_CONTRIB_OPS.contains(&first.provider.as_str()) {
        return None;
    }
    let others: Vec<&str> = rest.iter().map(|a| a.provider.as_str()).collect();
    Some(format!(
        "note: {}'s attention is com.microsoft.MultiHeadAttention (export --attention fused), \
         which {} does not run: those nodes run on {}; export with --attention plain for it",
        session.component,
        first.provider,
        others.join(" and ")
    ))
}

/// The per-graph summary printed after loading: the providers each graph's nodes run on and,
/// with a session cache, what it did.
pub fn session_summary(engine: &Engine) -> Vec<String> {
    let sessions = engine.sessions();
    let mut lines = Vec::new();
    let providers: Vec<String> = sessions
        .iter()
        .map(|s| {
            let names: Vec<String> = match s.assignment.as_slice() {
                [] => vec!["unknown".into()],
                [one] => vec![one.provider.clone()],
                many => many
                    .iter()
                    .map(|a| format!("{} ({} nodes)", a.provider, a.nodes))
                    .collect(),
            };
            format!("{}: {}", s.component, names.join(" + "))
        })
        .collect();
    lines.push(format!("providers: {}", providers.join(", ")));
    let manifest = engine.model().manifest();
    for s in &sessions {
        let attention = manifest
            .and_then(|m| m.components.get(&s.component))
            .and_then(|c| c.attention.as_deref());
        lines.extend(fused_attention_note(attention == Some("fused"), s));
    }
    let bound: Vec<&SessionReport> = sessions.iter().filter(|s| s.io_binding).collect();
    lines.push(match bound.as_slice() {
        [] => "io binding: off".to_string(),
        graphs => {
            let names: Vec<&str> = graphs.iter().map(|s| s.component.as_str()).collect();
            let on_device = graphs.iter().any(|s| s.device_inputs);
            format!(
                "io binding: {} ({})",
                names.join(", "),
                if on_device {
                    "conditioning and zero residuals stay on the device"
                } else {
                    "inputs in host memory, bound without copies"
                }
            )
        }
    });
    for s in sessions.iter().filter(|s| s.segments > 0) {
        lines.push(format!(
            "{}: {} segments, each loaded for its part of every step (low-memory mode)",
            s.component, s.segments
        ));
    }
    lines.extend(engine.notes().iter().map(|n| format!("note: {n}")));
    if sessions.iter().any(|s| s.cache != CacheStatus::Off) {
        let cache: Vec<String> = sessions
            .iter()
            .map(|s| format!("{}: {}", s.component, s.cache))
            .collect();
        lines.push(format!("session cache: {}", cache.join(", ")));
    }
    lines
}

/// What load-time LoRA application did; nothing without LoRAs.
pub fn lora_summary(report: &LoraReport) -> Vec<String> {
    if report.adapters == 0 {
        return Vec::new();
    }
    let list = |items: &std::collections::BTreeMap<String, usize>| -> Vec<String> {
        items.iter().map(|(c, n)| format!("{n} in {c}")).collect()
    };
    let (patched, slotted) = (list(&report.patched), list(&report.slotted));
    let mut lines = vec![if slotted.is_empty() {
        format!(
            "applied {} LoRA(s), {} modules: patched {} weights",
            report.adapters,
            report.modules,
            patched.join(", ")
        )
    } else {
        format!(
            "applied {} LoRA(s), {} modules: {} unfused in LoRA slots, {} fused",
            report.adapters,
            report.modules,
            slotted.join(", "),
            if patched.is_empty() {
                "none".to_string()
            } else {
                patched.join(", ")
            }
        )
    }];
    if !report.slot_overflow.is_empty() {
        lines.push(format!(
            "note: fused {} module(s) whose LoRA ranks add up to more than their slot's",
            report.slot_overflow.len()
        ));
    }
    if !report.unmatched.is_empty() {
        lines.push(format!(
            "warning: skipped {} LoRA target(s) that match no weight",
            report.unmatched.len()
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcd_ort::runtime::ProviderAssignment;

    fn report(providers: &[&str]) -> SessionReport {
        SessionReport {
            component: "unet".into(),
            assignment: providers
                .iter()
                .map(|p| ProviderAssignment {
                    provider: p.to_string(),
                    nodes: 1,
                })
                .collect(),
            cache: CacheStatus::Off,
            io_binding: false,
            device_inputs: false,
            segments: 0,
        }
    }

    #[test]
    fn fused_attention_is_noted_where_tensorrt_or_coreml_hand_it_on() {
        let trt = report(&["TensorrtExecutionProvider", "CUDAExecutionProvider"]);
        let note = fused_attention_note(true, &trt).expect("a note for TensorRT");
        assert!(
            note.contains("unet") && note.contains("CUDAExecutionProvider"),
            "{note}"
        );
        assert!(note.contains("--attention plain"), "{note}");
        let coreml = report(&["CoreMLExecutionProvider", "CPUExecutionProvider"]);
        assert!(fused_attention_note(true, &coreml).is_some());
        // Plain graphs, graphs TensorRT runs whole, and CUDA (which runs the op) get none.
        assert_eq!(fused_attention_note(false, &trt), None);
        assert_eq!(
            fused_attention_note(true, &report(&["TensorrtExecutionProvider"])),
            None
        );
        let cuda = report(&["CUDAExecutionProvider", "CPUExecutionProvider"]);
        assert_eq!(fused_attention_note(true, &cuda), None);
    }
}
