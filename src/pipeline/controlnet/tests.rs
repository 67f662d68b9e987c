use super::layout::halve;
use super::state::step_scales;
use super::*;
use crate::image_io::RgbImage;

fn image() -> RgbImage {
    RgbImage::new(2, 2, vec![0; 12]).expect("2x2")
}

fn with_window(start: f32, end: f32, scale: f32) -> ControlImage {
    ControlImage {
        scale,
        start,
        end,
        ..ControlImage::new(image())
    }
}

#[test]
fn keep_follows_diffusers() {
    // diffusers: keep = 1 - (i / n < start or (i + 1) / n > end).
    let scales = step_scales(
        &[with_window(0.0, 0.5, 0.5), with_window(0.25, 1.0, 1.0)],
        4,
    );
    assert_eq!(
        scales,
        vec![
            vec![0.5, 0.0],
            vec![0.5, 1.0],
            vec![0.0, 1.0],
            vec![0.0, 1.0]
        ]
    );
    // A window narrower than one step switches the ControlNet off everywhere.
    let scales = step_scales(&[with_window(0.3, 0.4, 1.0)], 2);
    assert_eq!(scales, vec![vec![0.0], vec![0.0]]);
}

#[test]
fn bad_control_requests_are_refused() {
    let ok = with_window(0.0, 1.0, 0.5);
    assert!(validate(1, std::slice::from_ref(&ok)).is_ok());
    assert!(validate(0, &[]).is_ok());
    let msg = validate(0, std::slice::from_ref(&ok))
        .expect_err("refused")
        .to_string();
    assert!(msg.contains("no ControlNet is loaded"), "{msg}");
    let msg = validate(2, std::slice::from_ref(&ok))
        .expect_err("refused")
        .to_string();
    assert!(msg.contains("1 control image(s) given for 2"), "{msg}");
    for (bad, needle) in [
        (with_window(0.5, 0.5, 1.0), "smaller than"),
        (with_window(-0.1, 1.0, 1.0), ">= 0"),
        (with_window(0.0, 1.5, 1.0), "<= 1"),
        (with_window(0.0, 1.0, f32::NAN), "from 0 to 10"),
        (with_window(0.0, 1.0, -1e30), "from 0 to 10"),
    ] {
        let msg = validate(1, &[bad]).expect_err("refused").to_string();
        assert!(msg.contains(needle), "{msg}");
    }
}

#[test]
fn residual_sizes_halve_with_ceiling() {
    assert_eq!(halve(10, 0), 10);
    assert_eq!(halve(10, 1), 5);
    assert_eq!(halve(10, 2), 3);
    assert_eq!(halve(6, 3), 1);
}
