//! Image and tensor files: input images and masks pre-processed and VAE output post-processed
//! exactly as diffusers' `VaeImageProcessor` does (including PIL's Lanczos resize and grayscale
//! conversion), PNG with generation parameters, image grids, and NumPy `.npy` for latents.
//!
//! `image` holds [`RgbImage`] and pixel-level conversions, `resize` Pillow's resampling filters
//! (bit-exact), `tensor` the conversions between images and the tensors the graphs take and
//! return, `file` reading images and writing PNGs, and `npy` NumPy files (latents).

mod file;
mod image;
mod npy;
mod resize;
mod tensor;

#[doc(hidden)]
pub use file::decode_image;
pub use file::{create_output, load_image, numbered_path, write_png};
pub use image::{image_grid, to_grayscale, RgbImage};
#[doc(hidden)]
pub use npy::parse_npy;
pub use npy::{read_npy, write_npy};
pub use resize::{resize, resize_lanczos, ResampleFilter};
pub use tensor::{
    image_to_tensor, image_to_unit_tensor, mask_preview, mask_to_tensor, vae_output_to_images,
};
