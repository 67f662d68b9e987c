//! Image and tensor files: input images and masks pre-processed and VAE output post-processed
//! exactly as diffusers' `VaeImageProcessor` does (including PIL's Lanczos resize and grayscale
//! conversion), PNG with generation parameters, image grids, and NumPy `.npy` for latents.
//!
//! `image` holds [`RgbImage`] and pixel-level conversions, `resize` Pillow's resampling filters
//! (bit-exact), `tensor` the conversions between images and the tensors the graphs take and
//! return, `clip` the CLIP image encoder's pre-processing (an IP-Adapter's reference image),
//! `file` reading images and writing PNGs, `npy` NumPy files (latents), `animation` GIFs,
//! APNGs and frame directories (videos), and `atomic` the way every output file is written:
//! whole or not at all.

mod animation;
mod atomic;
mod clip;
mod file;
mod image;
mod npy;
mod resize;
mod tensor;

pub use animation::{
    check_fps, encode_apng, encode_gif, frame_path, AnimationFormat, DEFAULT_FPS, MAX_FPS,
};
pub use atomic::{check_output_path, commit_all, stage_bytes, write_atomic, PendingFile};
pub use clip::{clip_pixel_values, ClipImageConfig, ClipResize};
pub use file::{
    decode_alpha, decode_image, encode_png, load_image, numbered_path, stage_png, write_png,
    MAX_INPUT_SIDE,
};
pub use image::{image_grid, to_grayscale, RgbImage};
#[doc(hidden)]
pub use npy::parse_npy;
pub use npy::{read_npy, stage_npy, write_npy};
pub use resize::{resize, resize_lanczos, ResampleFilter};
pub use tensor::{
    image_to_tensor, image_to_unit_tensor, mask_preview, mask_to_tensor, vae_output_to_images,
};
