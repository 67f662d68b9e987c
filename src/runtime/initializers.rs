//! Reading the weight table of an ONNX file without ONNX Runtime: initializer names, shapes,
//! element types and where their bytes live (inside the protobuf or in external data).
//!
//! Load-time LoRA needs the base weights by name and must supply replacements that ONNX
//! Runtime honours: replacements for *external* initializers are applied at full graph
//! optimisation, while names that do not exist are silently ignored by ONNX Runtime, so every
//! name is checked here first.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// ONNX `TensorProto.DataType` values tcd-ort reads.
const FLOAT: i32 = 1;
const FLOAT16: i32 = 10;

/// Where an initializer's bytes are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// `raw_data` inside the `.onnx` file, at this byte range.
    Embedded {
        /// Offset in the `.onnx` file.
        offset: u64,
        /// Length in bytes.
        length: u64,
    },
    /// External data file beside the `.onnx` file.
    External {
        /// The data file, inside the model's directory (checked when the table is read).
        file: PathBuf,
        /// Offset in that file.
        offset: u64,
        /// Length in bytes.
        length: u64,
    },
    /// Stored in a typed field (`float_data`...), which exporters use only for tiny tensors.
    Typed,
}

/// One initializer of a graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initializer {
    /// The name (for tcd-ort exports, the PyTorch parameter name).
    pub name: String,
    /// Shape.
    pub dims: Vec<usize>,
    /// ONNX element type code.
    pub data_type: i32,
    /// Where the bytes are.
    pub storage: Storage,
}

impl Initializer {
    /// Element count; `None` when the shape's product does not fit in `usize` (a crafted file).
    pub fn numel(&self) -> Option<usize> {
        self.dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// Whether ONNX Runtime accepts a replacement for it at full optimisation.
    pub fn is_external(&self) -> bool {
        matches!(self.storage, Storage::External { .. })
    }
}

/// The initializers of one `.onnx` file, by name.
#[derive(Debug, Clone)]
pub struct InitializerTable {
    model: PathBuf,
    by_name: HashMap<String, Initializer>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos)?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// Returns (field number, wire type).
    fn tag(&mut self) -> Option<(u64, u8)> {
        let tag = self.varint()?;
        Some((tag >> 3, (tag & 7) as u8))
    }

    fn bytes(&mut self) -> Option<(usize, &'a [u8])> {
        let len = usize::try_from(self.varint()?).ok()?;
        let start = self.pos;
        let end = start.checked_add(len)?;
        let slice = self.buf.get(start..end)?;
        self.pos = end;
        Some((start, slice))
    }

    fn skip(&mut self, wire: u8) -> Option<()> {
        match wire {
            0 => {
                self.varint()?;
            }
            1 => self.pos = self.pos.checked_add(8)?,
            2 => {
                self.bytes()?;
            }
            5 => self.pos = self.pos.checked_add(4)?,
            _ => return None,
        }
        (self.pos <= self.buf.len()).then_some(())
    }
}

fn malformed(path: &Path, what: &str) -> Error {
    Error::model(path, format!("not a valid ONNX file ({what})"))
}

/// Finds the length-delimited field `field` of a message and returns its (offset, bytes).
fn find_field(buf: &[u8], field: u64) -> Option<Option<(usize, &[u8])>> {
    let mut c = Cursor::new(buf);
    while !c.done() {
        let (f, wire) = c.tag()?;
        if f == field && wire == 2 {
            return Some(Some(c.bytes()?));
        }
        c.skip(wire)?;
    }
    Some(None)
}

/// The file an external `location` names, refused when it leaves the model's directory: an
/// absolute path, a `..`, or a symlink whose target lies outside both the directory and the
/// directory the `.onnx` file really is in (hub caches link every file to a blob beside the
/// others, which ONNX Runtime accepts too).
fn external_file(model: &Path, name: &str, location: &str) -> Result<PathBuf> {
    let escapes = || {
        Error::model(
            model,
            format!(
                "initializer '{name}' keeps its data at '{location}', which is outside the model's directory; refusing to read it"
            ),
        )
    };
    let relative = Path::new(location);
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if location.is_empty() || !plain {
        return Err(escapes());
    }
    let dir = match model.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file = dir.join(relative);
    // A file that does not exist yet is refused later, by the read, with its own message.
    if let Ok(real) = file.canonicalize() {
        let inside = |d: Option<PathBuf>| d.is_some_and(|d| real.starts_with(d));
        let real_model_dir = model
            .canonicalize()
            .ok()
            .and_then(|m| m.parent().map(Path::to_path_buf));
        if !inside(dir.canonicalize().ok()) && !inside(real_model_dir) {
            return Err(escapes());
        }
    }
    Ok(file)
}

fn parse_tensor(buf: &[u8], base_offset: usize) -> Option<Initializer> {
    let mut c = Cursor::new(buf);
    let mut name = String::new();
    let mut dims = Vec::new();
    let mut data_type = 0i32;
    let mut raw: Option<(usize, usize)> = None;
    let mut external: HashMap<String, String> = HashMap::new();
    let mut data_location = 0u64;
    while !c.done() {
        let (field, wire) = c.tag()?;
        match (field, wire) {
            (1, 0) => dims.push(usize::try_from(c.varint()?).ok()?),
            (1, 2) => {
                let (_, packed) = c.bytes()?;
                let mut p = Cursor::new(packed);
                while !p.done() {
                    dims.push(usize::try_from(p.varint()?).ok()?);
                }
            }
            (2, 0) => data_type = i32::try_from(c.varint()?).ok()?,
            (8, 2) => name = String::from_utf8(c.bytes()?.1.to_vec()).ok()?,
            (9, 2) => {
                let (start, bytes) = c.bytes()?;
                raw = Some((base_offset + start, bytes.len()));
            }
            (13, 2) => {
                let (_, entry) = c.bytes()?;
                let mut e = Cursor::new(entry);
                let (mut key, mut value) = (String::new(), String::new());
                while !e.done() {
                    let (f, w) = e.tag()?;
                    match (f, w) {
                        (1, 2) => key = String::from_utf8(e.bytes()?.1.to_vec()).ok()?,
                        (2, 2) => value = String::from_utf8(e.bytes()?.1.to_vec()).ok()?,
                        _ => e.skip(w)?,
                    }
                }
                external.insert(key, value);
            }
            (14, 0) => data_location = c.varint()?,
            _ => c.skip(wire)?,
        }
    }
    let storage = if data_location == 1 {
        let location = external.get("location")?;
        let offset = external
            .get("offset")
            .map(|o| o.parse::<u64>())
            .transpose()
            .ok()?
            .unwrap_or(0);
        let length = match external.get("length") {
            Some(l) => l.parse::<u64>().ok()?,
            None => 0,
        };
        // Kept as written; `InitializerTable::read` resolves and checks it.
        Storage::External {
            file: PathBuf::from(location),
            offset,
            length,
        }
    } else if let Some((offset, length)) = raw {
        Storage::Embedded {
            offset: offset as u64,
            length: length as u64,
        }
    } else {
        Storage::Typed
    };
    Some(Initializer {
        name,
        dims,
        data_type,
        storage,
    })
}

impl InitializerTable {
    /// Reads the initializer table of `model` (the graph proto only; weights stay on disk).
    pub fn read(model: &Path) -> Result<Self> {
        let bytes = std::fs::read(model).map_err(|e| Error::io(model, e))?;
        let (graph_offset, graph) = find_field(&bytes, 7)
            .ok_or_else(|| malformed(model, "unreadable ModelProto"))?
            .ok_or_else(|| malformed(model, "no graph"))?;
        let mut by_name = HashMap::new();
        let mut c = Cursor::new(graph);
        while !c.done() {
            let (field, wire) = c
                .tag()
                .ok_or_else(|| malformed(model, "unreadable GraphProto"))?;
            if field == 5 && wire == 2 {
                let (start, tensor) = c
                    .bytes()
                    .ok_or_else(|| malformed(model, "truncated initializer"))?;
                let mut init = parse_tensor(tensor, graph_offset + start)
                    .ok_or_else(|| malformed(model, "unreadable initializer"))?;
                if let Storage::External { file, .. } = &mut init.storage {
                    let location = file.to_string_lossy().into_owned();
                    *file = external_file(model, &init.name, &location)?;
                }
                by_name.insert(init.name.clone(), init);
            } else {
                c.skip(wire)
                    .ok_or_else(|| malformed(model, "unreadable GraphProto"))?;
            }
        }
        Ok(InitializerTable {
            model: model.to_path_buf(),
            by_name,
        })
    }

    /// The `.onnx` file.
    pub fn model(&self) -> &Path {
        &self.model
    }

    /// The initializer called `name`.
    pub fn get(&self, name: &str) -> Option<&Initializer> {
        self.by_name.get(name)
    }

    /// Number of initializers.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether the graph has no initializers.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// All names (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Reads an initializer's values as f32 (float32 or float16 storage).
    pub fn read_f32(&self, init: &Initializer) -> Result<Vec<f32>> {
        let (file, offset, length) = match &init.storage {
            Storage::Embedded { offset, length } => (self.model.clone(), *offset, *length),
            Storage::External {
                file,
                offset,
                length,
            } => (file.clone(), *offset, *length),
            Storage::Typed => {
                return Err(Error::model(
                    &self.model,
                    format!(
                        "initializer '{}' is stored in a typed field; re-export with external data",
                        init.name
                    ),
                ))
            }
        };
        let elem = match init.data_type {
            FLOAT => 4,
            FLOAT16 => 2,
            other => {
                return Err(Error::model(
                    &self.model,
                    format!(
                        "initializer '{}' has ONNX element type {other}; only float32 and float16 weights can be patched",
                        init.name
                    ),
                ))
            }
        };
        let numel = init.numel();
        let expected = numel
            .and_then(|n| n.checked_mul(elem))
            .and_then(|b| u64::try_from(b).ok());
        let length = if length == 0 {
            expected.unwrap_or(0)
        } else {
            length
        };
        let (Some(numel), Some(expected)) = (numel, expected.filter(|&e| e == length)) else {
            return Err(Error::model(
                &self.model,
                format!(
                    "initializer '{}' holds {length} bytes, which does not fit its shape {:?}",
                    init.name, init.dims
                ),
            ));
        };
        let mut f = File::open(&file).map_err(|e| Error::io(&file, e))?;
        let truncated = |why: String| {
            Error::model(
                &file,
                format!(
                    "initializer '{}' runs past the end of the file: {why}",
                    init.name
                ),
            )
        };
        // The file must hold the bytes before anything that size is allocated.
        let file_len = f.metadata().map_err(|e| Error::io(&file, e))?.len();
        if offset
            .checked_add(expected)
            .is_none_or(|end| end > file_len)
        {
            return Err(truncated(format!(
                "{expected} bytes at offset {offset} of {file_len}"
            )));
        }
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io(&file, e))?;
        let truncated = |e: std::io::Error| truncated(e.to_string());
        if elem == 4 && cfg!(target_endian = "little") {
            // Read straight into the f32 buffer: no second copy of multi-gigabyte UNets.
            let mut values = vec![0f32; numel];
            // SAFETY: the byte view covers exactly the vector's initialised f32 storage; u8 has
            // alignment 1 and every bit pattern is a valid f32, so any bytes read are sound.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), values.len() * 4)
            };
            f.read_exact(bytes).map_err(truncated)?;
            return Ok(values);
        }
        let mut buf = vec![0u8; numel * elem];
        f.read_exact(&mut buf).map_err(truncated)?;
        Ok(if elem == 4 {
            buf.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        } else {
            buf.chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect()
        })
    }
}

/// One dimension of a graph input as the ONNX file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeclaredDim {
    /// A fixed size.
    Fixed(i64),
    /// A named dynamic size (`batch`, `height`, ...).
    Named(String),
    /// A dynamic size without a name.
    Unknown,
}

/// A graph input as the ONNX file declares it, read without ONNX Runtime (TensorRT profiles
/// must be given before the session exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredInput {
    /// The input name.
    pub name: String,
    /// Its dimensions; empty for scalars.
    pub dims: Vec<DeclaredDim>,
}

fn parse_string(c: &mut Cursor<'_>) -> Option<String> {
    String::from_utf8(c.bytes()?.1.to_vec()).ok()
}

fn parse_dim(buf: &[u8]) -> Option<DeclaredDim> {
    let mut c = Cursor::new(buf);
    let mut dim = DeclaredDim::Unknown;
    while !c.done() {
        let (field, wire) = c.tag()?;
        match (field, wire) {
            (1, 0) => dim = DeclaredDim::Fixed(c.varint()? as i64),
            (2, 2) => dim = DeclaredDim::Named(parse_string(&mut c)?),
            _ => c.skip(wire)?,
        }
    }
    Some(dim)
}

fn parse_value_info(buf: &[u8]) -> Option<DeclaredInput> {
    let mut c = Cursor::new(buf);
    let mut input = DeclaredInput {
        name: String::new(),
        dims: Vec::new(),
    };
    while !c.done() {
        let (field, wire) = c.tag()?;
        match (field, wire) {
            (1, 2) => input.name = parse_string(&mut c)?,
            // TypeProto.tensor_type (1) -> TypeProto.Tensor.shape (2) -> TensorShapeProto.dim (1)
            (2, 2) => {
                let (_, ty) = c.bytes()?;
                if let Some((_, tensor)) = find_field(ty, 1)? {
                    if let Some((_, shape)) = find_field(tensor, 2)? {
                        let mut s = Cursor::new(shape);
                        while !s.done() {
                            let (f, w) = s.tag()?;
                            if f == 1 && w == 2 {
                                input.dims.push(parse_dim(s.bytes()?.1)?);
                            } else {
                                s.skip(w)?;
                            }
                        }
                    }
                }
            }
            _ => c.skip(wire)?,
        }
    }
    Some(input)
}

/// Reads the declared inputs of `model` (initializers listed as inputs by old exporters
/// excluded).
pub fn declared_inputs(model: &Path) -> Result<Vec<DeclaredInput>> {
    let bytes = std::fs::read(model).map_err(|e| Error::io(model, e))?;
    let (_, graph) = find_field(&bytes, 7)
        .ok_or_else(|| malformed(model, "unreadable ModelProto"))?
        .ok_or_else(|| malformed(model, "no graph"))?;
    let mut inputs = Vec::new();
    let mut initializer_names = std::collections::HashSet::new();
    let mut c = Cursor::new(graph);
    while !c.done() {
        let (field, wire) = c
            .tag()
            .ok_or_else(|| malformed(model, "unreadable GraphProto"))?;
        match (field, wire) {
            (11, 2) => {
                let (_, info) = c
                    .bytes()
                    .ok_or_else(|| malformed(model, "truncated graph input"))?;
                inputs.push(
                    parse_value_info(info).ok_or_else(|| malformed(model, "unreadable input"))?,
                );
            }
            (5, 2) => {
                let (_, tensor) = c
                    .bytes()
                    .ok_or_else(|| malformed(model, "truncated initializer"))?;
                let mut t = Cursor::new(tensor);
                while !t.done() {
                    let Some((f, w)) = t.tag() else { break };
                    if f == 8 && w == 2 {
                        if let Some(name) = parse_string(&mut t) {
                            initializer_names.insert(name);
                        }
                        break;
                    }
                    if t.skip(w).is_none() {
                        break;
                    }
                }
            }
            _ => c
                .skip(wire)
                .ok_or_else(|| malformed(model, "unreadable GraphProto"))?,
        }
    }
    inputs.retain(|i| !initializer_names.contains(&i.name));
    Ok(inputs)
}

/// IEEE half to single precision.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let shift = m.leading_zeros() - 21;
            let m = (m << shift) & 0x3ff;
            sign | ((113 - shift) << 23) | (m << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_converts() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("tcd-ort-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("bad.onnx");
        std::fs::write(&path, b"\xff\xff\xff\xff\xff").expect("write");
        let err = InitializerTable::read(&path).expect_err("garbage");
        assert!(err.to_string().contains("not a valid ONNX file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
