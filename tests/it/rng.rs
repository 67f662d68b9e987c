//! `TorchGenerator` against torch's CPU generator.
//!
//! The reference numbers come from `tests/fixtures/rng.json`, written by
//! `tests/golden/make_rng.py` from real torch; every value is compared bit for bit.

use serde::Deserialize;
use tcd_ort::rng::TorchGenerator;

#[derive(Deserialize)]
struct Fixture {
    randn: Vec<Case>,
    rand: Case,
}

#[derive(Deserialize)]
struct Case {
    #[serde(default)]
    name: String,
    seed: u64,
    calls: Vec<Call>,
}

#[derive(Deserialize)]
struct Call {
    shape: Vec<usize>,
    numel: usize,
    bits: Option<Vec<u32>>,
    head: Option<Vec<u32>>,
    tail: Option<Vec<u32>>,
    fnv1a64: Option<String>,
}

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rng.json");
    let text = std::fs::read_to_string(path).expect("read tests/fixtures/rng.json");
    serde_json::from_str(&text).expect("parse tests/fixtures/rng.json")
}

fn fnv1a64(bits: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in bits {
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn check(name: &str, index: usize, call: &Call, got: &[f32]) {
    let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
    assert_eq!(bits.len(), call.numel, "{name} call {index}: element count");
    if let Some(expect) = &call.bits {
        for (i, (a, b)) in bits.iter().zip(expect).enumerate() {
            assert_eq!(
                a,
                b,
                "{name} call {index} element {i}: got {} want {}",
                f32::from_bits(*a),
                f32::from_bits(*b)
            );
        }
        return;
    }
    let head = call.head.as_ref().expect("large case has a head");
    let tail = call.tail.as_ref().expect("large case has a tail");
    assert_eq!(&bits[..head.len()], &head[..], "{name} call {index}: head");
    assert_eq!(
        &bits[bits.len() - tail.len()..],
        &tail[..],
        "{name} call {index}: tail"
    );
    let hash = call.fnv1a64.as_ref().expect("large case has a hash");
    assert_eq!(&fnv1a64(&bits), hash, "{name} call {index}: hash");
}

#[test]
fn randn_matches_torch_bit_for_bit() {
    let fx = fixture();
    assert!(!fx.randn.is_empty());
    for case in &fx.randn {
        let mut g = TorchGenerator::new(case.seed);
        for (i, call) in case.calls.iter().enumerate() {
            let t = g.randn(&call.shape);
            assert_eq!(t.shape(), &call.shape[..]);
            let data: Vec<f32> = t.iter().copied().collect();
            check(&case.name, i, call, &data);
        }
    }
}

#[test]
fn rand_matches_torch_bit_for_bit() {
    let fx = fixture();
    let mut g = TorchGenerator::new(fx.rand.seed);
    for (i, call) in fx.rand.calls.iter().enumerate() {
        let data: Vec<f32> = g.rand(&call.shape).iter().copied().collect();
        check("rand", i, call, &data);
    }
}

#[test]
fn seeds_differing_above_bit_31_match() {
    // torch seeds mt19937 with the low 32 bits only.
    let a = TorchGenerator::new(7).randn(&[40]);
    let b = TorchGenerator::new((1 << 32) + 7).randn(&[40]);
    assert_eq!(a, b);
}

#[test]
fn randn_like_uses_the_shape() {
    let like = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 3, 4]));
    let a = TorchGenerator::new(3).randn_like(&like);
    let b = TorchGenerator::new(3).randn(&[2, 3, 4]);
    assert_eq!(a, b);
}
