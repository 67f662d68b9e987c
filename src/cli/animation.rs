//! Where `tcd-ort run` writes its results: PNGs for a still-image model; for an AnimateDiff
//! model one animation per video, in the kind the `--output` path asks for (a `.gif`, an
//! `.apng` or a directory of numbered PNGs, [`AnimationFormat::from_path`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tcd_ort::image_io::{
    encode_apng, encode_gif, frame_path, numbered_path, stage_bytes, stage_png, AnimationFormat,
    PendingFile,
};
use tcd_ort::pipeline::Generated;

/// The results of a run and where each goes.
#[derive(Debug)]
pub enum Outputs {
    /// One PNG per image.
    Images(Vec<PathBuf>),
    /// One animation per video.
    Videos {
        format: AnimationFormat,
        paths: Vec<PathBuf>,
        frames: usize,
    },
}

/// Whether `path` names an animation rather than a still PNG.
pub fn is_animation_path(path: &Path) -> bool {
    AnimationFormat::from_path(path).is_some()
}

impl Outputs {
    /// The outputs of `count` images or videos at `output`, for a model that makes videos of
    /// `frames` frames (`None`: still images); refuses an output path of the other kind.
    pub fn plan(output: &Path, frames: Option<usize>, count: usize) -> Result<Self> {
        let paths = (0..count)
            .map(|i| numbered_path(output, i, count))
            .collect();
        match (frames, AnimationFormat::from_path(output)) {
            (None, None) => Ok(Outputs::Images(paths)),
            (None, Some(_)) => bail!(
                "--output {} is an animation path (.gif, .apng or a directory) but this model \
                 makes still images: give a .png path, or a model exported with `python -m \
                 export animatediff`",
                output.display()
            ),
            (Some(_), None) => bail!(
                "--output {} is a still image path but this model makes animations: give a \
                 .gif, an .apng or a directory (a path without an extension) for numbered PNGs",
                output.display()
            ),
            (Some(frames), Some(format)) => Ok(Outputs::Videos {
                format,
                paths,
                frames,
            }),
        }
    }

    /// Every file the outputs will write (the frames of a directory each), for the checks
    /// that run before any work.
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            Outputs::Images(paths) => paths.clone(),
            Outputs::Videos {
                format: AnimationFormat::Frames,
                paths,
                frames,
            } => paths
                .iter()
                .flat_map(|dir| match dir.is_dir() {
                    // Frames that would replace files there.
                    true => (0..*frames).map(|f| frame_path(dir, f)).collect(),
                    // A new directory, made beside its parent.
                    false => vec![dir.clone()],
                })
                .collect(),
            Outputs::Videos { paths, .. } => paths.clone(),
        }
    }

    /// Writes the results to temporaries beside their destinations (committed with the run's
    /// other outputs). `text` gives the PNG text chunks of an image or video's first frame.
    pub fn stage(
        &self,
        generated: &Generated,
        fps: u32,
        overwrite: bool,
        text: &dyn Fn(&tcd_ort::image_io::RgbImage) -> Vec<(&'static str, String)>,
    ) -> Result<Vec<PendingFile>> {
        let mut staged = Vec::new();
        let writing = |path: &Path| format!("writing --output {}", path.display());
        match self {
            Outputs::Images(paths) => {
                for (image, path) in generated.images.iter().zip(paths) {
                    staged.push(
                        stage_png(path, image, &text(image), overwrite)
                            .with_context(|| writing(path))?,
                    );
                }
            }
            Outputs::Videos {
                format,
                paths,
                frames,
            } => {
                for (video, path) in generated.images.chunks(*frames).zip(paths) {
                    let mut chunks = text(&video[0]);
                    if let Some((_, parameters)) =
                        chunks.iter_mut().find(|(k, _)| *k == "parameters")
                    {
                        parameters.push_str(&format!(", FPS: {fps}"));
                    }
                    match format {
                        AnimationFormat::Gif => staged.push(
                            stage_bytes(path, overwrite, &encode_gif(video, fps)?)
                                .with_context(|| writing(path))?,
                        ),
                        AnimationFormat::Apng => staged.push(
                            stage_bytes(path, overwrite, &encode_apng(video, fps, &chunks)?)
                                .with_context(|| writing(path))?,
                        ),
                        AnimationFormat::Frames => {
                            std::fs::create_dir_all(path)
                                .with_context(|| format!("creating {}", path.display()))?;
                            for (f, frame) in video.iter().enumerate() {
                                let file = frame_path(path, f);
                                staged.push(
                                    stage_png(&file, frame, &chunks, overwrite)
                                        .with_context(|| writing(&file))?,
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(staged)
    }
}
