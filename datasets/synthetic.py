"""A small procedurally generated street-scene dataset, written in the exact Cityscapes layout.

    <root>/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (Cityscapes label ids)
and, with num_extra > 0, an unlabelled "extra" split as Cityscapes' train_extra, with coarse polygon labels:
    <root>/leftImg8bit/train_extra/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtCoarse/train_extra/<city>/<city>_<seq>_<frame>_gtCoarse_labelIds.png

Scenes have large regions (sky, road, sidewalk, buildings, trees) and small or thin objects (poles, signs, people,
cars) whose size follows their distance to the horizon, so scale matters. Each class has its own mean colour, but
lighting, colour casts, texture and pixel noise make single pixels ambiguous: context is needed. Unlabelled pixels
(id 0 clutter, id 1 ego vehicle) map to ignore. The coarse labels are what a quick annotator draws: one polygon
per object, a few pixels inside its outline, small objects left out, everything else id 0 (unlabelled).

Generation is deterministic per (seed, split, image index), takes a fraction of a second per image, and is atomic:
the files are written to a temporary sibling folder that is renamed to `root` after the marker file is written.
Next to the marker, a manifest lists every file the generator wrote with its SHA-256. Regenerating with other
parameters removes exactly those files, and refuses (DataError naming them) when the folder holds anything else:
a file it did not write, one changed since, a link, or a folder of its own. Nothing it did not write is deleted.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid

import cv2
import numpy as np

from utils.files import file_lock

from .base import DataError

log = logging.getLogger(__name__)

MARKER = "synthetic_cityscapes.json"  # the parameters; written last, so its presence means "complete"
MANIFEST = "synthetic_cityscapes_files.json"  # {path relative to the root: SHA-256} of every file written
VERSION = 1
TRAIN_CITIES = ("aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf")
VAL_CITIES = ("frankfurt", "lindau", "munster")
EXTRA_CITIES = ("augsburg", "bamberg", "dortmund")  # cities of Cityscapes' train_extra
EXTRA_SPLIT = "train_extra"
SPLIT_STREAMS = {"train": 0, "val": 1, EXTRA_SPLIT: 2}  # each split's scenes come from their own random stream

# Cityscapes label ids used by the scenes.
UNLABELED, EGO, ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR = 0, 1, 7, 8, 11, 17, 20, 21, 23, 24, 26
# Mean RGB colour and texture amplitude of each label id.
COLORS = {
    ROAD: (95, 85, 105),
    SIDEWALK: (175, 145, 150),
    BUILDING: (130, 118, 100),
    POLE: (60, 60, 75),
    SIGN: (235, 195, 45),
    VEGETATION: (65, 125, 45),
    SKY: (115, 160, 215),
    PERSON: (195, 55, 75),
    CAR: (40, 70, 180),
    EGO: (25, 25, 30),
}
TEXTURE = {VEGETATION: 0.45, BUILDING: 0.12, SIDEWALK: 0.1, ROAD: 0.1, SKY: 0.04}


def _color(rng: np.random.Generator, label: int, spread: float = 14.0) -> tuple[float, float, float]:
    """The class colour with a per-object offset."""
    base = np.asarray(COLORS[label], np.float64) + rng.normal(0, spread, 3)
    return tuple(float(v) for v in np.clip(base, 0, 255))


def _draw(img, lbl, label, color, fn, *args) -> None:
    """Draw the same shape (a cv2 drawing function and its geometry) on the image and the label map."""
    fn(img, *args, color, -1)
    fn(lbl, *args, int(label), -1)


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    img = np.zeros((h, w, 3), np.float32)
    lbl = np.full((h, w), SKY, np.uint8)

    # Sky: vertical gradient, lighter at the horizon.
    top, bottom = np.asarray(_color(rng, SKY, 10)), np.asarray(_color(rng, SKY, 10)) + 40
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img[:] = (top * (1 - t) + bottom * t).astype(np.float32)

    horizon = int(h * rng.uniform(0.38, 0.55))
    # Buildings along the horizon, with windows.
    x = int(rng.integers(-w // 10, 1))
    while x < w:
        bw = int(w * rng.uniform(0.08, 0.3))
        if rng.random() < 0.8:
            y_top = max(0, int(horizon - h * rng.uniform(0.12, 0.5)))
            col = _color(rng, BUILDING, 18)
            _draw(img, lbl, BUILDING, col, cv2.rectangle, (x, y_top), (x + bw, horizon + 2))
            step = max(4, int(rng.uniform(0.02, 0.05) * w))
            win = tuple(c * 0.55 for c in col)
            for wy in range(y_top + step // 2, horizon - step // 2, step):
                for wx in range(x + step // 3, x + bw - step // 2, step):
                    cv2.rectangle(img, (wx, wy), (wx + step // 3, wy + step // 2), win, -1)
        x += bw

    # Ground: a road to a vanishing point, sidewalk on both sides; lane dashes belong to the road.
    ys = np.arange(h)[:, None]
    xs = np.arange(w)[None, :]
    vx = w * rng.uniform(0.3, 0.7)
    depth = np.clip((ys - horizon) / max(h - horizon, 1), 0, None)
    half_road = depth * w * rng.uniform(0.45, 0.8)
    ground = ys > horizon
    road = ground & (np.abs(xs - vx) < half_road)
    sidewalk = ground & ~road
    lbl[sidewalk] = SIDEWALK
    img[sidewalk] = _color(rng, SIDEWALK)
    lbl[road] = ROAD
    img[road] = _color(rng, ROAD)
    for y0 in range(horizon + 2, h, 6):
        if (y0 // 6) % 2:
            d = (y0 - horizon) / max(h - horizon, 1)
            cv2.rectangle(img, (int(vx - 1 - 2 * d), y0), (int(vx + 1 + 2 * d), y0 + 3), (205, 205, 205), -1)
    # Paving joints on the sidewalk.
    joints = sidewalk & ((ys % 7 == 0) | ((xs + ys // 7 * 3) % 11 == 0))
    img[joints] *= 0.8

    # Objects, far (near the horizon) first so that nearer ones occlude them.
    objects = []
    for kind, count in (("tree", (1, 4)), ("pole", (2, 7)), ("person", (1, 6)), ("car", (1, 4))):
        for _ in range(int(rng.integers(*count))):
            objects.append((float(rng.uniform(horizon + 3, h + 0.3 * (h - horizon))), kind))
    for yg, kind in sorted(objects):
        d = (yg - horizon) / max(h - horizon, 1)  # 0 at the horizon, 1 at the bottom edge
        road_half = d * (half_road[min(int(yg), h - 1), 0] / max(depth[min(int(yg), h - 1), 0], 1e-6))
        yg = int(yg)
        if kind == "car":
            cx = vx + rng.uniform(-0.8, 0.8) * road_half
            cw = max(6, int(w * 0.35 * d * rng.uniform(0.8, 1.2)))
            ch = max(4, int(cw * rng.uniform(0.4, 0.55)))
            x0 = int(cx - cw / 2)
            col = _color(rng, CAR, 20)
            _draw(img, lbl, CAR, col, cv2.rectangle, (x0, yg - ch), (x0 + cw, yg - ch // 4))
            _draw(img, lbl, CAR, col, cv2.rectangle, (x0 + cw // 5, yg - int(ch * 1.45)), (x0 + 4 * cw // 5, yg - ch))
            cv2.rectangle(img, (x0 + cw // 4, yg - int(ch * 1.35)), (x0 + 3 * cw // 4, yg - ch), (35, 40, 55), -1)
            r = max(1, ch // 4)
            for wx in (x0 + cw // 5, x0 + 4 * cw // 5):
                _draw(img, lbl, CAR, (20, 20, 22), cv2.circle, (wx, yg - r), r)
            continue
        side = 1 if rng.random() < 0.5 else -1
        px = int(vx + side * road_half * rng.uniform(1.05, 1.6))
        if kind == "tree":
            r = max(3, int(h * 0.3 * (0.3 + d) * rng.uniform(0.7, 1.3)))
            trunk_h = int(r * rng.uniform(0.8, 1.5))
            col = _color(rng, VEGETATION, 12)
            _draw(img, lbl, VEGETATION, (90, 65, 40), cv2.rectangle, (px - max(1, r // 6), yg - trunk_h), (px + max(1, r // 6), yg))
            _draw(img, lbl, VEGETATION, col, cv2.ellipse, (px, yg - trunk_h - r // 2), (r, int(r * 0.9)), 0, 0, 360)
        elif kind == "pole":
            ph = max(8, int(h * 0.9 * (0.25 + d) * rng.uniform(0.8, 1.2)))
            pw = max(1, int(round(3.5 * d * rng.uniform(0.7, 1.3))))
            _draw(img, lbl, POLE, _color(rng, POLE, 8), cv2.rectangle, (px, yg - ph), (px + pw - 1, yg))
            if rng.random() < 0.7:
                s = max(4, int(18 * (0.3 + d) * rng.uniform(0.7, 1.3)))
                sy = yg - ph + s // 2
                col = _color(rng, SIGN, 12)
                if rng.random() < 0.5:
                    _draw(img, lbl, SIGN, col, cv2.rectangle, (px - s // 2, sy - s // 2), (px + s // 2 + pw, sy + s // 2))
                else:
                    _draw(img, lbl, SIGN, col, cv2.circle, (px + pw // 2, sy), s // 2 + 1)
                cv2.circle(img, (px + pw // 2, sy), max(1, s // 5), (250, 250, 250), -1)
        else:  # person
            ph = max(6, int(h * 0.55 * d * rng.uniform(0.8, 1.2)))
            if rng.random() < 0.3:
                px = int(vx + rng.uniform(-0.7, 0.7) * road_half)  # crossing the road
            bw = max(1, ph // 7)
            col = _color(rng, PERSON, 20)
            _draw(img, lbl, PERSON, tuple(c * 0.6 for c in col), cv2.rectangle, (px - bw, yg - ph // 2), (px + bw, yg))
            _draw(img, lbl, PERSON, col, cv2.ellipse, (px, yg - int(ph * 0.62)), (bw + 1, max(1, ph // 5)), 0, 0, 360)
            _draw(img, lbl, PERSON, (215, 175, 145), cv2.circle, (px, yg - int(ph * 0.88)), max(1, ph // 9))

    # Unlabelled pixels: clutter (id 0) and, sometimes, the ego vehicle's bonnet (id 1).
    for _ in range(int(rng.integers(0, 3))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(horizon, h))
        s = int(rng.integers(2, max(3, h // 10)))
        _draw(img, lbl, UNLABELED, tuple(float(v) for v in rng.uniform(0, 255, 3)), cv2.rectangle, (x0, y0), (x0 + s, y0 + s))
    if rng.random() < 0.5:
        eh = int(h * rng.uniform(0.04, 0.1))
        _draw(img, lbl, EGO, _color(rng, EGO, 5), cv2.ellipse, (w // 2, h + eh), (int(w * 0.6), 2 * eh), 0, 180, 360)

    # Texture per class, lighting (brightness, colour cast, horizontal gradient, a shadow), pixel noise.
    field = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.5)
    field /= field.std() + 1e-6
    amp = np.zeros(256, np.float32)
    for k, v in TEXTURE.items():
        amp[k] = v
    img *= (1 + amp[lbl] * field)[..., None]
    gain = rng.uniform(0.7, 1.25) * rng.uniform(0.9, 1.1, 3)
    grad = 1 + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, w, dtype=np.float32)
    img *= gain.astype(np.float32)[None, None, :] * grad[None, :, None]
    if rng.random() < 0.5:
        pts = np.array([[rng.integers(0, w), h], [rng.integers(0, w), h], [rng.integers(0, w), horizon]], np.int32)
        shadow = np.zeros((h, w), np.uint8)
        cv2.fillPoly(shadow, [pts], 1)
        img[shadow.astype(bool)] *= 0.6
    img += rng.normal(0, rng.uniform(5, 12), img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), lbl


def synthetic_scene(seed: int, split: str, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: RGB uint8 [H,W,3] and Cityscapes label ids uint8 [H,W]; a pure function of its arguments.
    `split` is train, val or train_extra (any other name draws from the val stream, as before the extra split)."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS.get(split, 1), index])
    return _scene(rng, height, width)


def coarse_polygons(label: np.ndarray) -> np.ndarray:
    """Coarse label ids of a fine label map, as Cityscapes' gtCoarse: each connected region of a labelled id
    becomes one polygon (its outline eroded by about 1/64 of the image and simplified), drawn largest first so
    that objects lie on the regions around them; regions that vanish under the erosion are left out, and every
    pixel no polygon covers is id 0 (unlabelled). Deterministic."""
    h, w = label.shape
    margin = max(1, round(min(h, w) / 64))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    regions = []
    for label_id in np.unique(label):
        if label_id in (UNLABELED, EGO):
            continue
        count, comp, stats, _ = cv2.connectedComponentsWithStats((label == label_id).astype(np.uint8), connectivity=8)
        for c in range(1, count):
            x, y, bw, bh, area = (int(v) for v in stats[c])
            regions.append((area, int(label_id), c, comp, x, y, bw, bh))
    out = np.zeros_like(label)
    for _, label_id, c, comp, x, y, bw, bh in sorted(regions, key=lambda r: (-r[0], r[1], r[2])):
        # The region's bounding box with a margin (clipped to the image, whose border does not erode).
        x0, y0 = max(0, x - margin - 1), max(0, y - margin - 1)
        x1, y1 = min(w, x + bw + margin + 1), min(h, y + bh + margin + 1)
        box = (comp[y0:y1, x0:x1] == c).astype(np.uint8)
        contours, tree = cv2.findContours(cv2.erode(box, kernel), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            continue
        # Outer outlines filled, then the holes (other objects inside the region, grown by the erosion) cut out.
        shape = np.zeros_like(box)
        for is_hole in (False, True):
            polys = [cv2.approxPolyDP(ct, max(1.0, 0.02 * cv2.arcLength(ct, True)), True)
                     for ct, node in zip(contours, tree[0]) if (node[3] >= 0) == is_hole]
            polys = [p for p in polys if len(p) >= 3]
            if polys:
                cv2.fillPoly(shape, polys, 0 if is_hole else 1)
        out[y0:y1, x0:x1][shape.astype(bool)] = label_id
    return out


def _params(num_train: int, num_val: int, height: int, width: int, seed: int, num_extra: int = 0) -> dict:
    params = {"version": VERSION, "num_train": num_train, "num_val": num_val, "height": height, "width": width,
              "seed": seed}
    if num_extra:  # absent when 0: data generated before the extra split existed keeps matching its marker
        params["num_extra"] = num_extra
    return params


def _matches(marker: dict | None, params: dict) -> bool:
    """Whether the data at a marker serves a request: the same parameters, or a request without the extra split
    (num_extra 0) and data that has one besides the same train and val images (their files do not depend on it)."""
    if marker is None:
        return False
    if "num_extra" not in params:
        marker = {k: v for k, v in marker.items() if k != "num_extra"}
    return marker == params


def read_marker(root: str) -> dict | None:
    """The parameters a complete generated dataset at `root` was made with (None: not a finished one)."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(folder: str, num_train: int, num_val: int, height: int, width: int, seed: int,
           num_extra: int = 0) -> dict[str, str]:
    """Write the images and label maps under `folder`; returns the manifest {relative path: SHA-256}."""
    written: dict[str, str] = {}
    for split, n, cities in (("train", num_train, TRAIN_CITIES), ("val", num_val, VAL_CITIES),
                             (EXTRA_SPLIT, num_extra, EXTRA_CITIES)):
        for i in range(n):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            image, label = synthetic_scene(seed, split, i, height, width)
            if split == EXTRA_SPLIT:  # no fine labels: coarse polygons only
                label_rel, label = f"gtCoarse/{split}/{city}/{stem}_gtCoarse_labelIds.png", coarse_polygons(label)
            else:
                label_rel = f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"
            for rel, array in ((f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png",
                                cv2.cvtColor(image, cv2.COLOR_RGB2BGR)), (label_rel, label)):
                ok, png = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
                if not ok:
                    raise DataError(f"cannot encode generated image {rel}")
                path = os.path.join(folder, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                data = png.tobytes()
                with open(path, "wb") as f:
                    f.write(data)
                written[rel] = _sha256(data)
    return written


def read_manifest(root: str) -> dict[str, str] | None:
    """{relative path: SHA-256} of the files the generator wrote at `root` (None: no readable manifest)."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            files = json.load(f)
    except (OSError, ValueError):
        return None
    return files if isinstance(files, dict) else None


def foreign_entries(root: str, written: dict[str, str]) -> list[str]:
    """Paths under `root` (relative) that the generator did not write: files not in `written` or changed since,
    links, and folders that hold none of the written files. Sorted."""
    own_dirs = {os.path.dirname(rel) for rel in written}
    for rel in list(own_dirs):
        while rel:
            rel = os.path.dirname(rel)
            own_dirs.add(rel)
    out = []
    for d, dirs, files in os.walk(root):
        here = os.path.relpath(d, root)
        here = "" if here == "." else here
        for name in dirs:
            rel = os.path.join(here, name)
            if os.path.islink(os.path.join(d, name)) or rel not in own_dirs:
                out.append(rel + "/")
        for name in files:
            rel = os.path.join(here, name)
            path = os.path.join(d, name)
            if rel in (MARKER, MANIFEST) and not os.path.islink(path):
                continue
            if os.path.islink(path) or rel not in written:
                out.append(rel)
                continue
            with open(path, "rb") as f:
                if _sha256(f.read()) != written[rel]:
                    out.append(rel)
    return sorted(out)


def _remove_written(root: str, written: dict[str, str]) -> None:
    """Delete the generator's files at `root`, then its folders and `root` itself. The marker goes first (the
    folder stops counting as complete) and the manifest last (an interrupted removal can be finished later)."""
    for rel in [MARKER, *sorted(written), MANIFEST]:
        try:
            os.remove(os.path.join(root, rel))
        except FileNotFoundError:
            pass
    dirs = {os.path.dirname(rel) for rel in written}
    for rel in list(dirs):
        while rel:
            rel = os.path.dirname(rel)
            dirs.add(rel)
    for rel in sorted(dirs, key=len, reverse=True):  # children before their parents; "" (root) last
        try:
            os.rmdir(os.path.join(root, rel) if rel else root)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            left = foreign_entries(root, {})
            raise DataError(f"{root}: files appeared while the generated data was replaced ({', '.join(left[:5])}); "
                            "they were left in place: move them out and run again") from e


def _check_replaceable(root: str) -> dict[str, str]:
    """The manifest of the generated data at `root`, once sure that replacing it deletes nothing else."""
    written = read_manifest(root)
    if written is None:
        if read_marker(root) is not None:
            raise DataError(f"{root} was generated by an earlier version that did not record its files, so it cannot "
                            "be regenerated safely with other data.synthetic.* values: delete that folder yourself "
                            "or set data.root to a new folder")
        raise DataError(f"{root} exists and is not a generated dataset (no {MARKER}): for a downloaded Cityscapes "
                        "folder use data.dataset=cityscapes; for the generated demo data set data.root to a new "
                        "or empty folder")
    foreign = foreign_entries(root, written)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DataError(f"{root} holds {len(foreign)} file(s) the synthetic generator did not write or that changed "
                        f"since ({shown}); regenerating it (other data.synthetic.* values) would delete or mix "
                        "with them: move them out of that folder, or set data.root to a new folder")
    return written


def generate_synthetic_cityscapes(
    root: str, num_train: int = 160, num_val: int = 24, height: int = 128, width: int = 256, seed: int = 0,
    num_extra: int = 0,
) -> str:
    """Write the dataset at `root` unless a complete one with the same parameters is there; returns `root`.

    `num_extra` > 0 adds the unlabelled train_extra split with coarse labels; with 0, data that has one is
    served as it is (its train and val files are the same).

    A missing or empty `root` is filled. Generated data with other parameters is replaced: exactly the files of
    its manifest are removed. Any other content is never touched: a folder this function did not write, or
    generated data next to files it did not write (or changed since), raises DataError naming them. An
    interrupted generation leaves only a temporary folder, which the next call removes.
    """
    if num_train < 1 or num_val < 1 or height < 16 or width < 16:
        raise DataError(f"synthetic dataset needs num_train, num_val >= 1 and height, width >= 16 "
                        f"(data.synthetic.*); got {num_train}, {num_val}, {height}, {width}")
    if num_extra < 0:
        raise DataError(f"data.synthetic.num_extra must be >= 0 (0: no train_extra split), got {num_extra}")
    params = _params(num_train, num_val, height, width, seed, num_extra)
    if _matches(read_marker(root), params):
        return root
    # Serialise generation of one root between processes (e.g. the ranks of one node).
    with file_lock(os.path.abspath(root) + ".lock"):
        if _matches(read_marker(root), params):
            return root
        if os.path.exists(root) and not os.path.isdir(root):
            raise DataError(f"{root} is a file, not a folder: set data.root to a new folder for the generated data")
        replace = os.path.isdir(root) and bool(os.listdir(root))  # an empty folder is simply filled
        if replace:
            _check_replaceable(root)  # before spending time on generation
        parent, name = os.path.split(os.path.abspath(root))
        for stale in os.listdir(parent):  # left by an interrupted run (we hold the lock, so none is in progress)
            if stale.startswith(f".{name}.partial-"):
                shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
        tmp = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex}")
        os.mkdir(tmp)  # not mkdtemp: its 0700 would become the dataset folder's mode; this one follows the umask
        try:
            log.info("generating synthetic Cityscapes-layout data at %s (%d train, %d val, %d train_extra, %dx%d)",
                     root, num_train, num_val, num_extra, width, height)
            written = _write(tmp, num_train, num_val, height, width, seed, num_extra)
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(written, f, indent=0, sort_keys=True)
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump(params, f)
            if replace:
                _remove_written(root, _check_replaceable(root))  # checked again: generation took a while
            os.rename(tmp, root)  # replaces an empty folder
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root
