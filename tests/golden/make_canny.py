"""Builds the Canny edge fixtures: procedural photo-like test images and OpenCV's own
`cv2.Canny` of each, the ControlNet-canny preprocessor of diffusers' examples.

Run from the repository root with the pinned environment:

    .venv/bin/python tests/golden/make_canny.py [OUT_DIR]

OUT_DIR defaults to tests/fixtures/generated/canny. Everything is rewritten. Layout:

    OUT_DIR/images/<image>.png        the RGB inputs
    OUT_DIR/images/<image>_gray.png   their PIL `convert("L")`, the grayscale inputs
    OUT_DIR/edges/<case>.png          cv2.Canny's output (8-bit grey, 0 or 255)
    OUT_DIR/index.json                {"opencv": version, "cases": [{"name", "image" (relative to
                                      OUT_DIR), "gray" (true: the 1-channel input), "low",
                                      "high", "edges"}]}

The RGB cases call `cv2.Canny` on the 3-channel array exactly as diffusers' ControlNet examples
do (`cv2.Canny(np.array(image), low, high)`), so OpenCV's multi-channel rule (the channel with
the largest gradient wins at each pixel) is what the Rust side must reproduce. Thresholds include
a swapped pair, which OpenCV reorders, and fractional values, which it floors. Every expected
edge map comes from OpenCV through this script.
"""

import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

# (name, width, height, seed): sizes that are odd, not multiples of SIMD widths, and tiny.
IMAGES = [
    ("scene64", 64, 64, 1),
    ("scene100x70", 100, 70, 2),
    ("scene257x193", 257, 193, 3),
    ("scene512", 512, 512, 4),
    ("tiny3x2", 3, 2, 5),
    ("line1x9", 1, 9, 6),
]

# (low, high) pairs run on every image; (100, 200) is diffusers' default. A 3x3 Sobel's dx and dy
# are sums over the same four corner pixels modulo 2, so L1 magnitudes are always even: only a
# fraction above an odd integer (41.5, 101.7) tells flooring the thresholds from rounding them.
THRESHOLDS = [(100, 200), (50, 150), (200, 100), (41.5, 101.7), (0, 0)]


def blur(img, sigma):
    """Separable Gaussian blur with edge replication, in float64."""
    if sigma <= 0:
        return img
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(
            k[i] * np.take(padded, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1)
        )
    return out


def scene(width, height, seed):
    """A photo-like RGB image: a lit gradient background, soft-edged shapes in several colours,
    low-contrast texture at two scales, a defocus blur and sensor noise, so that most gradients
    are weak and hysteresis and non-maximum suppression both matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u = x / max(width - 1, 1)
    v = y / max(height - 1, 1)
    base = rng.uniform(60, 190, 3)
    tilt = rng.uniform(-60, 60, (2, 3))
    img = base + u[..., None] * tilt[0] + v[..., None] * tilt[1]
    # Vignetting, as a lens gives.
    img *= (1 - 0.35 * ((u - 0.5) ** 2 + (v - 0.5) ** 2))[..., None]
    for _ in range(12):
        colour = rng.uniform(0, 255, 3)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        scale = min(width, height)
        if rng.random() < 0.5:
            rx, ry = rng.uniform(0.05, 0.35, 2) * scale
            d = np.sqrt(((x - cx) / max(rx, 0.5)) ** 2 + ((y - cy) / max(ry, 0.5)) ** 2)
            edge = (d - 1) * min(rx, ry)
        else:
            angle = rng.uniform(0, np.pi)
            hw, hh = rng.uniform(0.05, 0.3, 2) * scale
            xr = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
            yr = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
            edge = np.maximum(np.abs(xr) - hw, np.abs(yr) - hh)
        softness = rng.uniform(0.3, 2.0)
        alpha = (1 / (1 + np.exp(np.clip(edge / softness, -50, 50))))[..., None]
        alpha *= rng.uniform(0.4, 1.0)
        img = img * (1 - alpha) + colour * alpha
    # Texture: fine and coarse, weak compared with the shapes' edges.
    fine = blur(rng.normal(0, 1, (height, width, 3)), 1.0)
    coarse = blur(rng.normal(0, 1, (height, width, 1)), 4.0)
    img += 45 * fine + 60 * coarse
    img = blur(img, 0.6)
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def fmt(t):
    return f"{t:g}".replace(".", "p")


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/generated/canny"
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "edges").mkdir(parents=True, exist_ok=True)
    cases = []
    for name, width, height, seed in IMAGES:
        rgb = scene(width, height, seed)
        rgb_image = Image.fromarray(rgb, "RGB")
        rgb_image.save(out / "images" / f"{name}.png")
        gray_image = rgb_image.convert("L")
        gray_image.save(out / "images" / f"{name}_gray.png")
        # Read back what was written, so the references are computed from the exact bytes the
        # Rust test loads.
        inputs = {
            False: np.array(Image.open(out / "images" / f"{name}.png").convert("RGB")),
            True: np.array(Image.open(out / "images" / f"{name}_gray.png").convert("L")),
        }
        for gray, arr in inputs.items():
            for low, high in THRESHOLDS:
                case = f"{name}_{'gray' if gray else 'rgb'}_{fmt(low)}_{fmt(high)}"
                edges = cv2.Canny(arr, low, high)
                Image.fromarray(edges, "L").save(out / "edges" / f"{case}.png")
                cases.append(
                    {
                        "name": case,
                        "image": f"images/{name}{'_gray' if gray else ''}.png",
                        "gray": gray,
                        "low": low,
                        "high": high,
                        "edges": f"edges/{case}.png",
                        "edge_fraction": float((edges > 0).mean()),
                    }
                )
    index = {"opencv": cv2.__version__, "cases": cases}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"wrote {len(cases)} Canny cases (OpenCV {cv2.__version__}) to {out}")


if __name__ == "__main__":
    main()
