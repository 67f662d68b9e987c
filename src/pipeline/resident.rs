//! Inputs that stay where the UNet and the ControlNets read them for a whole generation
//! (issue #7): the text conditioning and the control images are placed once per generation,
//! the zero ControlNet residuals once per shape for the engine's lifetime. Only the latents and
//! the timestep go to the device every step, and only the noise prediction comes back: the
//! ControlNets' residuals are scaled and summed where the UNet reads them
//! ([`super::controlnet::ResidualSum`]), with the step scales placed once per generation.

use ndarray::{ArrayD, IxDyn};

use super::conditioning::Conditioning;
use super::controlnet::{ControlState, ResidualSum};
use super::ControlNet;
use crate::runtime::builtin::SCALED_SUM_SCALE;
use crate::runtime::{Feed, Graph, PlacedTensor, TensorInput};
use crate::{Error, Result};

/// Conditioning inputs placed on one graph.
#[derive(Debug, Default)]
pub(super) struct PlacedInputs(Vec<PlacedTensor>);

impl PlacedInputs {
    /// Places `encoder_hidden_states` and, for SDXL, `text_embeds` and `time_ids` on `graph`.
    fn conditioning(graph: &Graph, cond: &Conditioning) -> Result<Self> {
        let mut placed = vec![graph.place(
            "encoder_hidden_states",
            TensorInput::F32(cond.hidden_states.clone()),
        )?];
        if let Some(pooled) = &cond.pooled {
            placed.push(graph.place("text_embeds", TensorInput::F32(pooled.clone()))?);
        }
        if let Some(time_ids) = &cond.time_ids {
            placed.push(graph.place("time_ids", TensorInput::F32(time_ids.clone()))?);
        }
        Ok(PlacedInputs(placed))
    }

    /// The placed tensor for `input`, else `host` copied for this run.
    pub(super) fn feed<'a>(&'a self, input: &str, host: &ArrayD<f32>) -> Feed<'a> {
        match self.0.iter().find(|p| p.input() == input) {
            Some(p) => Feed::Placed(p),
            None => Feed::Host(TensorInput::F32(host.clone())),
        }
    }

    /// The inputs every denoiser (UNet or ControlNet) takes: the step's latents and timestep
    /// from the host, the conditioning as placed (SDXL's pooled embeddings and time ids when
    /// present).
    pub(super) fn denoiser_inputs<'a>(
        &'a self,
        sample: ArrayD<f32>,
        timestep: ArrayD<f32>,
        cond: &Conditioning,
    ) -> Vec<(&'static str, Feed<'a>)> {
        let mut inputs = vec![
            ("sample", Feed::Host(TensorInput::F32(sample))),
            ("timestep", Feed::Host(TensorInput::F32(timestep))),
            (
                "encoder_hidden_states",
                self.feed("encoder_hidden_states", &cond.hidden_states),
            ),
        ];
        if let Some(pooled) = &cond.pooled {
            inputs.push(("text_embeds", self.feed("text_embeds", pooled)));
        }
        if let Some(time_ids) = &cond.time_ids {
            inputs.push(("time_ids", self.feed("time_ids", time_ids)));
        }
        inputs
    }
}

/// What one generation placed: the UNet's conditioning and, per ControlNet, its conditioning
/// and control image.
#[derive(Debug, Default)]
pub(super) struct Resident {
    pub(super) unet: PlacedInputs,
    pub(super) controlnets: Vec<PlacedInputs>,
    /// The ControlNet scales of this generation (by bit pattern), placed for the sum graphs.
    scales: Vec<(u32, PlacedTensor)>,
}

impl Resident {
    /// Places the inputs that stay the same over the generation; `None` when IoBinding is off.
    pub(super) fn place(
        enabled: bool,
        unet: &Graph,
        (controlnets, summer): (&[ControlNet], Option<&ResidualSum>),
        cond: &Conditioning,
        control: Option<&ControlState>,
    ) -> Result<Option<Self>> {
        if !enabled {
            return Ok(None);
        }
        let mut unet_inputs = PlacedInputs::conditioning(unet, cond)?;
        for (name, value) in &cond.ip_adapter {
            unet_inputs
                .0
                .push(unet.place(name, TensorInput::F32(value.clone()))?);
        }
        let mut resident = Resident {
            unet: unet_inputs,
            controlnets: Vec::new(),
            scales: Vec::new(),
        };
        if let (Some(state), Some(summer)) = (control, summer) {
            for scale in state.distinct_scales() {
                let value = ArrayD::from_elem(IxDyn(&[]), scale);
                let placed = summer
                    .scale_graph()
                    .place(SCALED_SUM_SCALE, TensorInput::F32(value))?;
                resident.scales.push((scale.to_bits(), placed));
            }
        }
        if let Some(state) = control {
            for (net, image) in controlnets.iter().zip(state.images()) {
                let mut placed = PlacedInputs::conditioning(net.graph(), cond)?;
                placed.0.push(
                    net.graph()
                        .place("controlnet_cond", TensorInput::F32(image.clone()))?,
                );
                resident.controlnets.push(placed);
            }
        }
        Ok(Some(resident))
    }

    /// The placed ControlNet scale `scale`, or the scalar from the host if it was not placed.
    pub(super) fn scale(&self, scale: f32) -> Feed<'_> {
        match self
            .scales
            .iter()
            .find(|(bits, _)| *bits == scale.to_bits())
        {
            Some((_, placed)) => Feed::Placed(placed),
            None => Feed::Host(TensorInput::F32(ArrayD::from_elem(IxDyn(&[]), scale))),
        }
    }
}

/// Runs `graph` bound (`resident` inputs placed) or plainly, with the same results.
pub(super) fn run(
    graph: &mut Graph,
    bound: bool,
    inputs: Vec<(&str, Feed<'_>)>,
    wanted: &[&str],
) -> Result<Vec<ArrayD<f32>>> {
    if bound {
        return graph.run_bound(inputs, wanted);
    }
    let host = inputs
        .into_iter()
        .map(|(name, feed)| match feed {
            Feed::Host(data) => Ok((name, data)),
            Feed::Placed(p) => Err(Error::Runtime(format!(
                "input '{}' was placed for IoBinding, which is off",
                p.input()
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    graph.run(host, wanted)
}

/// Values made once per key and kept for later requests, the oldest dropped beyond `capacity`
/// keys (zero residuals per UNet batch and latent size: a few MB to a few hundred MB each).
#[derive(Debug)]
pub(super) struct ShapeCache<V> {
    entries: Vec<(Vec<usize>, V)>,
    capacity: usize,
}

impl<V> ShapeCache<V> {
    /// An empty cache holding at most `capacity` keys (at least one).
    pub(super) fn new(capacity: usize) -> Self {
        ShapeCache {
            entries: Vec::new(),
            capacity: capacity.max(1),
        }
    }

    /// The value for `key`, made by `make` if there is none yet.
    pub(super) fn get_or_try_insert(
        &mut self,
        key: &[usize],
        make: impl FnOnce() -> Result<V>,
    ) -> Result<&V> {
        let index = match self.entries.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                let value = make()?;
                if self.entries.len() >= self.capacity {
                    self.entries.remove(0);
                }
                self.entries.push((key.to_vec(), value));
                self.entries.len() - 1
            }
        };
        Ok(&self.entries[index].1)
    }

    /// Drops every value.
    pub(super) fn clear(&mut self) {
        self.entries.clear();
    }

    /// How many keys are cached.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shape_is_made_once() {
        let mut cache = ShapeCache::new(2);
        let mut made = 0;
        for key in [[2, 8, 8], [2, 8, 8], [1, 8, 8], [2, 8, 8], [1, 8, 8]] {
            let v = cache
                .get_or_try_insert(&key, || {
                    made += 1;
                    Ok(key.iter().product::<usize>())
                })
                .expect("made");
            assert_eq!(*v, key.iter().product::<usize>());
        }
        assert_eq!(made, 2, "one upload per shape");
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn the_oldest_shape_goes_beyond_capacity_and_failures_are_not_cached() {
        let mut cache = ShapeCache::new(1);
        let mut made = 0;
        let mut get = |cache: &mut ShapeCache<usize>, key: [usize; 1]| {
            cache
                .get_or_try_insert(&key, || {
                    made += 1;
                    Ok(key[0])
                })
                .copied()
        };
        assert_eq!(get(&mut cache, [1]).ok(), Some(1));
        assert_eq!(get(&mut cache, [2]).ok(), Some(2));
        assert_eq!(get(&mut cache, [1]).ok(), Some(1));
        assert_eq!(made, 3);
        assert_eq!(cache.len(), 1);
        let failed = cache.get_or_try_insert(&[3], || Err(Error::Runtime("no device".into())));
        assert!(failed.is_err());
        assert_eq!(cache.len(), 1);
    }
}
