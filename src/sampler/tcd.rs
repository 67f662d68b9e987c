//! The TCD scheduler: diffusers' `TCDScheduler` on ndarray.
//!
//! Trajectory Consistency Distillation (Zheng et al., 2024, <https://arxiv.org/abs/2402.19159>)
//! samples with *Strategic Stochastic Sampling*: from the current sample `x_t` the model's
//! prediction gives `x_0`, which is moved to an intermediate point `x_s` on the trajectory
//! (`s = floor((1 - gamma) * t_prev)`), and fresh noise carries `x_s` forward to `t_prev`.
//! `gamma` (called `eta` here, as in diffusers) sets how much noise is injected: `0` is
//! deterministic, `1` restarts from `x_0` every step.
//!
//! Everything here follows `diffusers/schedulers/scheduling_tcd.py` (diffusers 0.42.1) line by
//! line, including its float32 arithmetic, so that one seed gives the same latents as the
//! Python pipeline. The golden test `tests/it/scheduler.rs` checks this against fixtures written
//! by `tests/golden/make_scheduler.py`.

use ndarray::{ArrayD, Axis, Zip};

use crate::rng::TorchGenerator;
use crate::{Error, Result};

pub use super::config::{BetaSchedule, PredictionType, TcdConfig, TimestepSpacing};
use super::torch_math::{
    betas_for_alpha_bar_cosine, rescale_zero_terminal_snr, torch_cumprod, torch_linspace,
    truncate_to_usize,
};

/// The most training timesteps a scheduler config may declare (Stable Diffusion uses 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

/// What one [`TcdScheduler::step`] produces.
#[derive(Clone, Debug)]
pub struct TcdStepOutput {
    /// The sample at the next (lower) timestep: the input of the next model call.
    pub prev_sample: ArrayD<f32>,
    /// `x_s`, the model's prediction moved to the intermediate timestep `s` (what diffusers
    /// returns as `pred_noised_sample`); equal to `prev_sample` on the last step.
    pub pred_noised_sample: ArrayD<f32>,
    /// `x_0`, the model's prediction of the clean sample, for previews.
    pub pred_original_sample: ArrayD<f32>,
}

/// diffusers' `TCDScheduler`: timesteps for a TCD run and the update between them.
#[derive(Clone, Debug)]
pub struct TcdScheduler {
    config: TcdConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `num_inference_steps` as diffusers keeps it: for custom timesteps with strength < 1 this
    /// is the length before truncation, which decides whether the last step draws noise.
    num_inference_steps: Option<usize>,
    timesteps: Vec<i64>,
    custom_timesteps: bool,
    step_index: Option<usize>,
    begin_index: Option<usize>,
    warnings: Vec<String>,
}

impl TcdScheduler {
    /// Builds the scheduler's noise schedule from `config`.
    pub fn new(config: TcdConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n == 0 {
            return Err(Error::invalid(
                "scheduler config: num_train_timesteps must be at least 1",
            ));
        }
        // The schedule holds a few values per training step; real models train with 1000.
        if n > MAX_TRAIN_TIMESTEPS {
            return Err(Error::invalid(format!(
                "scheduler config: num_train_timesteps is {n}; at most {MAX_TRAIN_TIMESTEPS} are supported"
            )));
        }
        let mut betas: Vec<f32> = match &config.trained_betas {
            Some(tb) => {
                if tb.len() != n {
                    return Err(Error::invalid(format!(
                        "scheduler config: trained_betas has {} values but num_train_timesteps is \
                         {n}; give one beta per training timestep",
                        tb.len()
                    )));
                }
                tb.iter().map(|&b| b as f32).collect()
            }
            None => match config.beta_schedule {
                BetaSchedule::Linear => torch_linspace(config.beta_start, config.beta_end, n),
                BetaSchedule::ScaledLinear => {
                    torch_linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar_cosine(n, 0.999),
            },
        };
        // Outside (0, 1) the alphas' products turn negative and their square roots NaN: every
        // image would come out black, so refuse the config instead.
        if let Some((t, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(b.is_finite() && **b >= 0.0 && **b < 1.0))
        {
            return Err(Error::invalid(format!(
                "scheduler config: every beta must be in [0, 1), but beta_start {} and \
                 beta_end {} give {b} at training timestep {t} (Stable Diffusion's configs use \
                 0.00085 and 0.012, scaled_linear)",
                config.beta_start, config.beta_end
            )));
        }
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = torch_cumprod(&alphas);
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            timesteps: (0..n as i64).rev().collect(),
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: None,
            custom_timesteps: false,
            step_index: None,
            begin_index: None,
            warnings: Vec::new(),
        })
    }

    /// The configuration the scheduler was built from.
    pub fn config(&self) -> &TcdConfig {
        &self.config
    }

    /// The cumulative products of `1 - beta`, one per training timestep, in float32.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The alpha product used before the first training timestep.
    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    /// The standard deviation of the initial noise: latents are drawn from N(0, 1) unscaled.
    pub fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// The timesteps of the current schedule, highest first.
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// The `num_inference_steps` of the last [`TcdScheduler::set_timesteps`] call.
    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// Whether the schedule came from a custom timestep list.
    pub fn custom_timesteps(&self) -> bool {
        self.custom_timesteps
    }

    /// Index of the timestep the next [`TcdScheduler::step`] expects, once stepping began.
    pub fn step_index(&self) -> Option<usize> {
        self.step_index
    }

    /// The index the first step starts from, if a pipeline set one.
    pub fn begin_index(&self) -> Option<usize> {
        self.begin_index
    }

    /// Sets the index of the first step (diffusers' `set_begin_index`); without it the first
    /// step looks its timestep up in the schedule.
    pub fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = Some(begin_index);
    }

    /// Warnings diffusers would have logged during the last
    /// [`TcdScheduler::set_timesteps`] (unusual custom timestep lists).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Identity: TCD does not scale the model input. Kept so pipelines read like diffusers'.
    pub fn scale_model_input<'a>(
        &self,
        sample: &'a ArrayD<f32>,
        _timestep: i64,
    ) -> &'a ArrayD<f32> {
        sample
    }

    /// Chooses the timesteps of a run (diffusers' `set_timesteps`).
    ///
    /// Give exactly one of `num_inference_steps` (timesteps picked evenly from the distillation
    /// schedule of `original_inference_steps`, default the config's) or `timesteps` (a custom,
    /// strictly descending list). `strength` in `(0, 1]` shortens the schedule for img2img and
    /// inpainting as diffusers' pipelines do; use `1.0` for text-to-image.
    // It follows diffusers' `TCDScheduler.set_timesteps` branch for branch so the two can be
    // read side by side; split, that correspondence would be lost.
    #[allow(clippy::too_many_lines)]
    pub fn set_timesteps(
        &mut self,
        num_inference_steps: Option<usize>,
        original_inference_steps: Option<usize>,
        timesteps: Option<&[i64]>,
        strength: f64,
    ) -> Result<()> {
        let n_train = self.config.num_train_timesteps;
        // 0. Check inputs.
        let (steps, custom) =
            match (num_inference_steps, timesteps) {
                (None, None) => {
                    return Err(Error::invalid(
                        "set_timesteps: pass either a number of inference steps or a custom \
                     timestep list",
                    ))
                }
                (Some(_), Some(_)) => return Err(Error::invalid(
                    "set_timesteps: pass a number of inference steps or a custom timestep list, \
                     not both",
                )),
                (steps, custom) => (steps, custom),
            };
        // diffusers leaves strength to its pipelines; outside (0, 1] it would index past the
        // training schedule or select nothing, so refuse it here.
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::invalid(format!(
                "strength must be in (0, 1], got {strength}; use 1.0 for text-to-image and a \
                 smaller value to keep more of the input image"
            )));
        }
        let mut warnings = Vec::new();

        // 1. The TCD original training/distillation timestep schedule.
        let original_steps =
            original_inference_steps.unwrap_or(self.config.original_inference_steps);
        let tcd_origin_timesteps: Vec<i64> = if original_inference_steps.is_none() {
            // Default: timesteps align with the distillation's discrete steps.
            if original_steps > n_train {
                return Err(Error::invalid(format!(
                    "original_inference_steps ({original_steps}) in the scheduler config cannot \
                     exceed num_train_timesteps ({n_train})"
                )));
            }
            if original_steps == 0 {
                return Err(Error::invalid(
                    "original_inference_steps in the scheduler config must be at least 1",
                ));
            }
            // The skipping step k of the paper.
            let k = (n_train / original_steps) as i64;
            let count = truncate_to_usize(original_steps as f64 * strength);
            (1..=count as i64).map(|i| i * k - 1).collect()
        } else {
            // Customised: timesteps may be any training timestep.
            let count = truncate_to_usize(n_train as f64 * strength);
            (0..count as i64).collect()
        };

        // 2. The TCD inference timestep schedule.
        let (num_steps, schedule) = if let Some(custom) = custom {
            // 2.1 A custom schedule.
            let Some(&first) = custom.first() else {
                return Err(Error::invalid(
                    "custom timesteps: the list is empty; give at least one timestep",
                ));
            };
            let mut non_train = Vec::new();
            for w in custom.windows(2) {
                if w[1] >= w[0] {
                    return Err(Error::invalid(format!(
                        "custom timesteps must be strictly descending, but {} is followed by {}",
                        w[0], w[1]
                    )));
                }
                if !tcd_origin_timesteps.contains(&w[1]) {
                    non_train.push(w[1]);
                }
            }
            if first >= n_train as i64 {
                return Err(Error::invalid(format!(
                    "custom timesteps must start below num_train_timesteps ({n_train}), but the \
                     first is {first}"
                )));
            }
            // diffusers does not check this; a negative timestep would index the noise schedule
            // from its end there.
            if let Some(&last) = custom.last() {
                if last < 0 {
                    return Err(Error::invalid(format!(
                        "custom timesteps must be non-negative, but the list contains {last}"
                    )));
                }
            }
            if strength == 1.0 && first != n_train as i64 - 1 {
                warnings.push(format!(
                    "the first custom timestep is {first}, not num_train_timesteps - 1 ({}); \
                     results may be unexpected",
                    n_train - 1
                ));
            }
            if !non_train.is_empty() {
                warnings.push(format!(
                    "custom timesteps {non_train:?} are not on the distillation schedule; \
                     results may be unexpected"
                ));
            }
            // `original_steps` is never absent here, so diffusers compares with it.
            if custom.len() > original_steps {
                warnings.push(format!(
                    "the custom schedule has {} timesteps, more than the {original_steps} of the \
                     distillation schedule; results may be unexpected",
                    custom.len()
                ));
            }
            let n = custom.len();
            // Apply strength as StableDiffusionImg2ImgPipeline.get_timesteps does.
            let init_timestep = truncate_to_usize(n as f64 * strength).min(n);
            let t_start = n.saturating_sub(init_timestep);
            if t_start >= n {
                return Err(Error::invalid(format!(
                    "strength {strength} keeps none of the {n} custom timesteps; raise strength \
                     or give more timesteps"
                )));
            }
            (n, custom[t_start..].to_vec())
        } else {
            // 2.2 The standard TCD inference schedule.
            let steps = steps.unwrap_or(0);
            if steps > n_train {
                return Err(Error::invalid(format!(
                    "num_inference_steps ({steps}) cannot exceed num_train_timesteps ({n_train})"
                )));
            }
            if steps == 0 {
                return Err(Error::invalid("num_inference_steps must be at least 1"));
            }
            if tcd_origin_timesteps.len() / steps < 1 {
                return Err(Error::invalid(format!(
                    "original_inference_steps x strength ({original_steps} x {strength}) is \
                     smaller than num_inference_steps ({steps}); reduce num_inference_steps to at \
                     most {} or raise strength to at least {}",
                    truncate_to_usize(original_steps as f64 * strength),
                    steps as f64 / original_steps as f64
                )));
            }
            if steps > original_steps {
                return Err(Error::invalid(format!(
                    "num_inference_steps ({steps}) cannot exceed original_inference_steps \
                     ({original_steps}): the schedule is a subset of the distillation schedule"
                )));
            }
            let origin: Vec<i64> = tcd_origin_timesteps.iter().rev().copied().collect();
            // np.linspace(0, len, num=steps, endpoint=False), floored: evenly spaced indices.
            let len = origin.len() as f64;
            let delta = len / steps as f64;
            let schedule = (0..steps)
                .map(|i| origin[(i as f64 * delta).floor() as usize])
                .collect();
            (steps, schedule)
        };

        self.num_inference_steps = Some(num_steps);
        self.custom_timesteps = custom.is_some();
        self.timesteps = schedule;
        self.step_index = None;
        self.begin_index = None;
        self.warnings = warnings;
        Ok(())
    }

    /// Index of `timestep` in the schedule; the second match if it occurs twice, so that a run
    /// starting mid-schedule does not skip a step (diffusers' `index_for_timestep`).
    pub fn index_for_timestep(&self, timestep: i64) -> Option<usize> {
        let mut matches = self
            .timesteps
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == timestep)
            .map(|(i, _)| i);
        let first = matches.next()?;
        Some(matches.next().unwrap_or(first))
    }

    fn alpha_cumprod_at(&self, timestep: i64, what: &str) -> Result<f32> {
        usize::try_from(timestep)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i).copied())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{what} {timestep} is outside the training schedule 0..{}",
                    self.alphas_cumprod.len()
                ))
            })
    }

    /// One TCD update from `timestep` to the next timestep of the schedule (diffusers'
    /// `step`).
    ///
    /// `eta` is the paper's `gamma` in `[0, 1]`: `0` is deterministic, `1` fully stochastic;
    /// diffusers' pipelines default to `0.3`. When `eta > 0` and this is not the last step,
    /// noise of `model_output`'s shape is drawn from `generator`, exactly when and as diffusers
    /// draws it.
    pub fn step(
        &mut self,
        model_output: &ArrayD<f32>,
        timestep: i64,
        sample: &ArrayD<f32>,
        eta: f32,
        generator: &mut TorchGenerator,
    ) -> Result<TcdStepOutput> {
        let Some(num_inference_steps) = self.num_inference_steps else {
            return Err(Error::invalid(
                "the scheduler has no timesteps yet: call set_timesteps before step",
            ));
        };
        if model_output.shape() != sample.shape() {
            return Err(Error::invalid(format!(
                "model output shape {:?} does not match sample shape {:?}",
                model_output.shape(),
                sample.shape()
            )));
        }
        let step_index = match self.step_index {
            Some(i) => i,
            None => match self.begin_index {
                Some(b) => b,
                None => self.index_for_timestep(timestep).ok_or_else(|| {
                    Error::invalid(format!(
                        "timestep {timestep} is not in the schedule {:?}; step with the \
                         scheduler's own timesteps",
                        self.timesteps
                    ))
                })?,
            },
        };
        self.step_index = Some(step_index);
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::invalid(format!(
                "eta (gamma) must be in [0, 1], got {eta}; 0 is deterministic, 1 fully stochastic"
            )));
        }

        // 1. The previous step's timestep t_prev and the intermediate timestep s.
        let prev_timestep = self.timesteps.get(step_index + 1).copied().unwrap_or(0);
        // torch: `floor((1 - eta) * prev_timestep)` with a Python float times an int64 tensor,
        // which promotes to float32.
        let one_minus_eta = (1.0 - f64::from(eta)) as f32;
        let timestep_s = (one_minus_eta * prev_timestep as f32).floor() as i64;

        // 2. Alphas and betas (float32 scalars, as diffusers' 0-d tensors).
        let alpha_prod_t = self.alpha_cumprod_at(timestep, "timestep")?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            self.alpha_cumprod_at(prev_timestep, "previous timestep")?
        } else {
            self.final_alpha_cumprod
        };
        let alpha_prod_s = self.alpha_cumprod_at(timestep_s, "intermediate timestep")?;
        let beta_prod_s = 1.0 - alpha_prod_s;
        let (sa_t, sb_t) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let (sa_s, sb_s) = (alpha_prod_s.sqrt(), beta_prod_s.sqrt());

        // 3. The predicted clean sample x_0 and noise, then the predicted noised sample
        //    x_s = sqrt(alpha_s) * x_0 + sqrt(1 - alpha_s) * eps.
        let mut pred_original_sample = ArrayD::<f32>::zeros(sample.raw_dim());
        let mut pred_noised_sample = ArrayD::<f32>::zeros(sample.raw_dim());
        let prediction = self.config.prediction_type;
        Zip::from(&mut pred_original_sample)
            .and(&mut pred_noised_sample)
            .and(model_output)
            .and(sample)
            .for_each(|x0, xs, &m, &x| {
                let (orig, eps) = match prediction {
                    PredictionType::Epsilon => ((x - sb_t * m) / sa_t, m),
                    PredictionType::Sample => (m, (x - sa_t * m) / sb_t),
                    PredictionType::VPrediction => (sa_t * x - sb_t * m, sa_t * m + sb_t * x),
                };
                *x0 = orig;
                *xs = sa_s * orig + sb_s * eps;
            });

        // 4. Inject noise z ~ N(0, I) to move from s back up to t_prev (multistep sampling).
        //    No noise on the last step of the schedule, hence none in one-step sampling.
        let prev_sample = if eta > 0.0 && step_index != num_inference_steps.wrapping_sub(1) {
            let noise = generator.randn(model_output.shape());
            let ratio = alpha_prod_t_prev / alpha_prod_s;
            let (c_sample, c_noise) = (ratio.sqrt(), (1.0 - ratio).sqrt());
            let mut prev = pred_noised_sample.clone();
            Zip::from(&mut prev)
                .and(&noise)
                .for_each(|p, &z| *p = c_sample * *p + c_noise * z);
            prev
        } else {
            pred_noised_sample.clone()
        };

        // Upon completion, move on to the next timestep.
        self.step_index = Some(step_index + 1);
        Ok(TcdStepOutput {
            prev_sample,
            pred_noised_sample,
            pred_original_sample,
        })
    }

    /// Noises clean samples to the given timesteps (the forward process, for img2img):
    /// `sqrt(alpha_t) * original + sqrt(1 - alpha_t) * noise`, one timestep per batch item
    /// (axis 0) or one for all.
    pub fn add_noise(
        &self,
        original: &ArrayD<f32>,
        noise: &ArrayD<f32>,
        timesteps: &[i64],
    ) -> Result<ArrayD<f32>> {
        if original.shape() != noise.shape() {
            return Err(Error::invalid(format!(
                "add_noise: noise shape {:?} does not match sample shape {:?}",
                noise.shape(),
                original.shape()
            )));
        }
        let batch = original.shape().first().copied().unwrap_or(1);
        if original.ndim() == 0 || !(timesteps.len() == 1 || timesteps.len() == batch) {
            return Err(Error::invalid(format!(
                "add_noise: give one timestep or one per batch item ({batch}), got {}",
                timesteps.len()
            )));
        }
        let mut out = original.clone();
        for (b, (mut o, n)) in out
            .axis_iter_mut(Axis(0))
            .zip(noise.axis_iter(Axis(0)))
            .enumerate()
        {
            let t = timesteps[if timesteps.len() == 1 { 0 } else { b }];
            let alpha = self.alpha_cumprod_at(t, "add_noise timestep")?;
            let (sa, sb) = (alpha.sqrt(), (1.0 - alpha).sqrt());
            Zip::from(&mut o)
                .and(&n)
                .for_each(|x, &z| *x = sa * *x + sb * z);
        }
        Ok(out)
    }
}
