//! Issue #7: running the denoising loop through IoBindings (conditioning, control images and
//! zero ControlNet residuals placed once) gives the same latents as feeding every input from
//! the host at every step. On the CPU both paths run the same kernels on the same values, so
//! the latents must be bit-identical; the committed tiny models make the test self-contained.

use ndarray::{ArrayD, Dimension};
use tcd_ort::image_io::load_image;
use tcd_ort::pipeline::{ControlImage, Engine, EngineOptions, GenerateRequest, Generated};
use tcd_ort::runtime::{Feed, Graph, SessionOptions, TensorInput};

use crate::common::repo_root;

fn model(name: &str) -> String {
    repo_root()
        .join("models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn engine(io_binding: bool, controlnet: bool) -> Engine {
    let options = EngineOptions {
        intra_threads: Some(1),
        controlnets: if controlnet {
            vec![model("tiny-sd15-controlnet")]
        } else {
            Vec::new()
        },
        io_binding,
        ..EngineOptions::default()
    };
    Engine::load(model("tiny-sd15"), &options).expect("the committed tiny model loads")
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
