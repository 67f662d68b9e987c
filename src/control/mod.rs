//! ControlNet preprocessors: turn an input photograph into the conditioning image a ControlNet
//! was trained on, computed the way diffusers' examples compute it so that the same photograph
//! gives the same control image here as in Python.
//!
//! - [`canny`]: OpenCV's `cv2.Canny` edge map (ControlNet-canny), bit-exact.
//! - [`depth`]: a DPT depth map (ControlNet-depth) from a model exported with
//!   `python -m export depth`, post-processed as diffusers' guide does.

pub mod canny;
pub mod depth;

pub use canny::{canny, canny_gray};
pub use depth::DepthEstimator;
