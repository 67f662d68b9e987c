//! The TCD scheduler's configuration: diffusers' `TCDScheduler` config fields with its
//! defaults, read from a `scheduler_config.json`, and named presets for the shipped models.

use serde::Deserialize;

use crate::{Error, Result};

/// How the training noise schedule's betas are laid out (diffusers' `beta_schedule`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum BetaSchedule {
    /// Betas evenly spaced from `beta_start` to `beta_end`.
    #[serde(rename = "linear")]
    Linear,
    /// Square roots of the betas evenly spaced: the latent diffusion (Stable Diffusion) schedule.
    #[default]
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// The Glide cosine schedule, betas capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the denoising model predicts (diffusers' `prediction_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    /// The noise that was added (`epsilon`).
    #[default]
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The clean sample itself.
    #[serde(rename = "sample")]
    Sample,
    /// The velocity `v = sqrt(alpha) * noise - sqrt(1 - alpha) * x_0` (Imagen Video, sec. 2.4).
    #[serde(rename = "v_prediction")]
    VPrediction,
}

/// How other diffusers schedulers space their timesteps (diffusers' `timestep_spacing`).
///
/// `TCDScheduler` reads this key but never uses it: TCD always takes its timesteps from the
/// distillation schedule. It is parsed so that configs carrying it load, and kept for callers
/// that want to report it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum TimestepSpacing {
    /// `leading` (diffusers' default).
    #[default]
    #[serde(rename = "leading")]
    Leading,
    /// `linspace`.
    #[serde(rename = "linspace")]
    Linspace,
    /// `trailing`.
    #[serde(rename = "trailing")]
    Trailing,
}

/// The scheduler's configuration, as found in a diffusers `scheduler_config.json`.
///
/// Unknown keys (`_class_name`, `skip_prk_steps`, ...) are ignored and missing keys take the
/// defaults of diffusers' `TCDScheduler.__init__`, so the config of any Stable Diffusion
/// scheduler loads the way `TCDScheduler.from_config(pipe.scheduler.config)` loads it.
///
/// diffusers' `TCDScheduler.step` does not apply `clip_sample`, `thresholding` or
/// `timestep_scaling`; they are accepted and kept for the same reason, and have no effect here
/// either, which is what parity with diffusers requires.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct TcdConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First beta of the training schedule.
    pub beta_start: f64,
    /// Last beta of the training schedule.
    pub beta_end: f64,
    /// Layout of the betas between `beta_start` and `beta_end`.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace `beta_start`/`beta_end`/`beta_schedule` and
    /// must number `num_train_timesteps`.
    pub trained_betas: Option<Vec<f64>>,
    /// Length of the distillation schedule that inference timesteps are picked from.
    pub original_inference_steps: usize,
    /// Read but not applied by diffusers' TCD `step` (see the type's docs).
    pub clip_sample: bool,
    /// Read but not applied by diffusers' TCD `step`.
    pub clip_sample_range: f64,
    /// Whether the alpha product before the first training step is 1 (otherwise
    /// `alphas_cumprod[0]`). TCD never steps past timestep 0, so this only shows in
    /// [`TcdScheduler::final_alpha_cumprod`].
    pub set_alpha_to_one: bool,
    /// Read but not applied by diffusers' TCD scheduler.
    pub steps_offset: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Read but not applied by diffusers' TCD `step`.
    pub thresholding: bool,
    /// Read but not applied by diffusers' TCD `step`.
    pub dynamic_thresholding_ratio: f64,
    /// Read but not applied by diffusers' TCD `step`.
    pub sample_max_value: f64,
    /// Read but not applied by diffusers' TCD scheduler.
    pub timestep_spacing: TimestepSpacing,
    /// Read but not applied by diffusers' TCD `step`.
    pub timestep_scaling: f64,
    /// Rescale the betas to zero terminal SNR (Lin et al., 2023, Algorithm 1).
    pub rescale_betas_zero_snr: bool,
}

impl Default for TcdConfig {
    /// The defaults of `TCDScheduler.__init__` in diffusers 0.42.1
    /// (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_tcd.py>).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl TcdConfig {
    /// What `TCDScheduler.from_config` gives for Stable Diffusion 1.5's shipped scheduler
    /// config (`runwayml/stable-diffusion-v1-5`, `scheduler/scheduler_config.json`): the
    /// defaults with `set_alpha_to_one = false` and `steps_offset = 1`.
    pub fn sd15() -> Self {
        Self {
            set_alpha_to_one: false,
            steps_offset: 1,
            ..Self::default()
        }
    }

    /// What `TCDScheduler.from_config` gives for SDXL base 1.0's shipped scheduler config
    /// (`stabilityai/stable-diffusion-xl-base-1.0`, `scheduler/scheduler_config.json`): the
    /// same betas as SD 1.5, `set_alpha_to_one = false`, `steps_offset = 1`, `leading` spacing.
    pub fn sdxl() -> Self {
        Self {
            set_alpha_to_one: false,
            steps_offset: 1,
            timestep_spacing: TimestepSpacing::Leading,
            ..Self::default()
        }
    }

    /// Parses a diffusers `scheduler_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("scheduler config is not valid: {e}")))
    }
}
