//! All integration tests, compiled as one binary.

mod animatediff;
mod bad_inputs;
mod canny;
mod cli;
mod clip_image;
mod common;
mod controlnet;
mod depth;
mod ffi;
mod fixed_shape;
mod fp16;
mod hostile;
mod hub;
mod img2img;
mod initializers;
mod io_binding;
mod ip_adapter;
mod lora;
mod lora_parity;
mod lora_slots;
mod lora_switch;
mod low_memory;
mod optimum;
mod outputs;
mod parity;
mod providers;
mod rng;
mod scheduler;
// Counts the process's threads in /proc.
#[cfg(target_os = "linux")]
mod threads;
mod tokenizer;
mod vae_tiling;
mod vae_tiny;
