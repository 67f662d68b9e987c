//! Issue #7: running the denoising loop through IoBindings (conditioning, control images and
//! zero ControlNet residuals placed once) gives the same latents as feeding every input from
//! the host at every step. On the CPU both paths run the same kernels on the same values, so
//! the latents must be bit-identical; the committed tiny models make the test self-contained.

use ndarray::{ArrayD, Dimension};
use tcd_ort::image_io::load_image;
use tcd_ort::pipeline::{ControlImage, Engine, EngineOptions, GenerateRequest, Generated};
use tcd_ort::runtime::{Feed, Graph, SessionOptions, TensorInput};

use crate::common::{committed_model, repo_root};

fn engine(io_binding: bool, controlnet: bool) -> Engine {
    let options = EngineOptions {
        intra_threads: Some(1),
        controlnets: if controlnet {
            vec![committed_model("tiny-sd15-controlnet")]
        } else {
            Vec::new()
        },
        io_binding,
        ..EngineOptions::default()
    };
    Engine::load(committed_model("tiny-sd15"), &options).expect("the committed tiny model loads")
}

fn generate(engine: &mut Engine, request: &GenerateRequest) -> Generated {
    engine
        .generate(request, &mut |_| true)
        .expect("generation runs")
}

fn assert_identical(bound: &Generated, plain: &Generated, what: &str) {
    assert_eq!(bound.latents.shape(), plain.latents.shape(), "{what}");
    let differing = bound
        .latents
        .iter()
        .zip(plain.latents.iter())
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        differing, 0,
        "{what}: {differing} latents differ with and without IoBinding"
    );
    assert_eq!(
        bound.images, plain.images,
        "{what}: images differ with and without IoBinding"
    );
}

fn request(guidance: f32) -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        negative_prompt: Some("blurry".into()),
        steps: 3,
        eta: 0.3,
        guidance,
        seed: 7,
        ..GenerateRequest::default()
    }
}

#[test]
fn io_binding_matches_host_feeds_with_guidance() {
    let mut bound = engine(true, false);
    let mut plain = engine(false, false);
    assert!(bound.io_binding() && !plain.io_binding());
    let unet = bound
        .sessions()
        .into_iter()
        .find(|s| s.component == "unet")
        .expect("a unet session");
    assert!(unet.io_binding, "the UNet is reported as bound");
    assert!(
        !unet.device_inputs,
        "the CPU reads every input from host memory"
    );
    for guidance in [0.0, 2.0] {
        let request = request(guidance);
        let a = generate(&mut bound, &request);
        let b = generate(&mut plain, &request);
        assert_identical(&a, &b, &format!("guidance {guidance}"));
    }
    // A second generation reuses the zero residuals placed by the first.
    let again = generate(&mut bound, &request(2.0));
    let reference = generate(&mut plain, &request(2.0));
    assert_identical(&again, &reference, "second generation");
}

#[test]
fn io_binding_matches_host_feeds_with_a_controlnet() {
    let image = load_image(&repo_root().join("models").join("control-edges-64x64.png"))
        .expect("the committed control image");
    let request = GenerateRequest {
        control: vec![ControlImage {
            scale: 0.5,
            // The ControlNet sits out the last step: zero residuals in a ControlNet run.
            end: 0.7,
            ..ControlImage::new(image)
        }],
        ..request(2.0)
    };
    let mut bound = engine(true, true);
    let mut plain = engine(false, true);
    let a = generate(&mut bound, &request);
    let b = generate(&mut plain, &request);
    assert_identical(&a, &b, "ControlNet, guidance 2");
    // Without control images the same engines run on zero residuals.
    let a = generate(&mut bound, &request_without_control());
    let b = generate(&mut plain, &request_without_control());
    assert_identical(&a, &b, "no control images");
}

fn request_without_control() -> GenerateRequest {
    request(0.0)
}

/// The device path of a placed tensor (the session's allocator and ONNX Runtime's copy), taken
/// here in host memory: a graph reads the copy exactly as it reads the host tensor.
#[test]
fn placed_copies_feed_a_graph_like_host_tensors() {
    let path = repo_root()
        .join("models")
        .join("tiny-sd15")
        .join("vae_decoder")
        .join("model.onnx");
    tcd_ort::runtime::ensure_loaded(None).expect("ONNX Runtime");
    let options = SessionOptions {
        intra_threads: Some(1),
        ..SessionOptions::default()
    };
    let mut vae = Graph::load("vae_decoder", &path, &options).expect("the VAE decoder loads");
    let latents = ArrayD::from_shape_fn(vec![1, 4, 8, 8], |i| {
        (i.as_array_view().iter().sum::<usize>() as f32 * 0.37).sin()
    });
    let plain = vae
        .run(
            vec![("latent_sample", TensorInput::F32(latents.clone()))],
            &["sample"],
        )
        .expect("plain run");
    let host = vae
        .run_bound(
            vec![(
                "latent_sample",
                Feed::Host(TensorInput::F32(latents.clone())),
            )],
            &["sample"],
        )
        .expect("bound run from the host");
    let placed = vae
        .place_copied("latent_sample", TensorInput::F32(latents.clone()))
        .expect("placed through the session's allocator");
    assert_eq!(placed.shape(), latents.shape());
    assert_eq!(placed.input(), "latent_sample");
    assert!(!placed.on_device(), "host memory on the CPU");
    let mut copied = Vec::new();
    for _ in 0..2 {
        copied.push(
            vae.run_bound(vec![("latent_sample", Feed::Placed(&placed))], &["sample"])
                .expect("bound run from the placed copy"),
        );
    }
    assert_eq!(plain, host, "binding host tensors changes the output");
    for c in copied {
        assert_eq!(plain, c, "a placed copy changes the output");
    }
}

fn run_stats(engine: &Engine, component: &str) -> u64 {
    engine
        .run_stats()
        .into_iter()
        .filter(|(name, _)| name == component)
        .map(|(_, stats)| stats.calls)
        .sum()
}

/// Two ControlNets summed where the UNet reads them (the sum graphs) give the latents of the
/// host sum, bit for bit; steps where one or both sit out take the right graph or zeros.
#[test]
fn two_controlnets_are_summed_where_the_unet_reads_them() {
    let image = load_image(&repo_root().join("models").join("control-edges-64x64.png"))
        .expect("the committed control image");
    let net = committed_model("tiny-sd15-controlnet");
    let load = |io_binding: bool| {
        let options = EngineOptions {
            intra_threads: Some(1),
            controlnets: vec![net.clone(), net.clone()],
            io_binding,
            ..EngineOptions::default()
        };
        Engine::load(committed_model("tiny-sd15"), &options).expect("two ControlNets load")
    };
    let request = GenerateRequest {
        steps: 4,
        control: vec![
            ControlImage {
                scale: 0.5,
                // Steps 0 and 1 only.
                end: 0.5,
                ..ControlImage::new(image.clone())
            },
            ControlImage {
                scale: 0.8,
                // Steps 1 and 2 only; step 3 runs on zeros.
                start: 0.25,
                end: 0.75,
                ..ControlImage::new(image)
            },
        ],
        ..request(2.0)
    };
    let mut bound = load(true);
    let mut plain = load(false);
    let sums: Vec<_> = bound
        .sessions()
        .into_iter()
        .filter(|s| s.component.starts_with("controlnet_s"))
        .collect();
    assert_eq!(sums.len(), 2, "the scale and the sum graph are reported");
    assert!(sums.iter().all(|s| s.io_binding));
    assert!(
        !plain
            .sessions()
            .iter()
            .any(|s| s.component.starts_with("controlnet_s")),
        "without IoBinding the host sums"
    );
    let a = generate(&mut bound, &request);
    let b = generate(&mut plain, &request);
    assert_identical(&a, &b, "two ControlNets, guidance 2");
    // Steps 0, 1, 2 have a first acting ControlNet; only step 1 has a second.
    assert_eq!(run_stats(&bound, "controlnet_scale"), 3);
    assert_eq!(run_stats(&bound, "controlnet_sum"), 1);
    assert_eq!(run_stats(&bound, "controlnet"), 4);
}

/// The built scaled-sum graph computes `acc + x * scale` like the host: bit-identical in
/// float32; in float16 the product is rounded once from float32 and the sum is a float16
/// addition (PyTorch's arithmetic on half tensors).
#[test]
fn scaled_sum_graph_matches_host_arithmetic() {
    use half::f16;
    use tcd_ort::runtime::builtin::{scaled_sum, scaled_sum_acc, scaled_sum_out, scaled_sum_x};
    use tcd_ort::runtime::ElementType;

    tcd_ort::runtime::ensure_loaded(None).expect("ONNX Runtime");
    let options = SessionOptions {
        intra_threads: Some(1),
        ..SessionOptions::default()
    };
    let shape = vec![2, 3, 5, 4];
    let x: Vec<ArrayD<f32>> = (0..2)
        .map(|k| {
            ArrayD::from_shape_fn(shape.clone(), |i| {
                (i.as_array_view().iter().sum::<usize>() as f32 * 0.731 + k as f32).sin() * 7.3
            })
        })
        .collect();
    let acc = ArrayD::from_shape_fn(shape.clone(), |i| {
        (i.as_array_view().iter().product::<usize>() as f32 * 0.117).cos() * 3.1
    });
    let scale = 0.7f32;
    for dtype in [ElementType::F32, ElementType::F16] {
        let round = |v: f32| match dtype {
            ElementType::F16 => f16::from_f32(v).to_f32(),
            _ => v,
        };
        let mut first = scaled_sum("scale", 2, 4, (dtype, dtype), false, &options)
            .expect("the scale graph builds");
        let mut add =
            scaled_sum("sum", 2, 4, (dtype, dtype), true, &options).expect("the sum graph builds");
        let feed = |a: &ArrayD<f32>| Feed::Host(TensorInput::F32(a.clone()));
        let scalar = ArrayD::from_elem(vec![], scale);
        let names: Vec<String> = (0..2).map(scaled_sum_x).collect();
        let accs: Vec<String> = (0..2).map(scaled_sum_acc).collect();
        let outs: Vec<String> = (0..2).map(scaled_sum_out).collect();
        let wanted: Vec<&str> = outs.iter().map(String::as_str).collect();
        let mut inputs = vec![("scale", feed(&scalar))];
        inputs.extend(names.iter().map(String::as_str).zip(x.iter().map(feed)));
        let scaled = first
            .run_bound(inputs, &wanted)
            .expect("the scale graph runs");
        let mut inputs = vec![("scale", feed(&scalar))];
        inputs.extend(names.iter().map(String::as_str).zip(x.iter().map(feed)));
        inputs.extend(
            accs.iter()
                .map(String::as_str)
                .zip([feed(&acc), feed(&acc)]),
        );
        let summed = add.run_bound(inputs, &wanted).expect("the sum graph runs");
        for k in 0..2 {
            // The inputs as the graph saw them (rounded to float16 when it takes float16).
            let expect_scaled = x[k].mapv(|v| round(round(v) * scale));
            let expect_sum = ndarray::Zip::from(&expect_scaled)
                .and(&acc)
                .map_collect(|&s, &a| round(round(a) + s));
            let bits = |a: &ArrayD<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&scaled[k]),
                bits(&expect_scaled),
                "{dtype:?} x * scale"
            );
            if dtype == ElementType::F32 {
                assert_eq!(
                    bits(&summed[k]),
                    bits(&expect_sum),
                    "{dtype:?} acc + x * scale"
                );
            } else {
                // ONNX Runtime's CPU provider has no float16 Add: it adds in float32 and drops
                // the rounding of the product in between (CUDA adds in float16). A sum is then
                // off by at most half a float16 step of the product plus one of the sum.
                let step = |v: f32| 2f32.powi(v.abs().log2().floor().max(-14.0) as i32 - 10);
                for ((got, want), product) in summed[k]
                    .iter()
                    .zip(expect_sum.iter())
                    .zip(expect_scaled.iter())
                {
                    let bound = 0.5 * step(*product) + step(*want);
                    assert!(
                        (got - want).abs() <= bound,
                        "{dtype:?} acc + x * scale: {got} for {want}"
                    );
                }
            }
        }
    }
    let msg = scaled_sum(
        "bad",
        1,
        4,
        (ElementType::I64, ElementType::F32),
        false,
        &options,
    )
    .expect_err("integer tensors are refused")
    .to_string();
    assert!(msg.contains("float32 or float16"), "{msg}");
}
