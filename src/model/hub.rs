//! Resolving Hugging Face hub ids into local directories through the shared hub cache.
//!
//! `--model owner/name` downloads only what an ONNX pipeline or a LoRA needs into the standard
//! cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`), the same one Python's
//! `huggingface_hub` uses. `HF_ENDPOINT` selects a mirror; with `HF_HUB_OFFLINE=1` nothing is
//! requested and the cache must already hold the files.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::{Error, Result};

/// The top-level entries of a repository that an ONNX pipeline needs.
const PIPELINE_ENTRIES: &[&str] = &[
    "model_index.json",
    "tcd_ort.json",
    "scheduler",
    "tokenizer",
    "tokenizer_2",
    "text_encoder",
    "text_encoder_2",
    "unet",
    "vae_decoder",
    "vae_encoder",
];

/// Files fetched from a pipeline repository's component folders.
fn wanted_pipeline_file(name: &str) -> bool {
    let mut parts = name.splitn(2, '/');
    let top = parts.next().unwrap_or_default();
    if !PIPELINE_ENTRIES.contains(&top) {
        return false;
    }
    match parts.next() {
        None => true,
        // Only the ONNX graphs, their external data, configs and tokenizer files: a mixed
        // repository may also hold multi-gigabyte PyTorch weights we never read.
        Some(rest) => {
            !rest.contains('/')
                && (rest.ends_with(".onnx")
                    || rest.ends_with(".onnx_data")
                    || rest.ends_with(".onnx.data")
                    || rest.ends_with(".json")
                    || rest.ends_with(".txt"))
        }
    }
}

/// Whether `s` looks like `owner/name` rather than a local path.
pub fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p != &"."
                && p != &".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
        .unwrap_or(false)
}

fn repo(id: &str, revision: Option<&str>) -> Repo {
    match revision {
        Some(rev) => Repo::with_revision(id.to_string(), RepoType::Model, rev.to_string()),
        None => Repo::new(id.to_string(), RepoType::Model),
    }
}

/// The cached copy of `file` in `id`, if any.
fn cached(id: &str, revision: Option<&str>, file: &str) -> Option<PathBuf> {
    Cache::from_env().repo(repo(id, revision)).get(file)
}

/// The HTTP status the hub answered with, when the request got that far.
fn http_status(e: &ApiError) -> Option<u16> {
    match e {
        // hf-hub does not re-export ureq's error type, whose Display is "http status: 404".
        ApiError::RequestError(inner) => inner
            .to_string()
            .strip_prefix("http status: ")?
            .trim()
            .parse()
            .ok(),
        _ => None,
    }
}

fn hub_error(id: &str, what: &str, e: ApiError) -> Error {
    // The server answered, so "no network?" would send the user the wrong way.
    if let Some(status) = http_status(&e) {
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        let hint = if matches!(status, 401 | 403 | 404) {
            format!(
                ": check the id and --revision; a private or gated repository needs a token in {}",
                Cache::from_env().token_path().display()
            )
        } else {
            String::new()
        };
        return Error::model(
            id,
            format!("{what}: the hub at {endpoint} answered HTTP {status}{hint}"),
        );
    }
    Error::model(
        id,
        format!(
            "{what}: {e} (no network? set HF_HUB_OFFLINE=1 to use the local cache at {}, or \
             give a local directory)",
            Cache::from_env().path().display()
        ),
    )
}

/// Resolves a pipeline repository to its snapshot directory, downloading what is missing.
pub fn resolve_pipeline(id: &str, revision: Option<&str>) -> Result<PathBuf> {
    if offline() {
        let index = cached(id, revision, "model_index.json").ok_or_else(|| {
            Error::model(
                id,
                format!(
                    "HF_HUB_OFFLINE is set and the hub cache at {} has no copy of this model",
                    Cache::from_env().path().display()
                ),
            )
        })?;
        return snapshot_dir(&index, id);
    }
    download_snapshot(
        id,
        revision,
        "model_index.json",
        wanted_pipeline_file,
        |files| {
            if !files.iter().any(|f| f == "model_index.json") {
                return Err(Error::model(
                    id,
                    "the repository has no model_index.json: it is not a diffusers/ONNX pipeline",
                ));
            }
            if !files.iter().any(|f| f.ends_with(".onnx")) {
                return Err(Error::model(
                id,
                "the repository holds no ONNX graphs; export it first with `python -m export convert ID DIR`",
            ));
            }
            Ok(())
        },
    )
}

/// Lists repository `id`, keeps the files `wanted` accepts, lets `check` refuse the listing,
/// downloads the files and returns the snapshot directory: the folder of `anchor`, a top-level
/// file every such repository has.
fn download_snapshot(
    id: &str,
    revision: Option<&str>,
    anchor: &str,
    wanted: impl Fn(&str) -> bool,
    check: impl FnOnce(&[String]) -> Result<()>,
) -> Result<PathBuf> {
    let api = ApiBuilder::from_env()
        .with_progress(std::io::stderr().is_terminal())
        .build()
        .map_err(|e| hub_error(id, "could not start the hub client", e))?;
    let remote = api.repo(repo(id, revision));
    let info = remote
        .info()
        .map_err(|e| hub_error(id, "could not list the repository", e))?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| wanted(f))
        .collect();
    check(&files)?;
    let mut anchor_path = None;
    for file in &files {
        let local = remote
            .get(file)
            .map_err(|e| hub_error(id, &format!("could not download {file}"), e))?;
        if file == anchor {
            anchor_path = Some(local);
        }
    }
    let anchor_path =
        anchor_path.ok_or_else(|| Error::model(id, format!("{anchor} was not fetched")))?;
    snapshot_dir(&anchor_path, id)
}

/// Top-level files of a single-graph repository (a ControlNet, a depth estimator): the graph,
/// its external data and its JSON configs.
fn wanted_flat_file(name: &str) -> bool {
    !name.contains('/')
        && (name.ends_with(".onnx")
            || name.ends_with(".onnx_data")
            || name.ends_with(".onnx.data")
            || name.ends_with(".json"))
}

/// Resolves a repository that holds one exported graph at its top level (`model.onnx` beside
/// `tcd_ort.json`, as `python -m export controlnet|depth` writes it) to its snapshot
/// directory, downloading what is missing. `what` names the kind of model in errors.
pub fn resolve_single_graph(id: &str, revision: Option<&str>, what: &str) -> Result<PathBuf> {
    if offline() {
        let graph = cached(id, revision, "model.onnx").ok_or_else(|| {
            Error::model(
                id,
                format!(
                    "HF_HUB_OFFLINE is set and the hub cache at {} has no copy of this {what}",
                    Cache::from_env().path().display()
                ),
            )
        })?;
        return snapshot_dir(&graph, id);
    }
    download_snapshot(id, revision, "model.onnx", wanted_flat_file, |files| {
        if files.iter().any(|f| f == "model.onnx") {
            Ok(())
        } else {
            Err(Error::model(
                id,
                format!(
                    "the repository has no model.onnx at its top level: it is not an exported \
                     {what} (export it with `python -m export`)"
                ),
            ))
        }
    })
}

/// Resolves a repository that holds an export of several graphs in folders beside a top-level
/// `tcd_ort.json` (an IP-Adapter: `image_encoder/`, `image_projection/`) to its snapshot
/// directory, downloading the graphs, their external data and the JSON files. `what` names the
/// kind of model in errors.
pub fn resolve_export(
    id: &str,
    revision: Option<&str>,
    what: &str,
    folders: &'static [&'static str],
) -> Result<PathBuf> {
    const ANCHOR: &str = "tcd_ort.json";
    if offline() {
        let manifest = cached(id, revision, ANCHOR).ok_or_else(|| {
            Error::model(
                id,
                format!(
                    "HF_HUB_OFFLINE is set and the hub cache at {} has no copy of this {what}",
                    Cache::from_env().path().display()
                ),
            )
        })?;
        return snapshot_dir(&manifest, id);
    }
    let wanted = |name: &str| match name.split_once('/') {
        None => wanted_flat_file(name),
        Some((folder, rest)) => folders.contains(&folder) && wanted_flat_file(rest),
    };
    download_snapshot(id, revision, ANCHOR, wanted, |files| {
        if files.iter().any(|f| f == ANCHOR) {
            Ok(())
        } else {
            Err(Error::model(
                id,
                format!(
                    "the repository has no {ANCHOR} at its top level: it is not an exported \
                     {what} (export it with `python -m export`)"
                ),
            ))
        }
    })
}

/// The files of repository `id` (paths relative to its root), from the hub's listing.
pub fn list_files(id: &str, revision: Option<&str>) -> Result<Vec<String>> {
    if offline() {
        return Err(Error::model(
            id,
            "HF_HUB_OFFLINE is set: the repository cannot be listed; name the file",
        ));
    }
    let api = ApiBuilder::from_env()
        .build()
        .map_err(|e| hub_error(id, "could not start the hub client", e))?;
    let info = api
        .repo(repo(id, revision))
        .info()
        .map_err(|e| hub_error(id, "could not list the repository", e))?;
    Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
}

/// Resolves one file of a repository (a LoRA, say), downloading it when missing.
pub fn resolve_file(id: &str, revision: Option<&str>, file: &str) -> Result<PathBuf> {
    if offline() {
        return cached(id, revision, file).ok_or_else(|| {
            Error::model(
                id,
                format!(
                    "HF_HUB_OFFLINE is set and the hub cache at {} has no copy of {file}",
                    Cache::from_env().path().display()
                ),
            )
        });
    }
    let api = ApiBuilder::from_env()
        .with_progress(std::io::stderr().is_terminal())
        .build()
        .map_err(|e| hub_error(id, "could not start the hub client", e))?;
    api.repo(repo(id, revision))
        .get(file)
        .map_err(|e| hub_error(id, &format!("could not download {file}"), e))
}

fn snapshot_dir(file: &Path, id: &str) -> Result<PathBuf> {
    file.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::model(id, "a cached file has no parent directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_apart_from_paths() {
        assert!(looks_like_hub_id("h1t/TCD-SD15-LoRA"));
        assert!(looks_like_hub_id(
            "stabilityai/stable-diffusion-xl-base-1.0"
        ));
        assert!(!looks_like_hub_id("models/tiny-sd15/extra"));
        assert!(!looks_like_hub_id("./model"));
        assert!(!looks_like_hub_id("../x"));
        assert!(!looks_like_hub_id("plain"));
    }

    #[test]
    fn only_pipeline_files_are_fetched() {
        assert!(wanted_pipeline_file("model_index.json"));
        assert!(wanted_pipeline_file("unet/model.onnx"));
        assert!(wanted_pipeline_file("unet/model.onnx_data"));
        // The UNet's segments for low-memory mode.
        assert!(wanted_pipeline_file("unet/segment_1.onnx"));
        assert!(wanted_pipeline_file("tokenizer/merges.txt"));
        assert!(!wanted_pipeline_file(
            "unet/diffusion_pytorch_model.safetensors"
        ));
        assert!(!wanted_pipeline_file("README.md"));
        assert!(!wanted_pipeline_file("unet/sub/model.onnx"));
    }
}
