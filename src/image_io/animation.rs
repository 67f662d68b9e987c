//! Animations out: the frames of a video as a looping GIF (the `image` crate's encoder, as
//! diffusers' `export_to_gif` writes one with Pillow), an animated PNG (the `png` crate's
//! APNG writer, lossless) or a directory of numbered PNGs. The output's kind follows its path
//! ([`AnimationFormat::from_path`]), for every front end alike.
//!
//! Animated WebP is not written: no maintained pure-Rust encoder makes animated WebP (the
//! `image` crate's WebP encoder writes single lossless images).

use std::path::{Path, PathBuf};

use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbaImage};

use super::image::RgbImage;
use crate::{Error, Result};

/// The highest frame rate accepted: GIF counts delays in hundredths of a second.
pub const MAX_FPS: u32 = 100;

/// diffusers' `export_to_gif` default frame rate, and the guide's.
pub const DEFAULT_FPS: u32 = 8;

/// How an animation is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnimationFormat {
    /// A looping GIF (`.gif`): 256 colours per frame, what browsers and chat apps show.
    Gif,
    /// A looping animated PNG (`.apng`): lossless.
    Apng,
    /// A directory of numbered PNGs (a path without an extension, or an existing directory):
    /// `0001.png`, `0002.png` ..., each with the generation parameters.
    Frames,
}

impl AnimationFormat {
    /// The format an output path asks for: `.gif`, `.apng`, or a directory (no extension, or
    /// one that exists); `None` for any other path (a still image's `.png`, say).
    pub fn from_path(path: &Path) -> Option<Self> {
        if path.is_dir() {
            return Some(AnimationFormat::Frames);
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("gif") => Some(AnimationFormat::Gif),
            Some(e) if e.eq_ignore_ascii_case("apng") => Some(AnimationFormat::Apng),
            None => Some(AnimationFormat::Frames),
            Some(_) => None,
        }
    }
}

/// Checks a frame rate: 1 to [`MAX_FPS`] frames per second.
pub fn check_fps(fps: u32) -> Result<()> {
    if (1..=MAX_FPS).contains(&fps) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "fps must be from 1 to {MAX_FPS} frames per second, got {fps} (AnimateDiff's motion \
             modules are trained at 8)"
        )))
    }
}

/// The path of frame `index` (from 0) in a [`AnimationFormat::Frames`] directory.
pub fn frame_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("{:04}.png", index + 1))
}

fn check_frames(frames: &[RgbImage], fps: u32) -> Result<()> {
    check_fps(fps)?;
    let Some(first) = frames.first() else {
        return Err(Error::invalid("an animation needs at least one frame"));
    };
    if frames
        .iter()
        .any(|f| (f.width, f.height) != (first.width, first.height))
    {
        return Err(Error::invalid("the frames of an animation differ in size"));
    }
    Ok(())
}

/// A looping GIF of `frames` at `fps`, each frame quantised to its own 256-colour palette.
pub fn encode_gif(frames: &[RgbImage], fps: u32) -> Result<Vec<u8>> {
    check_frames(frames, fps)?;
    let fail = |e: image::ImageError| Error::invalid(format!("encoding the GIF: {e}"));
    let mut bytes = Vec::new();
    {
        // Speed 10 of 1 (best, slowest) to 30: NeuQuant's sampling; 10 is the `gif` crate's
        // own recommendation and quantises a 512x512 frame in a few milliseconds.
        let mut encoder = GifEncoder::new_with_speed(&mut bytes, 10);
        encoder.set_repeat(Repeat::Infinite).map_err(fail)?;
        for frame in frames {
            let rgba: Vec<u8> = frame
                .pixels
                .chunks_exact(3)
                .flat_map(|p| [p[0], p[1], p[2], 255])
                .collect();
            let buffer = RgbaImage::from_raw(frame.width, frame.height, rgba)
                .ok_or_else(|| Error::invariant("frame buffer size"))?;
            let delay = Delay::from_numer_denom_ms(1000, fps);
            encoder
                .encode_frame(Frame::from_parts(buffer, 0, 0, delay))
                .map_err(fail)?;
        }
    }
    Ok(bytes)
}

/// A looping animated PNG of `frames` at `fps`, with `text` chunks (the generation
/// parameters) as a still PNG carries them.
pub fn encode_apng(frames: &[RgbImage], fps: u32, text: &[(&str, String)]) -> Result<Vec<u8>> {
    check_frames(frames, fps)?;
    let fail = |e: png::EncodingError| Error::invalid(format!("encoding the APNG: {e}"));
    let count = u32::try_from(frames.len()).map_err(|_| Error::invalid("too many frames"))?;
    let delay = u16::try_from(fps).map_err(|_| Error::invalid("fps too large"))?;
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, frames[0].width, frames[0].height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            encoder
                .add_itxt_chunk(key.to_string(), value.clone())
                .map_err(fail)?;
        }
        encoder.set_animated(count, 0).map_err(fail)?;
        // Each frame shows for 1/fps seconds.
        encoder.set_frame_delay(1, delay).map_err(fail)?;
        let mut writer = encoder.write_header().map_err(fail)?;
        for frame in frames {
            writer.write_image_data(&frame.pixels).map_err(fail)?;
        }
        writer.finish().map_err(fail)?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: usize) -> Vec<RgbImage> {
        (0..n)
            .map(|i| {
                let pixels = (0..8 * 6 * 3)
                    .map(|k| ((k * 7 + i * 40) % 256) as u8)
                    .collect();
                RgbImage::new(8, 6, pixels).expect("frame")
            })
            .collect()
    }

    #[test]
    fn formats_follow_the_path() {
        let f = |p: &str| AnimationFormat::from_path(Path::new(p));
        assert_eq!(f("a.gif"), Some(AnimationFormat::Gif));
        assert_eq!(f("a.GIF"), Some(AnimationFormat::Gif));
        assert_eq!(f("a.apng"), Some(AnimationFormat::Apng));
        assert_eq!(f("out/frames"), Some(AnimationFormat::Frames));
        assert_eq!(f("a.png"), None);
        assert_eq!(f("a.webp"), None);
        assert_eq!(
            frame_path(Path::new("d"), 0),
            Path::new("d").join("0001.png")
        );
    }

    #[test]
    fn gifs_loop_with_every_frame_and_its_delay() {
        use image::AnimationDecoder;
        let bytes = encode_gif(&frames(5), 8).expect("gif");
        let decoder =
            image::codecs::gif::GifDecoder::new(std::io::Cursor::new(&bytes)).expect("decoder");
        let decoded = decoder.into_frames().collect_frames().expect("frames");
        assert_eq!(decoded.len(), 5);
        for frame in &decoded {
            assert_eq!(frame.buffer().dimensions(), (8, 6));
            let (num, den) = frame.delay().numer_denom_ms();
            // 125 ms, as GIF stores it: 12 or 13 hundredths.
            assert!((120..=130).contains(&(num / den)), "{num}/{den}");
        }
        // The NETSCAPE2.0 extension with loop count 0 (forever).
        assert!(bytes.windows(11).any(|w| w == b"NETSCAPE2.0"));
    }

    #[test]
    fn apngs_hold_every_frame_losslessly() {
        let input = frames(3);
        let bytes = encode_apng(&input, 8, &[("parameters", "p".into())]).expect("apng");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("info");
        let control = reader.info().animation_control().expect("acTL");
        assert_eq!((control.num_frames, control.num_plays), (3, 0));
        let mut buffer = vec![0; reader.output_buffer_size().expect("size")];
        for frame in &input {
            reader.next_frame(&mut buffer).expect("frame");
            assert_eq!(&buffer[..frame.pixels.len()], frame.pixels.as_slice());
        }
    }

    #[test]
    fn bad_rates_and_empty_animations_are_refused() {
        assert!(check_fps(0).is_err());
        assert!(check_fps(MAX_FPS + 1).is_err());
        assert!(encode_gif(&[], 8).is_err());
    }
}
