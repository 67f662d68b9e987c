//! The generation parameters as AUTOMATIC1111 writes them (the PNG `parameters` text, its
//! API's `infotexts`): one format for every front end, which A1111-style readers parse back.

use super::{GenerateRequest, Task};

/// The PNG's `parameters` text, as A1111-style readers expect it.
pub fn parameters_text(
    request: &GenerateRequest,
    task: &Task,
    (width, height): (u32, u32),
    model: &str,
    (controlnets, ip_adapter): (&[String], Option<&str>),
) -> String {
    // A1111's format is line-based: a newline (or any control character) in a prompt would
    // end it early for every reader of the chunk.
    let one_line = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    let mut text = one_line(&request.prompt);
    if let Some(neg) = &request.negative_prompt {
        text.push_str(&format!("\nNegative prompt: {}", one_line(neg)));
    }
    text.push_str(&format!(
        "\nSteps: {}, Sampler: TCD, Eta: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        request.steps, request.eta, request.guidance, request.seed, width, height, model
    ));
    if let Some(o) = request.original_inference_steps {
        text.push_str(&format!(", Original inference steps: {o}"));
    }
    if request.vae_tiling {
        text.push_str(", VAE tiling: True");
    }
    if let Some(frames) = request.frames {
        text.push_str(&format!(", Frames: {frames}"));
    }
    for (i, c) in request.control.iter().enumerate() {
        text.push_str(&format!(
            ", ControlNet {}: {} (scale {}, steps {}-{})",
            i + 1,
            controlnets.get(i).map(String::as_str).unwrap_or("?"),
            c.scale,
            c.start,
            c.end
        ));
    }
    if let Some(reference) = &request.ip_adapter {
        text.push_str(&format!(
            ", IP-Adapter: {} (scale {})",
            ip_adapter.unwrap_or("?"),
            reference.scale
        ));
    }
    match task {
        Task::TextToImage => {}
        Task::ImageToImage { strength, .. } => {
            text.push_str(&format!(", Task: img2img, Denoising strength: {strength}"))
        }
        Task::Inpaint { strength, .. } => {
            text.push_str(&format!(", Task: inpaint, Denoising strength: {strength}"))
        }
    }
    text
}
