//! Command-line interface: parses arguments with clap and translates them to the library API.
//! Errors are printed on one line and end the process with a non-zero status.

mod animation;
mod decode;
mod engine_args;
mod interrupt;
mod memory;
mod output;
mod report;
mod run;
#[cfg(feature = "server")]
mod serve;
mod session_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tcd_ort::pipeline::Field;

/// Trajectory Consistency Distillation Stable Diffusion on ONNX Runtime.
#[derive(Debug, Parser)]
#[command(name = "tcd-ort", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images from a prompt.
    Run(Box<run::RunArgs>),
    /// Decode latents saved with `run --save-latents` into PNGs.
    Decode(Box<decode::DecodeArgs>),
    /// Serve the AUTOMATIC1111 and OpenAI image APIs over HTTP.
    #[cfg(feature = "server")]
    Serve(Box<serve::ServeArgs>),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    memory::return_freed_memory_promptly();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout with status 0, usage errors to stderr with 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Decode(args) => decode::decode(*args),
        #[cfg(feature = "server")]
        Command::Serve(args) => serve::serve(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(stopped) = e.downcast_ref::<interrupt::Interrupted>() {
                eprintln!("error: {stopped}");
                return ExitCode::from(stopped.exit_code());
            }
            let message = match e.downcast_ref::<tcd_ort::Error>() {
                Some(tcd_ort::Error::InvalidField { field, message }) => {
                    format!("{} {message}", flag(*field))
                }
                Some(tcd_ort::Error::OverLimit { field, message }) => {
                    let most = tcd_ort::pipeline::Limits::LARGE;
                    format!(
                        "{} {message} (--allow-large lifts the limits to {} per side, {} \
                         megapixels and {} images)",
                        flag(*field),
                        most.max_side,
                        most.max_pixels >> 20,
                        most.max_images
                    )
                }
                _ => chain_text(&e),
            }
            .replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: a library error's message already
/// ends with its source's (`path: Is a directory`), which `{:#}` would repeat.
fn chain_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// The flag that sets a request field the library names.
fn flag(field: Field) -> &'static str {
    match field {
        Field::Steps => "--steps",
        Field::Eta => "--eta",
        Field::Guidance => "--guidance",
        Field::Width => "--width",
        Field::Height => "--height",
        Field::NumImages => "--num-images",
        Field::OriginalInferenceSteps => "--original-inference-steps",
        Field::Strength => "--strength",
        Field::Image => "--image",
        Field::InpaintMode => "--inpaint-mode",
        Field::ControlImage => "--control-image",
        Field::ControlScale => "--controlnet's SCALE",
        Field::ControlStart => "--control-start",
        Field::ControlEnd => "--control-end",
        Field::CannyThresholds => "--canny-low/--canny-high",
        Field::IpAdapterImage => "--ip-adapter-image",
        Field::IpAdapterScale => "--ip-adapter-scale",
        Field::Frames => "--frames",
        Field::DecodeChunk => "--decode-chunk",
        _ => field.name(),
    }
}
