//! A `scheduler_config.json`, then the scheduler it builds and a few timestep schedules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcd_ort::sampler::config::TcdConfig;
use tcd_ort::sampler::tcd::TcdScheduler;

fuzz_target!(|data: &[u8]| {
    let Some((&steps, json)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(json) else {
        return;
    };
    let Ok(config) = TcdConfig::from_json(text) else {
        return;
    };
    if let Ok(mut scheduler) = TcdScheduler::new(config) {
        let steps = usize::from(steps % 64);
        let _ = scheduler.set_timesteps(Some(steps), None, None, 1.0);
        let _ = scheduler.set_timesteps(Some(steps), Some(usize::from(steps)), None, 0.5);
    }
});
