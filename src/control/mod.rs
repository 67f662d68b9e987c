//! ControlNet preprocessors: turn an input photograph into the conditioning image a ControlNet
//! was trained on, computed the way diffusers' examples compute it so that the same photograph
//! gives the same control image here as in Python.
//!
//! - [`canny`]: OpenCV's `cv2.Canny` edge map (ControlNet-canny), bit-exact.
//!
//! Depth estimation runs a model and comes with the depth ControlNets.

pub mod canny;

pub use canny::{canny, canny_gray};
