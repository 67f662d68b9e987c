//! The one error type of the library.
//!
//! Every message is written for the person running the engine: it says what was wrong and,
//! where there is one, what to change. The binary prints it on one line.

use std::path::PathBuf;

/// Everything that can go wrong in tcd-ort.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request or option the user supplied is out of range or inconsistent.
    #[error("{0}")]
    InvalidInput(String),
    /// A request field is out of range: the message follows the field's name (`steps must be
    /// at least 1`). Front ends show the field under their own name (`--steps`).
    #[error("{field} {message}")]
    InvalidField {
        /// The field, as the library names it.
        field: crate::pipeline::Field,
        /// What is wrong with its value, to follow its name.
        message: String,
    },
    /// A request asks for more than the engine's limits allow (image size, images per request;
    /// [`crate::pipeline::Limits`]): the message follows the field's name.
    #[error("{field} {message}")]
    OverLimit {
        /// The field, as the library names it.
        field: crate::pipeline::Field,
        /// How far past which limit it is, to follow its name.
        message: String,
    },
    /// Numbers stopped being numbers: a component produced NaN or infinite values (weights or
    /// a LoRA that overflow, a broken scheduler configuration). Never turned into an image.
    #[error("{what} has {count} NaN or infinite values (of {total}): {hint}")]
    NonFinite {
        /// Which component, at which step (`the UNet's output at step 2 of 4`).
        what: String,
        /// How many values are not finite.
        count: usize,
        /// How many values there are.
        total: usize,
        /// What usually causes it there.
        hint: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A model directory is missing a file, or a file in it is malformed.
    #[error("model {}: {message}", dir.display())]
    Model {
        /// The model directory (or file) involved.
        dir: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A LoRA file is malformed, or its keys or tensors cannot be applied as a LoRA.
    #[error("LoRA {}: {message}", path.display())]
    Lora {
        /// The LoRA file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// ONNX Runtime could not be found, loaded, or failed while running a graph.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    /// The tokenizer files could not be read or text could not be encoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An input image could not be read, or an output image could not be written.
    #[error("image {}: {message}", path.display())]
    Image {
        /// The image file involved.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The progress callback asked to stop.
    #[error("generation cancelled")]
    Cancelled,
    /// An invariant of the engine failed (arrays it built do not fit together, a graph returned
    /// no output): a defect of tcd-ort or of the model's graphs, not of the request. The
    /// underlying error, when there is one, is kept as the source.
    #[error("internal error: {context}{}", source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
    Internal {
        /// What the engine was doing.
        context: String,
        /// What failed underneath (an ndarray shape error, say).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidInput(message.into())
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Internal`] with its cause.
    pub fn internal(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Internal {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }

    /// An [`Error::Internal`] with no underlying error: an invariant that did not hold.
    pub fn invariant(context: impl Into<String>) -> Self {
        Error::Internal {
            context: context.into(),
            source: None,
        }
    }

    /// Shorthand for [`Error::Model`].
    pub fn model(dir: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Model {
            dir: dir.into(),
            message: message.into(),
        }
    }
}

impl Error {
    /// Shorthand for [`Error::Lora`].
    pub fn lora(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Lora {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn internal_errors_keep_their_cause() {
        let shape = ndarray::Array2::<f32>::zeros((2, 3));
        let cause = shape
            .into_shape_with_order((4, 4))
            .expect_err("6 elements do not make 16");
        let e = Error::internal("batching latents", cause);
        assert!(
            e.to_string()
                .starts_with("internal error: batching latents: "),
            "{e}"
        );
        assert!(e.source().is_some());
        let e = Error::invariant("unet returned nothing");
        assert_eq!(e.to_string(), "internal error: unet returned nothing");
        assert!(e.source().is_none());
    }
}
