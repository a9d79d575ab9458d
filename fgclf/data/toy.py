"""A procedural fine-grained bird dataset written in the CUB-200-2011 layout.

Classes differ only by small local attributes (beak shape, crown colour, wing bar, eye ring,
tail shape, breast spots), the way CUB species do; body colour, pose, scale, position,
background, clutter, lighting, occlusion and blur vary at random and are shared by all
classes, so global image statistics do not reveal the class. Everything is deterministic
from the seed: each image has its own generator seeded by (seed, class, index).

    python -m fgclf.data.toy --root /tmp/toy_cub --num-classes 12 --image-size 96
"""
from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fgclf.errors import UserError
from fgclf.utils import atomic_write_json, cache_dir, replace_dir

FORMAT_VERSION = 1
TOY_DEFAULTS = dict(num_classes=12, train_per_class=30, test_per_class=20, image_size=96, seed=0)
_MANIFESTS = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt",
              "bounding_boxes.txt")

# Attribute vocabulary; the first value of each is the "default" left out of class names.
_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "beak": ("cone", "long", "hooked"), "crown": ("red", "blue", "yellow", "black"),
    "wing_bar": ("none", "white", "yellow"), "eye_ring": ("none", "white"),
    "tail": ("rounded", "forked"), "breast": ("plain", "spotted")}
_NAME_TOKENS = {  # one token per value, "" for at most one value: names stay unique
    "eye_ring": ("", "Spectacled"), "breast": ("", "Spotted"),
    "crown": ("Red_Crowned", "Blue_Crowned", "Yellow_Crowned", "Black_Crowned"),
    "wing_bar": ("", "White_Barred", "Yellow_Barred"), "tail": ("", "Forktailed"),
    "beak": ("Conebeak", "Longbeak", "Hookbeak")}
_NAME_ORDER = ("eye_ring", "breast", "crown", "wing_bar", "tail", "beak")
_CROWN_RGB = {"red": (205, 30, 30), "blue": (35, 75, 215), "yellow": (240, 210, 30),
              "black": (20, 20, 20)}
_BAR_RGB = {"white": (245, 245, 240), "yellow": (245, 215, 40)}
_BODY_PALETTE = ((125, 88, 58), (112, 118, 62), (128, 128, 122), (88, 100, 122), (165, 95, 52),
                 (182, 152, 112), (66, 92, 66), (98, 78, 62), (150, 120, 140))
_BEAK_PALETTE = ((55, 55, 55), (190, 170, 120), (215, 130, 40))
# Clutter deliberately reuses the attribute colours so a red or yellow pixel is no class cue.
_CLUTTER_PALETTE = ((70, 50, 30), (110, 80, 50), (60, 110, 40), (90, 140, 60), (140, 150, 90),
                    (120, 120, 120), *_CROWN_RGB.values(), *_BAR_RGB.values())


def list_toy_attributes() -> dict[str, list[str]]:
    """The attribute vocabulary: ``{attribute: [values...]}`` (first value = the plain one)."""
    return {k: list(v) for k, v in _ATTRIBUTES.items()}


def default_toy_root(params: dict | None = None) -> Path:
    """Where the toy dataset lives by default: ``<fgclf cache>/datasets/toy_cub`` for the default
    parameters, ``toy_cub_<the parameters that differ>`` otherwise, so runs with other toy
    parameters never regenerate (and delete) the images another run is reading."""
    p = {**TOY_DEFAULTS, **(params or {})}
    changed = [f"{k}{int(p[k])}" for k in TOY_DEFAULTS if int(p[k]) != TOY_DEFAULTS[k]]
    return cache_dir("datasets") / ("toy_cub" + ("_" + "_".join(changed) if changed else ""))


def _validate(params: dict) -> dict:
    unknown = sorted(set(params) - set(TOY_DEFAULTS))
    if unknown:
        raise UserError(f"unknown toy dataset parameter(s) {unknown}; known: {sorted(TOY_DEFAULTS)}")
    p = {**TOY_DEFAULTS, **params}
    for key, value in p.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UserError(f"toy dataset {key} must be an integer, got {value!r}")
        p[key] = int(value)
    limits = {"num_classes": 2, "train_per_class": 1, "test_per_class": 1, "image_size": 32, "seed": 0}
    for key, low in limits.items():
        if p[key] < low:
            raise UserError(f"toy dataset {key} must be >= {low}, got {p[key]}")
    n_max = math.prod(len(v) for v in _ATTRIBUTES.values())
    if p["num_classes"] > n_max:
        raise UserError(f"toy dataset num_classes must be <= {n_max} "
                        f"(distinct attribute combinations), got {p['num_classes']}")
    return p


def _class_combos(num_classes: int) -> list[tuple[int, ...]]:
    """Attribute-value indices per class: a deterministic walk where each class differs from
    the previous one in exactly one attribute while possible, preferring rarely used values
    and attributes changed least recently (so every attribute varies among few classes)."""
    sizes = [len(v) for v in _ATTRIBUTES.values()]
    counts = [[0] * s for s in sizes]
    last_changed = [-1] * len(sizes)
    combo = (0,) * len(sizes)
    order, used = [], set()
    all_combos = [tuple(int(i) for i in c) for c in np.ndindex(*sizes)]
    while True:
        order.append(combo)
        used.add(combo)
        for a, v in enumerate(combo):
            counts[a][v] += 1
        if len(order) == num_classes:
            return order
        prev = combo

        def key(c: tuple[int, ...]) -> tuple:
            diff = [a for a in range(len(c)) if c[a] != prev[a]]
            return (len(diff), sum(counts[a][c[a]] for a in diff),
                    max(last_changed[a] for a in diff), c)

        combo = min((c for c in all_combos if c not in used), key=key)
        for a in range(len(sizes)):
            if combo[a] != prev[a]:
                last_changed[a] = len(order)


def _combo_attrs(combo: tuple[int, ...]) -> dict[str, str]:
    return {name: values[i] for (name, values), i in zip(_ATTRIBUTES.items(), combo)}


def _class_name(attrs: dict[str, str]) -> str:
    tokens = [_NAME_TOKENS[a][_ATTRIBUTES[a].index(attrs[a])] for a in _NAME_ORDER]
    return "_".join(t for t in tokens if t)


def toy_classes(num_classes: int) -> list[tuple[str, dict[str, str]]]:
    """``[(class_name, attributes), ...]`` of the first ``num_classes`` toy classes."""
    _validate({"num_classes": num_classes})
    return [(_class_name(_combo_attrs(c)), _combo_attrs(c)) for c in _class_combos(num_classes)]


# ----------------------------------------------------------------------------- drawing

def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _ellipse(cx: float, cy: float, rx: float, ry: float, rot: float = 0.0, n: int = 28,
             pointed: bool = False) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    s = np.sin(t)
    y = ry * (np.sign(s) * np.abs(s) ** 1.6 if pointed else s)  # pointed = leaf shape
    return _rotate(np.stack([rx * np.cos(t), y], 1), rot) + (cx, cy)


def _poly(*pts: tuple[float, float]) -> np.ndarray:
    return np.asarray(pts, dtype=np.float64)


def _bird_parts(attrs: dict[str, str], scene: dict) -> list[tuple[np.ndarray, tuple]]:
    """Polygons in bird-local units (body centre at 0, facing +x, y down), back to front."""
    asp, body = scene["aspect"], scene["body_rgb"]
    dark = tuple(int(v * 0.68) for v in body)
    hx, hy, hr = 0.42 * asp, -0.26, 0.2
    parts = []
    if attrs["tail"] == "forked":
        tail = _poly((-0.38, -0.09), (-1.02, -0.24), (-0.76, 0.02), (-1.02, 0.26), (-0.38, 0.09))
    else:
        tail = np.vstack([_poly((-0.38, 0.15)), _ellipse(-0.74, 0.0, 0.3, 0.17)[7:22],
                          _poly((-0.38, -0.15))])  # a fan: the back half of an ellipse
    tail = _rotate(tail + (0.4, 0), 0.25) + (-0.4 * asp, 0.0)  # droops below the body axis
    parts.append((tail, dark))
    for x0 in (0.06, -0.1):
        parts.append((_poly((x0, 0.2), (x0 + 0.035, 0.2), (x0 - 0.02, 0.46), (x0 - 0.055, 0.46)),
                      (60, 50, 40)))
    parts.append((_ellipse(0, 0, 0.5 * asp, 0.3 / asp, 0.05), body))
    parts.append((_ellipse(0.22 * asp, 0.1, 0.26, 0.17, 0.3), scene["breast_rgb"]))
    if attrs["breast"] == "spotted":
        for dx, dy in ((0.12, 0.02), (0.24, 0.06), (0.33, 0.13), (0.12, 0.15), (0.24, 0.2)):
            parts.append((_ellipse(dx * asp, dy, 0.055, 0.05, n=12), tuple(int(v * 0.35) for v in body)))
    wing_rot = -0.12
    parts.append((_ellipse(-0.1, -0.04, 0.38 * asp, 0.17, wing_rot), dark))
    if attrs["wing_bar"] != "none":
        x0, x1, ry = -0.01, 0.14, 0.17 * 0.95  # a band across the wing between two chords
        band = _poly(*[(x, sign * ry * math.sqrt(1 - (x / 0.38) ** 2))
                       for x, sign in ((x0, -1), (x1, -1), (x1, 1), (x0, 1))])
        band = _rotate(band * (asp, 1), wing_rot) + (-0.1, -0.04)
        parts.append((band, _BAR_RGB[attrs["wing_bar"]]))
    parts.append((_ellipse(hx, hy, hr, hr), body))
    a = np.linspace(math.radians(-158), math.radians(-22), 14)  # crown: top cap of the head
    parts.append((np.stack([hx + hr * 1.02 * np.cos(a), hy + hr * 1.02 * np.sin(a)], 1),
                  _CROWN_RGB[attrs["crown"]]))
    ex, ey = hx + 0.06, hy + 0.01
    if attrs["eye_ring"] == "white":
        parts.append((_ellipse(ex, ey, 0.09, 0.09, n=16), (245, 245, 245)))
    parts.append((_ellipse(ex, ey, 0.045, 0.045, n=12), (10, 10, 10)))
    bx, by = hx + 0.14, hy + 0.02
    beak = {"cone": _poly((bx, by - 0.08), (bx + 0.19, by + 0.01), (bx, by + 0.08)),
            "long": _poly((bx, by - 0.04), (bx + 0.44, by + 0.05), (bx, by + 0.04)),
            "hooked": _poly((bx, by - 0.08), (bx + 0.12, by - 0.065), (bx + 0.2, by - 0.01),
                            (bx + 0.21, by + 0.08), (bx + 0.16, by + 0.04), (bx + 0.1, by + 0.04),
                            (bx, by + 0.07))}[attrs["beak"]]
    parts.append((beak, scene["beak_rgb"]))
    return parts


def _sample_scene(rng: np.random.Generator) -> dict:
    """Every random choice of one image, drawn in a fixed order that does not depend on the
    class, so the same image can be re-rendered with the bird switched off."""
    sc: dict = {"bg": rng.uniform(35, 215, (2, 1)) + rng.normal(0, 32, (2, 3)),  # muted colours
                "bg_dir": rng.uniform(0, 2 * np.pi), "bg_grid": rng.normal(0, 16, (6, 6, 3)),
                "texture": rng.normal(0, 9, (24, 24, 3))}
    sc["clutter"] = [dict(kind=rng.choice(["branch", "leaf", "blob"]),
                          pts=rng.uniform(-0.1, 1.1, (4, 2)), size=rng.uniform(0.04, 0.16),
                          angle=rng.uniform(0, np.pi),
                          rgb=_CLUTTER_PALETTE[rng.integers(len(_CLUTTER_PALETTE))])
                     for _ in range(rng.integers(2, 7))]
    body = np.asarray(_BODY_PALETTE[rng.integers(len(_BODY_PALETTE))]) + rng.normal(0, 10, 3)
    sc["body_rgb"] = tuple(int(v) for v in np.clip(body, 0, 255))
    breast = body + rng.uniform(0.15, 0.5) * (235 - body)  # a paler underside
    sc["breast_rgb"] = tuple(int(v) for v in np.clip(breast, 0, 255))
    sc["beak_rgb"] = _BEAK_PALETTE[rng.integers(len(_BEAK_PALETTE))]
    sc.update(aspect=rng.uniform(0.88, 1.14), angle=rng.uniform(-35, 35),
              flip=bool(rng.random() < 0.5), width_frac=rng.uniform(0.35, 0.8), pos=rng.uniform(0, 1, 2))
    sc["occluder"] = None if rng.random() >= 0.3 else dict(
        at=(rng.uniform(-0.8, 0.15), rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.4)),
        size=rng.uniform(0.25, 0.45), angle=rng.uniform(0, np.pi),
        rgb=_CLUTTER_PALETTE[rng.integers(6)])
    sc.update(brightness=rng.uniform(0.75, 1.25), contrast=rng.uniform(0.7, 1.2),
              cast=rng.uniform(0.88, 1.12, 3), blur=rng.uniform(0.3, 0.9) if rng.random() < 0.3 else 0.0,
              noise=rng.uniform(1, 6), noise_seed=int(rng.integers(2**31)),
              jpeg=int(rng.integers(45, 85)) if rng.random() < 0.25 else 0)
    return sc


def _background(sc: dict, big: int) -> Image.Image:
    yy, xx = np.mgrid[0:6, 0:6] / 5.0
    t = (np.cos(sc["bg_dir"]) * xx + np.sin(sc["bg_dir"]) * yy)
    t = (t - t.min()) / (t.max() - t.min())
    low = sc["bg"][0] * (1 - t[..., None]) + sc["bg"][1] * t[..., None] + sc["bg_grid"]
    smooth = np.asarray(Image.fromarray(np.clip(low, 0, 255).astype(np.uint8))
                        .resize((big, big), Image.BICUBIC))
    tex = np.asarray(Image.fromarray(np.clip(sc["texture"] + 128, 0, 255).astype(np.uint8))
                     .resize((big, big), Image.BILINEAR), dtype=np.int16) - 128
    img = Image.fromarray(np.clip(smooth + tex, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for c in sc["clutter"]:
        p = c["pts"] * big
        if c["kind"] == "branch":  # a gently bending stick: small turns between segments
            heading = c["angle"] * 2 + np.cumsum((c["pts"][1:, 0] - 0.5) * 0.9)
            steps = np.stack([np.cos(heading), np.sin(heading)], 1) * (0.2 + 0.25 * c["pts"][1:, 1:])
            line = np.vstack([p[:1], p[:1] + np.cumsum(steps * big, 0)])
            draw.line([tuple(q) for q in line], fill=c["rgb"],
                      width=max(1, int(c["size"] * 0.25 * big)), joint="curve")
        else:
            shape = _ellipse(*p[0], c["size"] * big, c["size"] * big * 0.45, c["angle"],
                             pointed=c["kind"] == "leaf")
            _polygon(draw, shape, c["rgb"])
    return img


def _bird_transform(sc: dict, big: int):
    """Affine map bird-local units -> supersampled pixels (flip, rotate, scale, translate).

    Size and placement come from class-independent shapes (the plain bird for the size, the
    envelope of all beak/tail variants for the fit), so changing an attribute changes only
    that part of the picture, never where the bird is."""
    a = math.radians(sc["angle"])
    m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ np.diag(
        [-1.0 if sc["flip"] else 1.0, 1.0])
    plain = {k: v[0] for k, v in _ATTRIBUTES.items()}
    shapes = [np.vstack([p for p, _ in _bird_parts({**plain, "beak": b, "tail": t}, sc)]) @ m.T
              for b in _ATTRIBUTES["beak"] for t in _ATTRIBUTES["tail"]]
    env = np.vstack(shapes)
    scale = sc["width_frac"] * big / np.ptp(shapes[0][:, 0])
    scale *= min(1.0, *(0.95 * big / (np.ptp(env, 0) * scale)))  # keep long/tall poses inside
    lo, hi = env.min(0) * scale, env.max(0) * scale
    shift = -lo + sc["pos"] * np.maximum(big - (hi - lo), 0)
    return lambda q: q @ m.T * scale + shift


def _polygon(draw: ImageDraw.ImageDraw, pts: np.ndarray, fill) -> None:
    draw.polygon([tuple(q) for q in pts], fill=fill)


def _silhouette(polygons: list[np.ndarray], big: int) -> np.ndarray:
    mask = Image.new("L", (big, big))
    draw = ImageDraw.Draw(mask)
    for q in polygons:
        _polygon(draw, q, 255)
    return np.asarray(mask) > 0


def _occluder(sc: dict, to_px, plain_bird: np.ndarray, big: int) -> np.ndarray:
    """A leaf polygon over the bird covering under 20% of it (shrunk until it does). Sized on
    the plain bird's silhouette so that it does not change with the class attributes."""
    oc = sc["occluder"]
    centre = to_px(np.asarray([oc["at"]]))[0]
    size = oc["size"] * math.sqrt(plain_bird.sum()) * 1.2
    for _ in range(8):
        leaf = _ellipse(*centre, size, size * 0.5, oc["angle"], pointed=True)
        covered = _silhouette([leaf], big)[plain_bird].mean()
        if covered <= 0.19:  # margin: the drawn bird differs from the plain one by beak/tail
            break
        size *= 0.9 * math.sqrt(0.19 / covered)
    return leaf


def _render_image(attrs: dict[str, str], sc: dict, size: int, draw_bird: bool = True,
                  info: dict | None = None) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Render one scene; returns the RGB image and the bird box (x, y, w, h) in pixels.
    ``info`` (optional) receives ``occluded``, the fraction of the bird under the leaf."""
    ss = max(2, math.ceil(256 / size))  # supersampling factor: small parts stay antialiased
    big = size * ss
    img = _background(sc, big)
    to_px = _bird_transform(sc, big)
    parts = [(to_px(pts), rgb) for pts, rgb in _bird_parts(attrs, sc)]
    draw = ImageDraw.Draw(img)
    for q, rgb in parts if draw_bird else ():
        _polygon(draw, q, rgb)
    bird = _silhouette([q for q, _ in parts], big)
    occluded = 0.0
    if sc["occluder"] is not None:
        plain = _bird_parts({k: v[0] for k, v in _ATTRIBUTES.items()}, sc)
        leaf = _occluder(sc, to_px, _silhouette([to_px(p) for p, _ in plain], big), big)
        _polygon(draw, leaf, sc["occluder"]["rgb"])
        occluded = float(_silhouette([leaf], big)[bird].mean())
    if info is not None:
        info["occluded"] = occluded
    rows, cols = np.flatnonzero(bird.any(1)), np.flatnonzero(bird.any(0))
    box = (cols[0] / ss, rows[0] / ss, (cols[-1] + 1 - cols[0]) / ss, (rows[-1] + 1 - rows[0]) / ss)
    img = img.resize((size, size), Image.BOX)
    return _photometric(img, sc), box


def _photometric(img: Image.Image, sc: dict) -> Image.Image:
    """Lighting, colour cast, blur, sensor noise and an optional low-quality JPEG pass."""
    if sc["blur"]:
        img = img.filter(ImageFilter.GaussianBlur(sc["blur"]))
    a = np.asarray(img, dtype=np.float32)
    a = (a - 128.0) * sc["contrast"] + 128.0  # fixed pivot: the bird must not shift the scene
    a = a * sc["brightness"] * sc["cast"].astype(np.float32)
    a += np.random.default_rng(sc["noise_seed"]).normal(0, sc["noise"], a.shape).astype(np.float32)
    img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    if sc["jpeg"]:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=sc["jpeg"])
        img = Image.open(buf).convert("RGB")
    return img


def render_toy_sample(seed: int, class_index: int, index: int, attrs: dict[str, str], size: int,
                      draw_bird: bool = True) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Render image ``index`` (1-based) of class ``class_index`` (0-based) exactly as written.

    Args:
        attrs: the class attributes (see :func:`toy_classes`).
        draw_bird: False renders the same scene without the bird (for tests and figures).

    Returns:
        ``(RGB image, (x, y, w, h))`` with the bird's box in pixels.
    """
    rng = np.random.default_rng([seed, class_index, index])
    return _render_image(attrs, _sample_scene(rng), size, draw_bird)


# ----------------------------------------------------------------------------- writing

def add_cub_lines(lines: dict[str, list[str]], image_id, rel: str, class_id, is_train: bool,
                  box: tuple[float, float, float, float]) -> None:
    """Append one image's lines to the CUB manifests in ``lines`` (file name -> lines)."""
    x, y, w, h = box
    lines["images.txt"].append(f"{image_id} {rel}")
    lines["image_class_labels.txt"].append(f"{image_id} {class_id}")
    lines["train_test_split.txt"].append(f"{image_id} {int(is_train)}")
    lines["bounding_boxes.txt"].append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")


def _write_dataset(out: Path, p: dict) -> None:
    classes = toy_classes(p["num_classes"])
    lines: dict[str, list[str]] = {name: [] for name in _MANIFESTS}
    image_id = 0
    for ci, (name, attrs) in enumerate(classes):
        folder = f"{ci + 1:03d}.{name}"
        (out / "images" / folder).mkdir(parents=True)
        lines["classes.txt"].append(f"{ci + 1} {folder}")
        for k in range(1, p["train_per_class"] + p["test_per_class"] + 1):
            image_id += 1
            img, box = render_toy_sample(p["seed"], ci, k, attrs, p["image_size"])
            rel = f"{folder}/{name}_{k:04d}.jpg"
            img.save(out / "images" / rel, "JPEG", quality=92, subsampling=0)
            add_cub_lines(lines, image_id, rel, ci + 1, k <= p["train_per_class"], box)
    for name, rows in lines.items():
        (out / name).write_text("\n".join(rows) + "\n")
    meta = {"format": "fgclf-toy-cub", "format_version": FORMAT_VERSION, "params": p,
            "attributes": list_toy_attributes(),
            "classes": [{"id": i + 1, "name": n, "attributes": a} for i, (n, a) in enumerate(classes)]}
    atomic_write_json(out / "toy_meta.json", meta)  # last: its presence marks a complete dataset


def generate_toy_cub(root: str | Path, *, num_classes: int = 12, train_per_class: int = 30,
                     test_per_class: int = 20, image_size: int = 96, seed: int = 0,
                     overwrite: bool = False) -> Path:
    """Generate the toy dataset in CUB-200-2011 layout under ``root``.

    Files are written to a temporary sibling folder renamed into place at the end, so ``root``
    never holds half a dataset. With ``overwrite`` an existing toy dataset (a folder holding
    ``toy_meta.json``) or an empty folder is replaced; any other non-empty folder is refused.

    Returns:
        The dataset root.
    """
    p = _validate(dict(num_classes=num_classes, train_per_class=train_per_class,
                       test_per_class=test_per_class, image_size=image_size, seed=seed))
    root = Path(root).expanduser().absolute()
    if root.exists():
        if not root.is_dir():
            raise UserError(f"toy dataset root {root} exists and is not a folder")
        if any(root.iterdir()):
            if not overwrite:
                raise UserError(f"toy dataset root {root} is not empty; "
                                "pass overwrite=True (--overwrite)")
            if not (root / "toy_meta.json").exists():
                raise UserError(f"refusing to overwrite {root}: it holds no toy_meta.json, so it is "
                                "not a toy dataset")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset should be readable like any folder
        _write_dataset(tmp, p)
        replace_dir(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _is_current(root: Path, params: dict) -> bool:
    try:
        meta = json.loads((root / "toy_meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and meta.get("format_version") == FORMAT_VERSION
            and meta.get("params") == params and all((root / m).is_file() for m in _MANIFESTS))


def ensure_toy_cub(root: str | Path | None = None, **params: int) -> Path:
    """Return a toy dataset root, generating it only when ``root`` lacks a complete dataset
    made with the same parameters (``root`` None -> :func:`default_toy_root`).

    Args:
        params: any of ``TOY_DEFAULTS``' keys; missing ones take the defaults.
    """
    p = _validate(params)
    root = default_toy_root(p) if root is None else Path(root).expanduser().absolute()
    if _is_current(root, p):
        return root
    return generate_toy_cub(root, overwrite=True, **p)


def main(argv: list[str] | None = None) -> int:
    """Command line: generate (or reuse) the toy dataset and print where it is."""
    ap = argparse.ArgumentParser(description="Generate the procedural fine-grained toy dataset "
                                             "(CUB-200-2011 layout).")
    ap.add_argument("--root", type=Path, default=None, help="output folder (default: fgclf cache)")
    for key, value in TOY_DEFAULTS.items():
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=value, help=f"default {value}")
    ap.add_argument("--overwrite", action="store_true",
                    help="regenerate even if an identical dataset exists")
    ap.add_argument("--layout", default=None,
                    help="instead: write a tiny copy of a real dataset's native layout into --root (a new "
                         "folder; cub, nabirds, stanford_cars, fgvc_aircraft, stanford_dogs, flowers102, "
                         "oxford_pets) with --num-classes, --train-per-class, --test-per-class, --image-size")
    args = ap.parse_args(argv)
    if args.layout is not None:
        from fgclf.data.layouts import write_layout

        if args.root is None:
            ap.error("--layout needs --root")
        try:
            root = write_layout(args.layout, args.root.expanduser().absolute(), num_classes=args.num_classes,
                                train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                                image_size=args.image_size, seed=args.seed)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(root)
        print(f"generated: a tiny {args.layout} copy (--data.format {args.layout} --data.root {root})")
        return 0
    p = {k: getattr(args, k) for k in TOY_DEFAULTS}
    try:
        root = default_toy_root(p) if args.root is None else args.root.expanduser().absolute()
        reused = not args.overwrite and _is_current(root, _validate(p))
        if args.overwrite:
            generate_toy_cub(root, overwrite=True, **p)
        else:
            ensure_toy_cub(root, **p)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_train, n_test = p["num_classes"] * p["train_per_class"], p["num_classes"] * p["test_per_class"]
    print(root)
    print(f"{'reused' if reused else 'generated'}: {p['num_classes']} classes, {n_train} train + "
          f"{n_test} test = {n_train + n_test} images, {p['image_size']} px, seed {p['seed']}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
