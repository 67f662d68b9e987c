//! `TcdScheduler` against diffusers' `TCDScheduler`.
//!
//! Reference numbers come from `tests/fixtures/tcd_scheduler.json`, written by
//! `tests/golden/make_scheduler.py` (diffusers 0.42.1, torch 2.15.0). Noise schedules and
//! timesteps must match exactly; step outputs within 1e-5 of the reference's largest magnitude.

use std::collections::BTreeMap;

use ndarray::{ArrayD, IxDyn};
use serde::Deserialize;
use serde_json::Value;
use tcd_ort::rng::TorchGenerator;
use tcd_ort::sampler::tcd::{PredictionType, TcdConfig, TcdScheduler};

#[derive(Deserialize)]
struct Fixture {
    configs: BTreeMap<String, ConfigCase>,
    timesteps: Vec<TimestepsCase>,
    runs: Vec<Run>,
    add_noise: AddNoise,
    step_errors: Vec<StepError>,
}

#[derive(Deserialize)]
struct ConfigCase {
    json: Value,
    alphas_cumprod: Vec<u32>,
    final_alpha_cumprod: u32,
}

#[derive(Deserialize)]
struct TimestepsCase {
    config: String,
    input: TimestepsInput,
    result: Option<TimestepsResult>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct TimestepsInput {
    num_inference_steps: Option<usize>,
    original_inference_steps: Option<usize>,
    timesteps: Option<Vec<i64>>,
    strength: Option<f64>,
}

#[derive(Deserialize)]
struct TimestepsResult {
    timesteps: Vec<i64>,
    num_inference_steps: usize,
}

#[derive(Deserialize)]
struct Tensor {
    shape: Vec<usize>,
    bits: Vec<u32>,
}

impl Tensor {
    fn array(&self) -> ArrayD<f32> {
        let data = self.bits.iter().map(|&b| f32::from_bits(b)).collect();
        ArrayD::from_shape_vec(IxDyn(&self.shape), data).expect("fixture tensor shape")
    }
}

#[derive(Deserialize)]
struct Run {
    config: String,
    num_inference_steps: Option<usize>,
    custom_timesteps: Option<Vec<i64>>,
    strength: f64,
    eta: f32,
    begin_index: Option<usize>,
    noise_seed: u64,
    initial_sample: Tensor,
    steps: Vec<RunStep>,
}

#[derive(Deserialize)]
struct RunStep {
    timestep: i64,
    model_output: Tensor,
    prev_sample: Tensor,
    pred_noised_sample: Tensor,
}

#[derive(Deserialize)]
struct AddNoise {
    config: String,
    original: Tensor,
    noise: Tensor,
    cases: Vec<AddNoiseCase>,
}

#[derive(Deserialize)]
struct AddNoiseCase {
    timesteps: Vec<i64>,
    noisy: Tensor,
}

#[derive(Deserialize)]
struct StepError {
    name: String,
    steps: usize,
    timestep: i64,
    eta: f32,
    set_timesteps: bool,
    error: Option<String>,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tcd_scheduler.json"
    );
    let text = std::fs::read_to_string(path).expect("read tests/fixtures/tcd_scheduler.json");
    serde_json::from_str(&text).expect("parse tests/fixtures/tcd_scheduler.json")
}

fn scheduler(fx: &Fixture, name: &str) -> TcdScheduler {
    let json = fx.configs[name].json.to_string();
    TcdScheduler::new(TcdConfig::from_json(&json).expect("config parses")).expect("scheduler")
}

/// Largest difference relative to the reference's largest magnitude.
fn rel_err(got: &ArrayD<f32>, want: &ArrayD<f32>) -> f32 {
    assert_eq!(got.shape(), want.shape());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

#[test]
fn noise_schedules_match() {
    let fx = fixture();
    for (name, case) in &fx.configs {
        let s = scheduler(&fx, name);
        assert_eq!(
            s.alphas_cumprod().len(),
            case.alphas_cumprod.len(),
            "{name}"
        );
        let want: Vec<f32> = case
            .alphas_cumprod
            .iter()
            .map(|&b| f32::from_bits(b))
            .collect();
        if s.config().rescale_betas_zero_snr {
            // Zero-SNR rescaling takes float32 square roots, which torch computes through MKL's
            // vector math (within 1 ulp, not correctly rounded), so the last bits may differ.
            for (i, (a, b)) in s.alphas_cumprod().iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-6, "{name}[{i}]: {a} vs {b}");
            }
        } else {
            let mismatches = s
                .alphas_cumprod()
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                mismatches, 0,
                "{name}: alphas_cumprod differs in {mismatches} places"
            );
        }
        assert_eq!(
            s.final_alpha_cumprod().to_bits(),
            case.final_alpha_cumprod,
            "{name}: final_alpha_cumprod"
        );
    }
}

#[test]
fn named_configs_match_the_shipped_ones() {
    let fx = fixture();
    let sd15 = TcdConfig::from_json(&fx.configs["sd15"].json.to_string()).expect("sd15");
    assert_eq!(sd15, TcdConfig::sd15());
    let sdxl = TcdConfig::from_json(&fx.configs["sdxl"].json.to_string()).expect("sdxl");
    assert_eq!(sdxl, TcdConfig::sdxl());
    let defaults = TcdConfig::from_json("{}").expect("defaults");
    assert_eq!(defaults, TcdConfig::default());
    let v = TcdConfig::from_json(&fx.configs["v_prediction_zsnr"].json.to_string()).expect("v");
    assert_eq!(v.prediction_type, PredictionType::VPrediction);
}

#[test]
fn timesteps_match_diffusers() {
    let fx = fixture();
    for case in &fx.timesteps {
        let mut s = scheduler(&fx, &case.config);
        let input = &case.input;
        let strength = input.strength.unwrap_or(1.0);
        let result = s.set_timesteps(
            input.num_inference_steps,
            input.original_inference_steps,
            input.timesteps.as_deref(),
            strength,
        );
        let label = format!(
            "{} steps={:?} ois={:?} strength={strength} custom={:?}",
            case.config, input.num_inference_steps, input.original_inference_steps, input.timesteps
        );
        match (&case.result, &case.error) {
            (Some(want), None) => {
                result.unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(s.timesteps(), &want.timesteps[..], "{label}");
                assert_eq!(
                    s.num_inference_steps(),
                    Some(want.num_inference_steps),
                    "{label}"
                );
                assert_eq!(s.custom_timesteps(), input.timesteps.is_some(), "{label}");
            }
            (None, Some(kind)) => {
                assert!(result.is_err(), "{label}: diffusers raised {kind}, got Ok")
            }
            _ => panic!("{label}: fixture case has neither result nor error"),
        }
    }
    assert!(fx.timesteps.len() > 100);
}

#[test]
fn custom_timesteps_warn_where_diffusers_warns() {
    let mut s = TcdScheduler::new(TcdConfig::sd15()).expect("scheduler");
    s.set_timesteps(None, None, Some(&[999, 759, 499, 259]), 1.0)
        .expect("valid custom timesteps");
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    s.set_timesteps(None, None, Some(&[800, 600, 300, 5]), 1.0)
        .expect("valid custom timesteps");
    assert_eq!(s.warnings().len(), 2, "{:?}", s.warnings());
}

#[test]
fn runs_match_diffusers() {
    let fx = fixture();
    assert!(!fx.runs.is_empty());
    for run in &fx.runs {
        let mut s = scheduler(&fx, &run.config);
        s.set_timesteps(
            run.num_inference_steps,
            None,
            run.custom_timesteps.as_deref(),
            run.strength,
        )
        .expect("set_timesteps");
        if let Some(b) = run.begin_index {
            s.set_begin_index(b);
        }
        let want_ts: Vec<i64> = run.steps.iter().map(|st| st.timestep).collect();
        assert_eq!(s.timesteps(), &want_ts[..], "{}: timesteps", run.config);
        let mut generator = TorchGenerator::new(run.noise_seed);
        let mut sample = run.initial_sample.array();
        for (i, st) in run.steps.iter().enumerate() {
            let label = format!(
                "{} steps={:?} custom={:?} strength={} eta={} step {i} (t={})",
                run.config,
                run.num_inference_steps,
                run.custom_timesteps,
                run.strength,
                run.eta,
                st.timestep
            );
            let out = s
                .step(
                    &st.model_output.array(),
                    st.timestep,
                    &sample,
                    run.eta,
                    &mut generator,
                )
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let e1 = rel_err(&out.pred_noised_sample, &st.pred_noised_sample.array());
            let e2 = rel_err(&out.prev_sample, &st.prev_sample.array());
            assert!(e1 <= 1e-5, "{label}: pred_noised_sample off by {e1}");
            assert!(e2 <= 1e-5, "{label}: prev_sample off by {e2}");
            // Continue from diffusers' own sample so errors cannot compound.
            sample = st.prev_sample.array();
        }
    }
}

#[test]
fn add_noise_matches_diffusers() {
    let fx = fixture();
    let s = scheduler(&fx, &fx.add_noise.config);
    let original = fx.add_noise.original.array();
    let noise = fx.add_noise.noise.array();
    for case in &fx.add_noise.cases {
        let got = s
            .add_noise(&original, &noise, &case.timesteps)
            .expect("add_noise");
        let err = rel_err(&got, &case.noisy.array());
        assert!(err <= 1e-6, "timesteps {:?}: off by {err}", case.timesteps);
    }
    assert!(s.add_noise(&original, &noise, &[1, 2, 3]).is_err());
    assert!(s.add_noise(&original, &noise, &[1000]).is_err());
    assert!(s.add_noise(&original, &noise, &[-1]).is_err());
}

#[test]
fn step_errors_match_diffusers() {
    let fx = fixture();
    for case in &fx.step_errors {
        let mut s = scheduler(&fx, "sd15");
        if case.set_timesteps {
            s.set_timesteps(Some(case.steps), None, None, 1.0)
                .expect("set_timesteps");
        }
        let x = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 3, 5]));
        let result = s.step(&x, case.timestep, &x, case.eta, &mut TorchGenerator::new(0));
        match &case.error {
            Some(kind) => assert!(result.is_err(), "{}: diffusers raised {kind}", case.name),
            None => assert!(result.is_ok(), "{}", case.name),
        }
    }
}

#[test]
fn invalid_requests_are_refused() {
    let mut s = TcdScheduler::new(TcdConfig::sd15()).expect("scheduler");
    // Beyond diffusers' own checks: strength outside (0, 1] and negative custom timesteps.
    assert!(s.set_timesteps(Some(4), None, None, 1.5).is_err());
    assert!(s.set_timesteps(Some(4), None, None, 0.0).is_err());
    assert!(s.set_timesteps(Some(4), None, None, f64::NAN).is_err());
    assert!(s.set_timesteps(Some(0), None, None, 1.0).is_err());
    assert!(s.set_timesteps(None, None, Some(&[]), 1.0).is_err());
    assert!(s.set_timesteps(None, None, Some(&[500, -1]), 1.0).is_err());
    assert!(s
        .set_timesteps(None, None, Some(&[999, 500, 100]), 0.1)
        .is_err());
    s.set_timesteps(Some(4), None, None, 1.0).expect("valid");
    let x = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 3, 5]));
    let mut g = TorchGenerator::new(0);
    assert!(s.step(&x, 999, &x, 1.5, &mut g).is_err());
    assert!(s.step(&x, 999, &x, f32::NAN, &mut g).is_err());
    let y = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 3, 4]));
    assert!(s.step(&y, 999, &x, 0.3, &mut g).is_err());
    let bad = TcdConfig {
        trained_betas: Some(vec![0.01; 10]),
        ..TcdConfig::sd15()
    };
    assert!(TcdScheduler::new(bad).is_err());
    assert!(TcdConfig::from_json(r#"{"beta_schedule": "karras"}"#).is_err());
    assert!(TcdConfig::from_json(r#"{"prediction_type": "flow"}"#).is_err());
}
