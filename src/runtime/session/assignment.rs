//! Which execution provider runs how many of a graph's nodes, as ONNX Runtime records it.

use ort::session::Session;
use ort::AsPointer;

use super::rt_err;
use crate::Result;

/// How many nodes of a graph one execution provider runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderAssignment {
    /// ONNX Runtime's provider name (`CUDAExecutionProvider`).
    pub provider: String,
    /// Nodes assigned to it (after fusion).
    pub nodes: usize,
}

/// Reads ONNX Runtime's record of which provider runs which nodes.
pub(super) fn assignment(session: &Session) -> Result<Vec<ProviderAssignment>> {
    let api = ort::api();
    let mut subgraphs: *const *const ort::sys::OrtEpAssignedSubgraph = std::ptr::null();
    let mut count = 0usize;
    // SAFETY: the session pointer is live for the call; ONNX Runtime fills the out-pointers with
    // an array owned by the session, valid while it lives.
    unsafe {
        ort::Error::result_from_status((api.Session_GetEpGraphAssignmentInfo)(
            session.ptr(),
            &mut subgraphs,
            &mut count,
        ))
    }
    .map_err(|e| rt_err("reading provider assignment", e))?;
    if subgraphs.is_null() || count == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: ONNX Runtime returned `count` valid subgraph pointers at `subgraphs`.
    let subgraphs = unsafe { std::slice::from_raw_parts(subgraphs, count) };
    let mut totals: Vec<ProviderAssignment> = Vec::new();
    for &subgraph in subgraphs {
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut nodes: *const *const ort::sys::OrtEpAssignedNode = std::ptr::null();
        let mut n = 0usize;
        // SAFETY: `subgraph` came from the session above; the out-pointers are valid.
        unsafe {
            ort::Error::result_from_status((api.EpAssignedSubgraph_GetEpName)(subgraph, &mut name))
                .and_then(|()| {
                    ort::Error::result_from_status((api.EpAssignedSubgraph_GetNodes)(
                        subgraph, &mut nodes, &mut n,
                    ))
                })
        }
        .map_err(|e| rt_err("reading provider assignment", e))?;
        if name.is_null() {
            continue;
        }
        // SAFETY: ONNX Runtime returns a NUL-terminated string owned by the session.
        let provider = unsafe { std::ffi::CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        tally(&mut totals, &provider, n);
    }
    totals.sort_by_key(|t| std::cmp::Reverse(t.nodes));
    Ok(totals)
}

/// Adds `nodes` to `provider`'s count in `totals`.
pub(super) fn tally(totals: &mut Vec<ProviderAssignment>, provider: &str, nodes: usize) {
    match totals.iter_mut().find(|t| t.provider == provider) {
        Some(t) => t.nodes += nodes,
        None => totals.push(ProviderAssignment {
            provider: provider.to_string(),
            nodes,
        }),
    }
}
