//! Load-time LoRA: resolves adapters (paths or hub ids), computes their summed deltas and turns
//! them into weight replacements for the ONNX sessions, checking every name and shape first
//! (ONNX Runtime silently ignores replacements for names it does not know).
//!
//! A model exported with LoRA slots (`python -m export convert --lora-slots RANK`, see
//! `export/lora_slots.py`) computes `y = W x + B (A x)` with empty `A`, `B` on every target
//! module; there the adapters of a module go into its slot unfused, as diffusers runs them
//! after `set_adapters`: `A` = the adapters' down matrices stacked, `B` = their up matrices
//! side by side, each times `weight · alpha/r`, zero-padded to the slot rank. Only the LoRA
//! tensors are copied, no base weight is read. A module whose adapters add up to more than the
//! slot rank, or one without a slot (text encoders, say), is fused as before.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::lora::{param_aliases, LoraSet, LoraSource, PendingDelta, UnetLayout};
use crate::model::{hub, LoraSlots, ModelDir};
use crate::runtime::{ElementType, InitializerTable, WeightOverride};
use crate::{Error, Result};

/// One LoRA as the user names it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// A `.safetensors` path or a hub repository id.
    pub source: String,
    /// The adapter weight (diffusers' `adapter_weights`).
    pub weight: f32,
    /// The file to read from a directory or repository; `None` uses the engine-wide choice.
    pub weight_name: Option<String>,
}

/// What loading LoRAs did, for the user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoraReport {
    /// Adapters applied.
    pub adapters: usize,
    /// LoRA modules read across all adapters.
    pub modules: usize,
    /// Weights patched by fusing (`W + Σ ΔW`), per component directory.
    pub patched: BTreeMap<String, usize>,
    /// Modules whose adapters went unfused into the model's LoRA slots, per component
    /// directory (models exported with `--lora-slots`).
    pub slotted: BTreeMap<String, usize>,
    /// Modules that have a slot but were fused because their adapters' ranks add up to more
    /// than the slot rank (`component.param`); they are counted in `patched`.
    pub slot_overflow: Vec<String>,
    /// LoRA targets with no matching weight (only when unmatched targets are allowed).
    pub unmatched: Vec<String>,
}

/// The file diffusers' `load_lora_weights` reads from a repository when none is named.
const DEFAULT_WEIGHT_NAME: &str = "pytorch_lora_weights.safetensors";

/// The LoRA file diffusers' `load_lora_weights` reads from a directory or repository whose
/// files are `files` when none is named (`_best_guess_weight_name`): the default name, else the
/// only top-level `.safetensors` file (motion LoRAs ship `diffusion_pytorch_model.safetensors`).
fn best_guess_weight_name(files: &[String], source: &str) -> Result<String> {
    if files.iter().any(|f| f == DEFAULT_WEIGHT_NAME) {
        return Ok(DEFAULT_WEIGHT_NAME.to_string());
    }
    let candidates: Vec<&String> = files
        .iter()
        .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
        .collect();
    match candidates.as_slice() {
        [only] => Ok(only.to_string()),
        [] => Err(Error::invalid(format!(
            "LoRA {source} has no {DEFAULT_WEIGHT_NAME} and no other .safetensors file at its top \
             level; name the file with --lora-weight-name"
        ))),
        several => Err(Error::invalid(format!(
            "LoRA {source} has several .safetensors files ({}) and no {DEFAULT_WEIGHT_NAME}: name \
             one with --lora-weight-name",
            several
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn resolve_source(spec: &LoraSpec, weight_name: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(&spec.source);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        let name = match weight_name {
            Some(name) => name.to_string(),
            None => {
                let files: Vec<String> = std::fs::read_dir(path)
                    .map_err(|e| Error::io(path, e))?
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                best_guess_weight_name(&files, &spec.source)?
            }
        };
        let file = path.join(&name);
        if file.is_file() {
            return Ok(file);
        }
        return Err(Error::invalid(format!(
            "LoRA directory {} has no {name}; name the file with --lora-weight-name",
            path.display(),
        )));
    }
    if hub::looks_like_hub_id(&spec.source) {
        let name = match weight_name {
            Some(name) => name.to_string(),
            // The default file when cached or present; else the repository's listing.
            None => match hub::resolve_file(&spec.source, None, DEFAULT_WEIGHT_NAME) {
                Ok(file) => return Ok(file),
                Err(default_missing) => {
                    let files = hub::list_files(&spec.source, None).map_err(|_| default_missing)?;
                    best_guess_weight_name(&files, &spec.source)?
                }
            },
        };
        return hub::resolve_file(&spec.source, None, &name);
    }
    Err(Error::invalid(format!(
        "LoRA {}: no such file (and not a hub id of the form owner/name)",
        spec.source
    )))
}

/// Does the load-time LoRA work of [`super::Engine`] on a model directory without ONNX
/// Runtime: opens `model_dir`, resolves and parses the LoRAs, checks every target against the
/// model's weights and computes the patched weights, then drops them.
///
/// Returns how many weights were patched and the report. For benchmarks of that step and for
/// checking that LoRAs fit a model before loading it.
pub fn apply_loras(
    model_dir: &Path,
    specs: &[LoraSpec],
    weight_name: Option<&str>,
    allow_unmatched: bool,
) -> Result<(usize, LoraReport)> {
    let model = ModelDir::open(model_dir)?;
    let (overrides, report) = weight_overrides(&model, specs, weight_name, allow_unmatched)?;
    Ok((overrides.values().map(Vec::len).sum(), report))
}

/// Computes the weight replacements for every component, keyed by component directory name.
///
/// The work runs on a thread pool of its own, joined before this returns: rayon's global pool
/// would keep its threads for the life of the process, and a host that drops every engine
/// should be left with the threads it had (issue 28).
pub(super) fn weight_overrides(
    model: &ModelDir,
    specs: &[LoraSpec],
    weight_name: Option<&str>,
    allow_unmatched: bool,
) -> Result<(BTreeMap<String, Vec<WeightOverride>>, LoraReport)> {
    if specs.is_empty() {
        return Ok((BTreeMap::new(), LoraReport::default()));
    }
    rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("tcd-ort-lora-{i}"))
        .build_scoped(rayon::ThreadBuilder::run, |pool| {
            pool.install(|| compute_overrides(model, specs, weight_name, allow_unmatched))
        })
        .map_err(|e| Error::io("threads for the LoRA work", std::io::Error::other(e)))?
}

fn compute_overrides(
    model: &ModelDir,
    specs: &[LoraSpec],
    weight_name: Option<&str>,
    allow_unmatched: bool,
) -> Result<(BTreeMap<String, Vec<WeightOverride>>, LoraReport)> {
    let mut report = LoraReport::default();
    for spec in specs {
        if !spec.weight.is_finite() {
            return Err(Error::invalid(format!(
                "LoRA {}: weight must be a finite number",
                spec.source
            )));
        }
    }
    let sources = specs
        .iter()
        .map(|s| {
            Ok(LoraSource {
                path: resolve_source(s, s.weight_name.as_deref().or(weight_name))?,
                weight: s.weight,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let layout = UnetLayout {
        layers_per_block: model.unet.layers_per_block.unwrap_or(2),
    };
    let set = LoraSet::load(&sources, &layout)?;
    report.adapters = sources.len();
    report.modules = set.module_count();
    // Deltas are computed per weight and added into it as it is read, so the peak is the patched
    // weights themselves, not those plus every delta.
    let deltas = set.pending()?;

    let mut by_component: BTreeMap<&'static str, Vec<_>> = BTreeMap::new();
    for delta in deltas {
        by_component
            .entry(delta.component.as_str())
            .or_default()
            .push(delta);
    }
    let mut overrides = BTreeMap::new();
    for (component, deltas) in by_component {
        if let Some(replacements) =
            component_overrides(model, component, deltas, allow_unmatched, &mut report)?
        {
            overrides.insert(component.to_string(), replacements);
        }
    }
    Ok((overrides, report))
}

/// The replacements for one component's deltas: into its LoRA slots where they fit, fused into
/// the weights otherwise; `None` for a component the model lacks when unmatched targets are
/// allowed.
fn component_overrides(
    model: &ModelDir,
    component: &'static str,
    deltas: Vec<PendingDelta<'_>>,
    allow_unmatched: bool,
    report: &mut LoraReport,
) -> Result<Option<Vec<WeightOverride>>> {
    if !model.has_component(component) {
        if allow_unmatched {
            report
                .unmatched
                .extend(deltas.iter().map(|d| format!("{component}.{}", d.param)));
            return Ok(None);
        }
        return Err(Error::invalid(format!(
            "the LoRA patches {component}, which this model does not have (a LoRA for another base model?)"
        )));
    }
    let graph = model.graph_path(component);
    let table = InitializerTable::read(&graph)?;
    // The name under which this export holds the parameter (CLIP weights sit under
    // `text_model.` or not depending on the exporter's transformers version).
    let located = |d: &PendingDelta<'_>| {
        param_aliases(d.component, &d.param)
            .into_iter()
            .find(|n| table.get(n).is_some())
    };
    let (present, missing): (Vec<_>, Vec<_>) = deltas
        .into_iter()
        .map(|d| (located(&d), d))
        .partition(|(name, _)| name.is_some());
    if present.is_empty() {
        let keeps_names = model.manifest().is_some_and(|m| m.weights_keep_names);
        return Err(Error::model(
            &graph,
            if keeps_names {
                format!(
                    "none of the LoRA's {} targets in {component} exist in this model (e.g. '{}'): a LoRA for another base model?",
                    missing.len(),
                    missing.first().map(|(_, d)| d.param.as_str()).unwrap_or_default()
                )
            } else {
                "the model's weights do not carry their PyTorch names (a plain optimum \
                 export, say), so a LoRA cannot be applied at load time; re-export with \
                 `python -m export convert SOURCE DIR` (keeps names), or fuse the LoRA at \
                 export with `--lora FILE --fuse-lora`"
                    .to_string()
            },
        ));
    }
    if !missing.is_empty() {
        let names: Vec<String> = missing
            .iter()
            .map(|(_, d)| format!("{component}.{}", d.param))
            .collect();
        if !allow_unmatched {
            let shown = names.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
            return Err(Error::invalid(format!(
                "{} LoRA target(s) match no weight in {component}: {shown}{} (pass --lora-allow-unmatched to skip them)",
                names.len(),
                if names.len() > 8 { ", ..." } else { "" }
            )));
        }
        report.unmatched.extend(names);
    }
    // Modules with a slot whose adapters fit it go into the slot, the rest are fused.
    let slots = model.manifest().and_then(|m| m.lora_slots.get(component));
    let (slotted, present): (Vec<_>, Vec<_>) = match slots {
        None => (Vec::new(), present),
        Some(slots) => {
            let modules: HashSet<&str> = slots.modules.iter().map(String::as_str).collect();
            let has_slot = |d: &PendingDelta<'_>| {
                d.param
                    .strip_suffix(".weight")
                    .is_some_and(|m| modules.contains(m))
            };
            let (slotted, fused): (Vec<_>, Vec<_>) = present
                .into_iter()
                .partition(|(_, d)| has_slot(d) && d.rank() <= slots.rank);
            report.slot_overflow.extend(
                fused
                    .iter()
                    .filter(|(_, d)| has_slot(d))
                    .map(|(_, d)| format!("{component}.{}", d.param)),
            );
            (slotted, fused)
        }
    };
    let mut component_overrides = Vec::new();
    if let Some(slots) = slots.filter(|_| !slotted.is_empty()) {
        let filled = slot_overrides(&graph, &table, component, slots, slotted)?;
        report
            .slotted
            .insert(component.to_string(), filled.len() / 2);
        component_overrides.extend(filled);
    }
    let patched = fuse(&graph, &table, component, present)?;
    if !patched.is_empty() {
        report.patched.insert(component.to_string(), patched.len());
    }
    component_overrides.extend(patched);
    Ok(Some(component_overrides))
}

/// The weights of one component with their deltas added (diffusers' `fuse_lora`), computed in
/// parallel; `present` pairs each delta with the name its weight has in the graph.
fn fuse(
    graph: &Path,
    table: &InitializerTable,
    component: &str,
    present: Vec<(Option<String>, PendingDelta<'_>)>,
) -> Result<Vec<WeightOverride>> {
    present
        .into_par_iter()
        .map(|(name, d)| {
            let init = name
                .as_deref()
                .and_then(|n| table.get(n))
                .ok_or_else(|| Error::Runtime(format!("weight {} vanished", d.param)))?;
            if squeeze(&init.dims) != squeeze(&d.shape) {
                return Err(Error::invalid(format!(
                    "LoRA delta for {component}.{} has shape {:?} but the model's weight is {:?}: a LoRA for another base model?",
                    d.param, d.shape, init.dims
                )));
            }
            if !init.is_external() {
                return Err(Error::model(
                    graph,
                    format!(
                        "weight '{}' is embedded in the graph; ONNX Runtime ignores replacements of embedded weights, so re-export with external data (`python -m export convert`)",
                        init.name
                    ),
                ));
            }
            let mut values = table.read_f32(init)?;
            // W' = W + sum of w_i * (alpha_i / r_i) * B_i A_i, as diffusers' fuse_lora.
            d.add_to(&mut values)?;
            Ok(WeightOverride {
                name: init.name.clone(),
                shape: init.dims.clone(),
                values,
                dtype: ElementType::from_onnx(init.data_type),
            })
        })
        .collect()
}

/// Fills the slots of `deltas` (every one has a slot its ranks fit): two replacements per
/// module, its `A` and `B`, checked against the graph's slot initializers.
fn slot_overrides(
    graph: &Path,
    table: &InitializerTable,
    component: &str,
    slots: &LoraSlots,
    deltas: Vec<(Option<String>, PendingDelta<'_>)>,
) -> Result<Vec<WeightOverride>> {
    let graph_scale = slots.graph_scale();
    if !(graph_scale.is_finite() && graph_scale != 0.0) {
        return Err(Error::model(
            graph,
            format!(
                "the manifest's LoRA slots for {component} have lora_alpha / rank = {graph_scale}; re-export with `--lora-slots RANK`"
            ),
        ));
    }
    let filled: Vec<[WeightOverride; 2]> = deltas
        .into_par_iter()
        .map(|(_, d)| {
            let module = d.param.strip_suffix(".weight").unwrap_or(&d.param);
            let (a_name, b_name) = slots.names(module);
            let slot = |name: &str| {
                let init = table.get(name).ok_or_else(|| {
                    Error::model(
                        graph,
                        format!(
                            "the manifest lists a LoRA slot for {component}.{module} but the graph has no '{name}'; re-export the model"
                        ),
                    )
                })?;
                if !init.is_external() {
                    return Err(Error::model(
                        graph,
                        format!(
                            "LoRA slot '{name}' is embedded in the graph; ONNX Runtime ignores replacements of embedded weights, so re-export with external data (`python -m export convert --lora-slots`)"
                        ),
                    ));
                }
                Ok(init)
            };
            let (a_init, b_init) = (slot(&a_name)?, slot(&b_name)?);
            let mut want_a = vec![slots.rank];
            want_a.extend_from_slice(&d.shape[1..]);
            let want_b = [d.shape[0], slots.rank];
            if squeeze(&a_init.dims) != squeeze(&want_a) || squeeze(&b_init.dims) != want_b {
                return Err(Error::invalid(format!(
                    "LoRA for {component}.{module} has delta shape {:?} but its slot holds A {:?} and B {:?}: a LoRA for another base model?",
                    d.shape, a_init.dims, b_init.dims
                )));
            }
            // The graph multiplies B (A x) by lora_alpha / rank; divide it out of B.
            let (a, b) = d.slot_values(slots.rank, 1.0 / graph_scale)?;
            Ok([
                WeightOverride {
                    name: a_init.name.clone(),
                    shape: a_init.dims.clone(),
                    values: a,
                    dtype: ElementType::from_onnx(a_init.data_type),
                },
                WeightOverride {
                    name: b_init.name.clone(),
                    shape: b_init.dims.clone(),
                    values: b,
                    dtype: ElementType::from_onnx(b_init.data_type),
                },
            ])
        })
        .collect::<Result<_>>()?;
    Ok(filled.into_iter().flatten().collect())
}

/// Drops trailing 1s, so a linear delta fits a 1x1 convolution weight and vice versa.
fn squeeze(shape: &[usize]) -> &[usize] {
    let mut n = shape.len();
    while n > 2 && shape[n - 1] == 1 {
        n -= 1;
    }
    &shape[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_lora_file_is_an_error() {
        let spec = LoraSpec {
            source: "/nonexistent/lora.safetensors".into(),
            weight: 1.0,
            weight_name: None,
        };
        let err = resolve_source(&spec, None).expect_err("missing");
        assert!(err.to_string().contains("no such file"), "{err}");
    }

    #[test]
    fn an_unnamed_file_is_guessed_as_diffusers_guesses_it() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // A motion LoRA repository: its only top-level safetensors file.
        let motion = names(&[
            "README.md",
            "diffusion_pytorch_model.safetensors",
            "a/x.safetensors",
        ]);
        assert_eq!(
            best_guess_weight_name(&motion, "m").expect("guessed"),
            "diffusion_pytorch_model.safetensors"
        );
        // The default name wins over others.
        let both = names(&["x.safetensors", DEFAULT_WEIGHT_NAME]);
        assert_eq!(
            best_guess_weight_name(&both, "m").expect("default"),
            DEFAULT_WEIGHT_NAME
        );
        let several = best_guess_weight_name(&names(&["x.safetensors", "y.safetensors"]), "m");
        assert!(several
            .expect_err("ambiguous")
            .to_string()
            .contains("several"));
        assert!(best_guess_weight_name(&names(&["x.bin"]), "m").is_err());
        // A directory holding one such file resolves to it.
        let dir = std::env::temp_dir().join(format!("tcd-ort-guess-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("diffusion_pytorch_model.safetensors");
        std::fs::write(&file, b"x").expect("write");
        let spec = LoraSpec {
            source: dir.to_string_lossy().into_owned(),
            weight: 1.0,
            weight_name: None,
        };
        assert_eq!(resolve_source(&spec, None).expect("resolved"), file);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
