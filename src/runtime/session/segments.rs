//! A graph in consecutive segments (`python -m export segment`), each loaded for its part of a
//! run and released before the next one loads.

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use ort::session::SessionInputValue;
use ort::value::DynValue;

use super::assignment::tally;
use super::run::read_output;
use super::{
    not_loaded, rt_err, Graph, IoSpec, ProviderAssignment, RunStats, SessionOptions, WeightOverride,
};
use crate::runtime::cache::CacheStatus;
use crate::{Error, Result};

impl Graph {
    /// Loads a graph split into consecutive segments (`export/segments.py`: the files share the
    /// weights of `whole`, the unsplit graph): a run loads each segment, runs it and releases
    /// it before the next one loads, so it holds one segment's weights at a time and pays a
    /// load per segment (from the session cache when it is on). What one segment computes for
    /// a later one passes between them under its name in the whole graph. Replaced weights go
    /// to the segments that read them. Each segment is loaded once here, to check it (and to
    /// fill the session cache), and released.
    pub fn load_segmented(
        name: &str,
        whole: &Path,
        parts: &[PathBuf],
        options: &SessionOptions,
        overrides: Vec<WeightOverride>,
    ) -> Result<Self> {
        if parts.len() < 2 {
            return Err(Error::model(
                whole,
                format!("the {name} graph needs at least 2 segments to load in segments"),
            ));
        }
        let tables = parts
            .iter()
            .map(|p| crate::runtime::InitializerTable::read(p))
            .collect::<Result<Vec<_>>>()?;
        let mut routed: Vec<Vec<WeightOverride>> = vec![Vec::new(); parts.len()];
        for o in overrides {
            let holders: Vec<usize> = (0..tables.len())
                .filter(|&k| tables[k].get(&o.name).is_some())
                .collect();
            let Some((&last, rest)) = holders.split_last() else {
                return Err(Error::model(
                    whole,
                    format!(
                        "no segment of the {name} graph has the weight '{}'; write the \
                         segments again with `python -m export segment`",
                        o.name
                    ),
                ));
            };
            for &k in rest {
                routed[k].push(o.clone());
            }
            routed[last].push(o);
        }
        // Each segment's session serves one run: pre-packing its MatMul weights at every load
        // cost more than the run's own packing (full-size SD1.5: 0.35-0.6 s against 0.1 s per
        // segment load, runs unchanged). The optimised graph, and so the cache entry, is the
        // same either way.
        let options = &SessionOptions {
            disable_prepacking: true,
            ..options.clone()
        };
        let mut segments = Vec::with_capacity(parts.len());
        for (k, (part, weights)) in parts.iter().zip(routed).enumerate() {
            let mut graph =
                Graph::load_with_weights(&format!("{name}-segment-{k}"), part, options, weights)?;
            graph.keep_for_reload(options);
            graph.release();
            segments.push(graph);
        }
        Self::from_segments(name, whole, options, segments)
    }

    /// The graph the loaded `segments` make together: its inputs are those no earlier segment
    /// computes, its outputs those no later segment reads (and the last segment's).
    fn from_segments(
        name: &str,
        whole: &Path,
        options: &SessionOptions,
        segments: Vec<Graph>,
    ) -> Result<Self> {
        let mut inputs: Vec<IoSpec> = Vec::new();
        let mut placements = Vec::new();
        let mut computed: Vec<&str> = Vec::new();
        for segment in &segments {
            for (spec, placement) in segment.inputs.iter().zip(&segment.placements) {
                let known = computed.contains(&spec.name.as_str())
                    || inputs.iter().any(|i| i.name == spec.name);
                if !known {
                    inputs.push(spec.clone());
                    placements.push(placement.clone());
                }
            }
            computed.extend(segment.outputs.iter().map(|o| o.name.as_str()));
        }
        let last = segments.len() - 1;
        let mut outputs = Vec::new();
        for (k, segment) in segments.iter().enumerate() {
            for spec in &segment.outputs {
                let read_later = segments[k + 1..]
                    .iter()
                    .any(|s| s.input(&spec.name).is_some());
                if k == last || !read_later {
                    outputs.push(spec.clone());
                }
            }
        }
        if outputs.is_empty() {
            return Err(Error::model(
                whole,
                format!("the segments of the {name} graph compute no output"),
            ));
        }
        let mut assignment: Vec<ProviderAssignment> = Vec::new();
        for a in segments.iter().flat_map(|s| &s.assignment) {
            tally(&mut assignment, &a.provider, a.nodes);
        }
        assignment.sort_by_key(|t| std::cmp::Reverse(t.nodes));
        // One status for the graph: the segments' when they agree, else the first that differs
        // from a hit (a miss, a store, a rejection).
        let first = segments[0].cache.clone();
        let cache = segments
            .iter()
            .map(|s| &s.cache)
            .find(|c| **c != first && **c != CacheStatus::Hit)
            .cloned()
            .unwrap_or(first);
        Ok(Graph {
            name: name.to_string(),
            path: whole.to_path_buf(),
            binding: None,
            session: None,
            reload: Some(Box::new(options.clone())),
            weights: Vec::new(),
            inputs,
            placements,
            outputs,
            assignment,
            cache,
            run_stats: RunStats::default(),
            segments,
            swappable: Vec::new(),
            swapped: Vec::new(),
            cpu_arena: false,
        })
    }

    /// How many segments the graph runs in (0: loaded whole).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Runs the segments in order, each loaded for its run and released after it.
    pub(super) fn run_segments(
        &mut self,
        inputs: Vec<(String, DynValue)>,
        wanted: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        let mut values: std::collections::HashMap<String, DynValue> = inputs.into_iter().collect();
        for segment in &mut self.segments {
            segment.ensure_loaded()?;
            let feeds = segment
                .inputs
                .iter()
                .map(|i| {
                    let value = values.get(&i.name).ok_or_else(|| {
                        Error::Runtime(format!(
                            "{}: no value for input '{}' (not fed, and no earlier segment \
                             computes it)",
                            segment.name, i.name
                        ))
                    })?;
                    Ok((i.name.as_str(), SessionInputValue::from(value)))
                })
                .chain(
                    segment
                        .swapped
                        .iter()
                        .map(|w| Ok((w.name.as_str(), SessionInputValue::from(&*w.value)))),
                )
                .collect::<Result<Vec<_>>>()?;
            let session = segment
                .session
                .as_mut()
                .ok_or_else(|| not_loaded(&segment.name))?;
            let mut outputs = session
                .run(feeds)
                .map_err(|e| rt_err(&format!("running {}", segment.name), e))?;
            let computed: Vec<(String, DynValue)> = segment
                .outputs
                .iter()
                .filter_map(|o| outputs.remove(&o.name).map(|v| (o.name.clone(), v)))
                .collect();
            drop(outputs);
            values.extend(computed);
            segment.release();
        }
        wanted
            .iter()
            .map(|w| {
                let value = values.get(*w).ok_or_else(|| {
                    Error::Runtime(format!("{} produced no output '{w}'", self.name))
                })?;
                read_output(&self.name, &self.outputs, w, value)
            })
            .collect()
    }
}
