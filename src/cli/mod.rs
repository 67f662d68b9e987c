//! Command-line interface: parses arguments with clap and translates them to the library API.
//! Errors are printed on one line and end the process with a non-zero status.

mod memory;
mod run;
mod session_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
