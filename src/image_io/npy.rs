//! NumPy `.npy` files of float32 arrays (latents, test references), through `ndarray-npy`.

use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::npy::header::Header;
use ndarray_npy::{ReadNpyExt, WriteNpyError, WriteNpyExt};

use super::PendingFile;
use crate::{Error, Result};

/// Writes a float32 array as a NumPy `.npy` file (format 1.0, little-endian, C order),
/// atomically (see [`PendingFile`]).
pub fn write_npy(path: &Path, array: &ArrayD<f32>, overwrite: bool) -> Result<()> {
    stage_npy(path, array, overwrite)?.commit()
}

/// Writes `array` as [`write_npy`] does into a temporary beside `path`, to be committed with
/// the other outputs of the same run.
pub fn stage_npy(path: &Path, array: &ArrayD<f32>, overwrite: bool) -> Result<PendingFile> {
    PendingFile::write(path, overwrite, |file| {
        // A standard-layout copy when needed, so the file is always in C order.
        array
            .as_standard_layout()
            .write_npy(file)
            .map_err(|e| match e {
                WriteNpyError::Io(e) => Error::io(path, e),
                other => Error::Image {
                    path: path.to_path_buf(),
                    message: format!("cannot write a .npy file: {other}"),
                },
            })
    })
}

/// Reads a float32 `.npy` file (what `write_npy` and NumPy write).
pub fn read_npy(path: &Path) -> Result<ArrayD<f32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_npy(path, &bytes)
}

/// Parses the bytes of a float32 `.npy` file; `path` is only used in messages.
///
/// `ndarray-npy` allocates what the header announces (the header itself, then the array)
/// before reading it, so a few crafted bytes could ask for terabytes: both sizes are checked
/// against the bytes really there first.
#[doc(hidden)]
pub fn parse_npy(path: &Path, bytes: &[u8]) -> Result<ArrayD<f32>> {
    let bad = |why: String| Error::Image {
        path: path.to_path_buf(),
        message: format!("not a float32 .npy file: {why}"),
    };
    // Magic (6 bytes), version (2), then the header's length: u16 in format 1, u32 after.
    let (len_bytes, header_len) = match bytes.get(6) {
        Some(1) => (
            2,
            bytes
                .get(8..10)
                .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]))),
        ),
        Some(2 | 3) => (
            4,
            bytes
                .get(8..12)
                .and_then(|b| usize::try_from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok()),
        ),
        _ => (0, None),
    };
    let mut rest = match header_len.and_then(|h| h.checked_add(8 + len_bytes)) {
        Some(end) if end <= bytes.len() => bytes,
        Some(_) => return Err(bad("the header runs past the end of the file".into())),
        // Not a known format: let the reader name what is wrong.
        None => bytes,
    };
    let header = Header::from_reader(&mut rest).map_err(|e| bad(e.to_string()))?;
    let data_len = header
        .shape
        .iter()
        .try_fold(4usize, |n, &d| n.checked_mul(d));
    if data_len != Some(rest.len()) {
        return Err(bad(format!(
            "its shape {:?} of float32 needs {} bytes but the file holds {}",
            header.shape,
            data_len.map_or_else(|| "more than addressable".to_string(), |n| n.to_string()),
            rest.len()
        )));
    }
    ArrayD::<f32>::read_npy(bytes).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trips() {
        let dir = std::env::temp_dir().join(format!("tcd-ort-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("a.npy");
        let a = ArrayD::from_shape_vec(vec![1, 2, 3], vec![0.5, -1.0, 2.0, 3.0, 4.0, 5.0])
            .expect("shape");
        write_npy(&path, &a, true).expect("write");
        assert_eq!(read_npy(&path).expect("read"), a);
        let err = write_npy(&path, &a, false).expect_err("exists");
        assert!(err.to_string().contains("--overwrite"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn npy_files_are_numpy_format_1_in_c_order() {
        let dir = std::env::temp_dir().join(format!("tcd-ort-npy-bytes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for shape in [vec![3], vec![1, 2, 3]] {
            let path = dir.join("b.npy");
            let n = shape.iter().product::<usize>();
            let values: Vec<f32> = (0..n).map(|i| i as f32 - 1.5).collect();
            let a = ArrayD::from_shape_vec(shape.clone(), values.clone()).expect("shape");
            // An array in Fortran order is written in C order too.
            let fortran = a.t().as_standard_layout().t().to_owned();
            assert_eq!(fortran, a);
            write_npy(&path, &fortran, true).expect("write");
            // Format 1.0 as `numpy.load` reads it: a dict padded with spaces to a multiple of 64
            // bytes (`numpy.save` spells the dict with a trailing `, `; both are valid).
            let dims = shape.iter().map(usize::to_string).collect::<Vec<_>>();
            let dims = match dims.len() {
                1 => format!("({},)", dims[0]),
                _ => format!("({})", dims.join(", ")),
            };
            let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}}}");
            header.push_str(&" ".repeat((64 - (10 + header.len() + 1) % 64) % 64));
            header.push('\n');
            let mut expected = b"\x93NUMPY\x01\x00".to_vec();
            expected.extend((header.len() as u16).to_le_bytes());
            expected.extend(header.as_bytes());
            expected.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            assert_eq!(std::fs::read(&path).expect("read"), expected);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
