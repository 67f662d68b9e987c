//! Provider options and session start-up options, with the defaults tcd-ort uses.
//!
//! Every option is an enum or a number, never a free-form string: the CLI and the C ABI parse
//! user text with the `FromStr` impls here, so a bad value is one clear error wherever it
//! comes from.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::{Error, Result};

/// Parses one of `names` (case-insensitive) into its value, or explains what was expected.
fn parse_named<T: Copy>(what: &str, s: &str, names: &[(&str, T)]) -> Result<T> {
    let wanted = s.trim().to_ascii_lowercase();
    names
        .iter()
        .find(|(n, _)| *n == wanted)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            Error::invalid(format!(
                "unknown {what} '{s}'; expected one of: {}",
                names.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))
        })
}

macro_rules! named_enum {
    ($ty:ident, $what:literal, [$(($variant:ident, $name:literal)),+ $(,)?]) => {
        impl $ty {
            /// Every value with its command-line name.
            pub const NAMES: &'static [(&'static str, $ty)] = &[$(($name, $ty::$variant)),+];

            /// The command-line name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                parse_named($what, s, Self::NAMES)
            }
        }
    };
}

/// ONNX Runtime's graph optimisation level (`--opt-level`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum OptLevel {
    /// No graph optimisation.
    Disable,
    /// Semantics-preserving rewrites that are hardware-neutral (constant folding, redundant
    /// node removal).
    Basic,
    /// Basic plus fusions for the registered providers (GELU, layer norm, attention).
    Extended,
    /// Extended plus layout optimisations specific to this machine (NCHWc on CPU). ONNX
    /// Runtime's default.
    All,
    /// tcd-ort's default: `all` for the VAE's graphs, `extended` for every other graph (see
    /// [`OptLevel::for_graph`]).
    #[default]
    Auto,
}

named_enum!(
    OptLevel,
    "optimisation level",
    [
        (Disable, "disable"),
        (Basic, "basic"),
        (Extended, "extended"),
        (All, "all"),
        (Auto, "auto")
    ]
);

impl OptLevel {
    /// The level a graph is built at: `self`, or for [`OptLevel::Auto`] the level chosen for
    /// the graph named `graph` (`unet`, `vae_decoder`, ...).
    ///
    /// `all` adds the CPU's blocked convolution layout (NCHWc) to `extended`. Measured on
    /// full-size SD1.5 (512x512, this 2-core CPU, `benches/README.md`): rewriting the UNet's
    /// convolutions took 3.9 of the UNet's 5.5 s of session start and made no step faster;
    /// the VAE decoder's start grew by 0.2 s and its decode got 0.35 s (5%) faster. So the
    /// VAE's graphs are built at `all` and everything else (UNet, ControlNets, text encoders,
    /// image encoders, depth estimator) at `extended`.
    pub fn for_graph(self, graph: &str) -> OptLevel {
        match self {
            OptLevel::Auto if graph.starts_with("vae_") => OptLevel::All,
            OptLevel::Auto => OptLevel::Extended,
            level => level,
        }
    }
}

/// How cuDNN picks convolution algorithms (`--cuda-cudnn-search`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum CudnnConvSearch {
    /// Benchmark every algorithm on first use of each shape: fastest steady state, but the
    /// first step at every new size pays seconds of search (ONNX Runtime's default).
    Exhaustive,
    /// cuDNN's heuristics: no benchmarking, near-exhaustive speed for SD convolutions. tcd-ort's
    /// default, since a CLI run is only a handful of UNet steps.
    #[default]
    Heuristic,
    /// cuDNN's default algorithm, no search at all.
    Default,
}

named_enum!(
    CudnnConvSearch,
    "cuDNN convolution search",
    [
        (Exhaustive, "exhaustive"),
        (Heuristic, "heuristic"),
        (Default, "default")
    ]
);

/// How the CUDA memory arena grows (`--cuda-arena-extend`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ArenaExtendStrategy {
    /// Grow in powers of two (ONNX Runtime's default): fewer allocations, but up to twice the
    /// memory a multi-gigabyte UNet needs.
    NextPowerOfTwo,
    /// Grow by exactly what is requested. tcd-ort's default: SD graphs allocate a few large
    /// blocks once, so tight growth saves memory at no measurable cost.
    #[default]
    SameAsRequested,
}

named_enum!(
    ArenaExtendStrategy,
    "arena extend strategy",
    [
        (NextPowerOfTwo, "next-power-of-two"),
        (SameAsRequested, "same-as-requested")
    ]
);

/// Which Apple compute units CoreML may use (`--coreml-units`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum CoreMlComputeUnits {
    /// CPU, GPU and Neural Engine (CoreML's default).
    #[default]
    All,
    /// CPU and Neural Engine.
    CpuAndNeuralEngine,
    /// CPU and GPU.
    CpuAndGpu,
    /// CPU only.
    CpuOnly,
}

named_enum!(
    CoreMlComputeUnits,
    "CoreML compute units",
    [
        (All, "all"),
        (CpuAndNeuralEngine, "cpu-and-neural-engine"),
        (CpuAndGpu, "cpu-and-gpu"),
        (CpuOnly, "cpu-only")
    ]
);

/// CUDA execution provider settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CudaOptions {
    /// cuDNN convolution algorithm search.
    pub cudnn_conv_search: CudnnConvSearch,
    /// Memory arena growth.
    pub arena_extend: ArenaExtendStrategy,
    /// Cap on the arena, in bytes; `None` lets it use the whole device.
    pub gpu_mem_limit: Option<u64>,
}

/// The one size and batch a session is built for ([`super::SessionOptions::fixed_shape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FixedShape {
    /// Output size in pixels and the graph's batch.
    pub dims: ShapeDims,
    /// Pixels per latent along each axis: the VAE's scale factor (8 for released models).
    pub latent_factor: usize,
}

/// Image size and graph batch for one corner of a TensorRT optimisation profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShapeDims {
    /// Image width in pixels (a multiple of 8).
    pub width: usize,
    /// Image height in pixels (a multiple of 8).
    pub height: usize,
    /// Batch the graphs see: images per prompt, doubled by classifier-free guidance.
    pub batch: usize,
}

impl FromStr for ShapeDims {
    type Err = Error;

    /// `WIDTHxHEIGHTxBATCH`, e.g. `512x512x2`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(format!(
                "bad TensorRT profile size '{s}': expected WIDTHxHEIGHTxBATCH such as 512x512x1"
            ))
        };
        let parts: Vec<&str> = s.trim().split(['x', 'X']).collect();
        let [w, h, b] = parts.as_slice() else {
            return Err(bad());
        };
        let num = |p: &str| p.trim().parse::<usize>().map_err(|_| bad());
        let dims = ShapeDims {
            width: num(w)?,
            height: num(h)?,
            batch: num(b)?,
        };
        if dims.width == 0
            || dims.height == 0
            || !dims.width.is_multiple_of(8)
            || !dims.height.is_multiple_of(8)
        {
            return Err(Error::invalid(format!(
                "bad TensorRT profile size '{s}': width and height must be positive multiples of 8"
            )));
        }
        if dims.batch == 0 {
            return Err(Error::invalid(format!(
                "bad TensorRT profile size '{s}': the batch must be at least 1"
            )));
        }
        Ok(dims)
    }
}

impl fmt::Display for ShapeDims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.width, self.height, self.batch)
    }
}

/// A TensorRT optimisation profile: the smallest, typical and largest shapes the engine
/// serves. TensorRT builds one engine per profile and caches it, so a profile that covers later
/// requests avoids minutes of rebuilding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TrtProfile {
    /// Smallest shapes.
    pub min: ShapeDims,
    /// Shapes the engine is tuned for.
    pub opt: ShapeDims,
    /// Largest shapes.
    pub max: ShapeDims,
}

impl TrtProfile {
    /// The profile for one request: the requested image size (fixed, which gives TensorRT's
    /// fastest engine), batch from 1 up to `num_images`, doubled with classifier-free guidance.
    pub fn for_request(
        width: usize,
        height: usize,
        num_images: usize,
        guidance: bool,
    ) -> Result<Self> {
        let batch = num_images.max(1) * if guidance { 2 } else { 1 };
        let opt: ShapeDims = format!("{width}x{height}x{batch}").parse()?;
        TrtProfile {
            min: ShapeDims { batch: 1, ..opt },
            opt,
            max: opt,
        }
        .validated()
    }

    fn validated(self) -> Result<Self> {
        let le = |a: &ShapeDims, b: &ShapeDims| {
            a.width <= b.width && a.height <= b.height && a.batch <= b.batch
        };
        if !le(&self.min, &self.opt) || !le(&self.opt, &self.max) {
            return Err(Error::invalid(format!(
                "bad TensorRT profile {self}: every dimension must satisfy min <= opt <= max"
            )));
        }
        Ok(self)
    }
}

impl FromStr for TrtProfile {
    type Err = Error;

    /// `WxHxB` (min = opt = max) or `MIN:OPT:MAX`, each `WxHxB`.
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            [one] => {
                let d: ShapeDims = one.parse()?;
                Ok(TrtProfile {
                    min: d,
                    opt: d,
                    max: d,
                })
            }
            [min, opt, max] => TrtProfile {
                min: min.parse()?,
                opt: opt.parse()?,
                max: max.parse()?,
            }
            .validated(),
            _ => Err(Error::invalid(format!(
                "bad TensorRT profile '{s}': expected WxHxB or MIN:OPT:MAX such as \
                 512x512x1:768x768x1:1024x1024x2"
            ))),
        }
    }
}

impl fmt::Display for TrtProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.min, self.opt, self.max)
    }
}

/// TensorRT execution provider settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRtOptions {
    /// Build fp16 engines (default on: SD runs in half precision on every GPU TensorRT supports,
    /// with fp32 accumulation where TensorRT sees fit).
    pub fp16: bool,
    /// Where engines and the timing cache are stored; `None` uses
    /// `<user cache dir>/tcd-ort/tensorrt` (see [`user_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// The optimisation profile; `None` uses the model's native size at batch 1 to 2.
    pub profile: Option<TrtProfile>,
}

impl Default for TensorRtOptions {
    fn default() -> Self {
        TensorRtOptions {
            fp16: true,
            cache_dir: None,
            profile: None,
        }
    }
}

impl TensorRtOptions {
    /// The engine and timing cache directory in effect.
    pub fn resolved_cache_dir(&self) -> Result<PathBuf> {
        match &self.cache_dir {
            Some(dir) => Ok(dir.clone()),
            None => Ok(tcd_cache_dir()?.join("tensorrt")),
        }
    }
}

/// CoreML execution provider settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CoreMlOptions {
    /// Compute units. The model is always converted to the ML Program format, which Apple and
    /// ONNX Runtime recommend for anything newer than macOS 12 (NeuralNetwork lacks fp16 and
    /// many operators SD uses).
    pub compute_units: CoreMlComputeUnits,
}

/// Settings of every execution provider; those of providers not registered are ignored.
///
/// DirectML has no settings here: its sessions always run with memory patterns off and
/// sequential execution, as the DirectML provider requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderOptions {
    /// GPU ordinal for CUDA, TensorRT and DirectML.
    pub device_id: i32,
    /// ONNX Runtime's memory arena for the CPU provider (`--cpu-arena`). Off by default: on a
    /// full-size SD1.5 job it made generation ~11% faster (fewer page faults) but raised peak
    /// memory from 5.8 to 8.3 GiB (`benches/README.md`). `None` leaves the choice to the
    /// engine, which decides from the model and the release mode
    /// (`pipeline::EngineOptions::one_shot`); sessions built directly treat it as off.
    pub cpu_arena: Option<bool>,
    /// CUDA settings (also used by TensorRT for the nodes it leaves to CUDA).
    pub cuda: CudaOptions,
    /// TensorRT settings.
    pub tensorrt: TensorRtOptions,
    /// CoreML settings.
    pub coreml: CoreMlOptions,
}

impl Default for ProviderOptions {
    fn default() -> Self {
        ProviderOptions {
            device_id: 0,
            cpu_arena: Some(false),
            cuda: CudaOptions::default(),
            tensorrt: TensorRtOptions::default(),
            coreml: CoreMlOptions::default(),
        }
    }
}

/// The optimised-model cache (`--session-cache`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SessionCache {
    /// Every start optimises the graphs again (the library's default: it writes nothing to
    /// disk unasked).
    #[default]
    Off,
    /// Optimised graphs are kept in this directory (see [`super::cache`] for what keys them).
    Dir(PathBuf),
}

impl SessionCache {
    /// The default directory: `<user cache dir>/tcd-ort/sessions`.
    pub fn default_dir() -> Result<PathBuf> {
        Ok(tcd_cache_dir()?.join("sessions"))
    }
}

impl FromStr for SessionCache {
    type Err = Error;

    /// `off`, `auto` (the default directory) or a directory.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "" => Err(Error::invalid(
                "empty session cache: pass a directory, 'auto' or 'off'",
            )),
            "off" => Ok(SessionCache::Off),
            "auto" => Ok(SessionCache::Dir(SessionCache::default_dir()?)),
            dir => Ok(SessionCache::Dir(PathBuf::from(dir))),
        }
    }
}

/// The user's cache directory: `$XDG_CACHE_HOME`, else `~/Library/Caches` on macOS,
/// `%LOCALAPPDATA%` on Windows and `~/.cache` elsewhere.
pub fn user_cache_dir() -> Option<PathBuf> {
    let nonempty = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
    if let Some(dir) = nonempty("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir));
    }
    if cfg!(windows) {
        return nonempty("LOCALAPPDATA").map(PathBuf::from);
    }
    let home = PathBuf::from(nonempty("HOME")?);
    Some(if cfg!(target_os = "macos") {
        home.join("Library").join("Caches")
    } else {
        home.join(".cache")
    })
}

fn tcd_cache_dir() -> Result<PathBuf> {
    user_cache_dir().map(|d| d.join("tcd-ort")).ok_or_else(|| {
        Error::invalid(
            "no user cache directory (neither XDG_CACHE_HOME nor HOME is set); pass a cache \
             directory explicitly",
        )
    })
}

/// Parses a byte count: a plain number or one with a `K`, `M`, `G` or `T` suffix (powers of
/// 1024, an optional trailing `B` or `iB`), e.g. `6G`, `512MiB`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let bad = || {
        Error::invalid(format!(
            "bad memory size '{s}': expected a number of bytes with an optional K/M/G/T suffix, \
             such as 6G"
        ))
    };
    let upper = s.trim().to_ascii_uppercase();
    let t = upper.as_str();
    let t = t
        .strip_suffix("IB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(Error::invalid(format!(
            "bad memory size '{s}': must be more than 0"
        )));
    }
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_builds_the_vae_at_all_and_the_rest_at_extended() {
        assert_eq!(OptLevel::default(), OptLevel::Auto);
        assert_eq!("auto".parse::<OptLevel>().ok(), Some(OptLevel::Auto));
        for graph in ["vae_decoder", "vae_encoder"] {
            assert_eq!(OptLevel::Auto.for_graph(graph), OptLevel::All, "{graph}");
        }
        for graph in [
            "unet",
            "unet-segment-1",
            "text_encoder_2",
            "controlnet_0",
            "depth",
        ] {
            assert_eq!(
                OptLevel::Auto.for_graph(graph),
                OptLevel::Extended,
                "{graph}"
            );
        }
        // An explicit level is every graph's.
        assert_eq!(OptLevel::All.for_graph("unet"), OptLevel::All);
        assert_eq!(OptLevel::Basic.for_graph("vae_decoder"), OptLevel::Basic);
    }

    #[test]
    fn parses_enums_and_rejects_unknown_values() {
        assert_eq!(
            "Extended".parse::<OptLevel>().ok(),
            Some(OptLevel::Extended)
        );
        assert_eq!(
            "same-as-requested".parse::<ArenaExtendStrategy>().ok(),
            Some(ArenaExtendStrategy::SameAsRequested)
        );
        assert_eq!(
            "exhaustive".parse::<CudnnConvSearch>().ok(),
            Some(CudnnConvSearch::Exhaustive)
        );
        let err = "fast".parse::<OptLevel>().expect_err("unknown level");
        assert!(
            err.to_string().contains("disable, basic, extended, all"),
            "{err}"
        );
        assert!("cpu-and-gpu".parse::<CoreMlComputeUnits>().is_ok());
        assert!("gpu".parse::<CoreMlComputeUnits>().is_err());
    }

    #[test]
    fn serde_names_match_the_command_line_names() {
        for (name, level) in OptLevel::NAMES {
            assert_eq!(
                serde_json::to_string(level).ok(),
                Some(format!("\"{name}\""))
            );
        }
        for (name, s) in ArenaExtendStrategy::NAMES {
            assert_eq!(serde_json::to_string(s).ok(), Some(format!("\"{name}\"")));
        }
        for (name, s) in CoreMlComputeUnits::NAMES {
            assert_eq!(serde_json::to_string(s).ok(), Some(format!("\"{name}\"")));
        }
    }

    #[test]
    fn parses_memory_sizes() {
        assert_eq!(parse_bytes("1024").ok(), Some(1024));
        assert_eq!(parse_bytes("6G").ok(), Some(6 << 30));
        assert_eq!(parse_bytes("512MiB").ok(), Some(512 << 20));
        assert_eq!(parse_bytes("2kb").ok(), Some(2048));
        for bad in ["", "G", "-1G", "1.5G", "0", "99999999999T"] {
            assert!(parse_bytes(bad).is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn parses_trt_profiles() {
        let p: TrtProfile = "512x768x2".parse().expect("one size");
        assert_eq!(p.min, p.max);
        assert_eq!(p.opt.height, 768);
        let p: TrtProfile = "256x256x1:512x512x1:1024x1024x2".parse().expect("range");
        assert_eq!(p.max.batch, 2);
        for bad in [
            "512x512",
            "512x500x1",
            "512x512x0",
            "1024x1024x1:512x512x1:768x768x1",
            "a:b",
        ] {
            assert!(bad.parse::<TrtProfile>().is_err(), "{bad} must be rejected");
        }
        let r = TrtProfile::for_request(512, 512, 2, true).expect("valid");
        assert_eq!((r.min.batch, r.opt.batch, r.max.batch), (1, 4, 4));
        assert!(TrtProfile::for_request(500, 512, 1, false).is_err());
    }

    #[test]
    fn session_cache_values() {
        assert_eq!("off".parse::<SessionCache>().ok(), Some(SessionCache::Off));
        assert_eq!(
            "/tmp/x".parse::<SessionCache>().ok(),
            Some(SessionCache::Dir(PathBuf::from("/tmp/x")))
        );
        assert!("".parse::<SessionCache>().is_err());
    }
}
