"""Data-pipeline benchmark: our training item (Pillow-exact or OpenCV resampling) against a PIL pipeline doing
the same steps the way the original code does them.

    OMP_NUM_THREADS=1 python -m scripts.bench.data [--dataset cityscapes|mapillary] [--images 8] [--repeats 3]
        [--crop 1024[,W]] [--width 2048 --height 1024] [--pre-size 0] [--no-gblur] [--resample both|pil|opencv]
        [--step-time 0.5 --batch 2] [--no-centroids] [--json out.json]
    # the published crops: Cityscapes --crop 1024,2048 --no-gblur; Mapillary --dataset mapillary --width 4000
    #     --height 3000 --pre-size 2177 --crop 1024

Writes N generated street scenes to a temporary folder, in the dataset's layout and formats (Cityscapes: PNG images
and label-id PNGs; Mapillary: JPEG images, quality 90, and palette-PNG labels), then times
(median CPU time per image, the pipelines interleaved), in one process and one thread (= one DataLoader worker on a
core of its own; the centroid timing is wall time):
  * ours, per --resample: the training item of the dataset (decode, id -> train id, random scale 0.5-2
    (after --pre-size) + crop, flip, colour jitter, [Gaussian blur], normalisation), data.resample=pil (Pillow's
    values, the default) and/or opencv;
  * PIL: the same steps as the original code does them (PIL decode, resize whole image bicubic / mask nearest,
    pad + crop, flip, torchvision ColorJitter, [PIL Gaussian blur], ToTensor + Normalize);
  * the class-centroid computation (tile 1024) per 1,000 masks, one process and all cores.
With --step-time (seconds of one training step on the GPU) and --batch, it also says how many workers keep it fed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

from datasets import SampleRef
from datasets.cityscapes import CLASSES, PALETTE, CityscapesDataset, label_map
from datasets.mapillary import MapillaryDataset, read_config
from datasets.synthetic import synthetic_scene
from datasets.uniform import compute_centroids
from transforms import build_transforms
from utils.config import DataConfig


def write_mapillary(root: str, n: int, height: int, width: int) -> None:
    """A Mapillary-layout folder: config.json with the 19 Cityscapes classes and an unlabeled label, JPEG images,
    palette PNGs of label indices."""
    from PIL import Image

    labels = [{"readable": f"class {i}", "color": [int(c) for c in color], "evaluate": True}
              for i, color in enumerate(PALETTE)]
    labels.append({"readable": "Unlabeled", "color": [0, 0, 0], "evaluate": False})
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"labels": labels}, f)
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(root, "training", sub), exist_ok=True)
    to_train_ids = label_map()
    palette = [c for lab in labels for c in lab["color"]]
    for i in range(n):
        image, ids = synthetic_scene(7, "train", i, height, width)
        train_ids = to_train_ids(ids)
        index = np.where(train_ids == 255, len(PALETTE), train_ids).astype(np.uint8)  # ignore -> "Unlabeled"
        Image.fromarray(image).save(os.path.join(root, "training", "images", f"m{i:04d}.jpg"), quality=90)
        mask = Image.fromarray(index, mode="P")
        mask.putpalette(palette + [0] * (768 - len(palette)))
        mask.save(os.path.join(root, "training", "labels", f"m{i:04d}.png"))


def write_dataset(root: str, n: int, height: int, width: int) -> None:
    for i in range(n):
        city = "bench"
        for sub in ("leftImg8bit/train", "gtFine/train"):
            os.makedirs(os.path.join(root, sub, city), exist_ok=True)
        image, label = synthetic_scene(7, "train", i, height, width)
        stem = f"{city}_{i:06d}_000019"
        cv2.imwrite(os.path.join(root, "leftImg8bit/train", city, stem + "_leftImg8bit.png"),
                    cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(os.path.join(root, "gtFine/train", city, stem + "_gtFine_labelIds.png"), label)


class PILPipeline:
    """The same training steps with PIL and torchvision, the way the original pipeline does them."""

    def __init__(self, crop: tuple[int, int], scale_min: float, scale_max: float, color_aug: float, pre_size: int,
                 gblur: bool, lut: np.ndarray):
        import torchvision.transforms as T

        self.crop_h, self.crop_w = crop
        self.scale_min, self.scale_max, self.pre_size, self.gblur = scale_min, scale_max, pre_size, gblur
        self.jitter = T.ColorJitter(color_aug, color_aug, color_aug, color_aug)
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        self.lut = lut

    def __call__(self, image_path: str, mask_path: str):
        from PIL import Image, ImageFilter, ImageOps

        img = Image.open(image_path).convert("RGB")
        mask = Image.fromarray(self.lut[np.asarray(Image.open(mask_path))])
        s = random.uniform(self.scale_min, self.scale_max)
        w, h = img.size
        if self.pre_size:  # the same scale as ours (the original's own pre_size line has no effect)
            s *= self.pre_size / max(w, h)
        size = (int(w * s), int(h * s))
        img, mask = img.resize(size, Image.BICUBIC), mask.resize(size, Image.NEAREST)
        ph = (self.crop_h - size[1]) // 2 + 1 if self.crop_h > size[1] else 0
        pw = (self.crop_w - size[0]) // 2 + 1 if self.crop_w > size[0] else 0
        if ph or pw:
            img = ImageOps.expand(img, (pw, ph, pw, ph), fill=0)
            mask = ImageOps.expand(mask, (pw, ph, pw, ph), fill=255)
        w, h = img.size
        x, y = random.randint(0, w - self.crop_w), random.randint(0, h - self.crop_h)
        box = (x, y, x + self.crop_w, y + self.crop_h)
        img, mask = img.crop(box), mask.crop(box)
        if random.random() < 0.5:
            img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        img = self.jitter(img)
        if self.gblur:
            img = img.filter(ImageFilter.GaussianBlur(radius=0.15 + random.random() * 1.15))
        return self.to_tensor(img), torch.from_numpy(np.asarray(mask, np.int64))


def timed(fn, n: int, clock=time.process_time) -> float:
    """Seconds by `clock`; by default CPU seconds of this process (one thread): what one worker costs on a core
    of its own, which wall time on a shared machine overstates."""
    start = clock()
    for i in range(n):
        fn(i)
    return clock() - start


def parse_crop(text: str) -> tuple[int, int]:
    parts = [int(v) for v in text.split(",")]
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--crop takes H or H,W (positive), got {text!r}")
    return (parts[0], parts[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("cityscapes", "mapillary"), default="cityscapes",
                   help="folder layout and file formats (Mapillary: JPEG images, palette labels)")
    p.add_argument("--images", type=int, default=8, help="generated scenes")
    p.add_argument("--repeats", type=int, default=3, help="passes over the images per pipeline")
    p.add_argument("--crop", type=parse_crop, default=(1024, 1024), help="training crop H or H,W")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--pre-size", type=int, default=0, help="data.augment.long_edge: long edge before the random scale")
    p.add_argument("--no-gblur", action="store_true", help="data.augment.gaussian_blur=false (the Cityscapes recipe)")
    p.add_argument("--resample", choices=("both", "pil", "opencv"), default="both", help="data.resample to time")
    p.add_argument("--no-centroids", action="store_true", help="skip the centroid timing")
    p.add_argument("--step-time", type=float, default=0.0, help="seconds per GPU training step, to size the workers")
    p.add_argument("--batch", type=int, default=2, help="images per GPU training step")
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    cv2.setNumThreads(0)  # one worker = one thread
    root = tempfile.mkdtemp(prefix="bench_data_")
    modes = ("pil", "opencv") if args.resample == "both" else (args.resample,)
    results: dict = {"dataset": args.dataset, "images": args.images, "size": [args.width, args.height],
                     "crop": list(args.crop), "long_edge": args.pre_size, "gaussian_blur": not args.no_gblur}
    try:
        t = time.perf_counter()
        (write_mapillary if args.dataset == "mapillary" else write_dataset)(root, args.images, args.height,
                                                                              args.width)
        print(f"wrote {args.images} {args.dataset} scenes of {args.width}x{args.height} in "
              f"{time.perf_counter() - t:.1f}s")
        cfg = DataConfig.make(dataset=args.dataset, root=root, crop_size=args.crop, long_edge=args.pre_size,
                              gaussian_blur=not args.no_gblur, color_jitter=0.25)
        if args.dataset == "mapillary":
            kind, ignore = MapillaryDataset, read_config(os.path.join(root, "config.json"))[0].ignore_index
        else:
            kind, ignore = CityscapesDataset, CLASSES.ignore_index
        datasets = {m: kind(root, "train", build_transforms(cfg.updated(resample=m), True, ignore)) for m in modes}
        ds = datasets[modes[0]]
        n = args.images * args.repeats

        a = cfg.augment
        pil = PILPipeline(args.crop, a.scale_min, a.scale_max, a.color_jitter, args.pre_size, a.gaussian_blur,
                          ds.label_map._lut(256)[0])
        for d in datasets.values():
            d[SampleRef(0, 0)]  # warm-up (imports, allocations)
        pil(ds.samples[0].image, ds.samples[0].mask)
        # Interleaved, per-image medians: a shared machine's load then hits all pipelines alike.
        times: dict[str, list[float]] = {"decode": [], "pil_baseline": [], **{m: [] for m in modes}}
        for i in range(n):
            k = i % args.images
            times["decode"].append(timed(lambda _: ds.load(k), 1))
            for m, d in datasets.items():
                times[m].append(timed(lambda _: d[SampleRef(k, i)], 1))
            times["pil_baseline"].append(timed(lambda _: pil(ds.samples[k].image, ds.samples[k].mask), 1))
        median = {key: float(np.median(v)) for key, v in times.items()}
        results["decode_ms"] = 1000 * median["decode"]
        print(f"decode + id map: {1000 * median['decode']:.0f} ms/img")
        for m in modes:
            results[f"{m}_img_per_s_per_worker"] = 1 / median[m]
            results[f"{m}_ms"] = 1000 * median[m]
            print(f"ours, resample={m:6s}: {1 / median[m]:6.2f} img/s per worker ({1000 * median[m]:.0f} ms/img)")
        base = median["pil_baseline"]
        results.update({"pil_baseline_img_per_s_per_worker": 1 / base, "pil_baseline_ms": 1000 * base})
        print(f"PIL pipeline as the original: {1 / base:6.2f} img/s per worker ({1000 * base:.0f} ms/img)")

        if not args.no_centroids:
            serial = timed(lambda _: compute_centroids(ds, range(len(ds)), 19, 1024, workers=1, progress=False), 1,
                           time.perf_counter)
            cores = os.cpu_count() or 1
            parallel = timed(lambda _: compute_centroids(ds, range(len(ds)), 19, 1024, workers=cores,
                                                         progress=False), 1, time.perf_counter)
            results.update({"centroids_s_per_1000_one_process": 1000 * serial / len(ds),
                            f"centroids_s_per_1000_{cores}_processes": 1000 * parallel / len(ds)})
            print(f"centroids (tile 1024): {1000 * serial / len(ds):.0f} s per 1,000 images in one process, "
                  f"{1000 * parallel / len(ds):.0f} s with {cores} processes (few images: start-up dominates)")
        if args.step_time > 0:
            need = args.batch / args.step_time
            results["needed_img_per_s"] = need
            for m in modes:
                workers = int(np.ceil(need * median[m]))
                results[f"{m}_workers_needed"] = workers
                print(f"a {args.step_time:.2f}s step of batch {args.batch} needs {need:.1f} img/s: {workers} "
                      f"worker(s) with resample={m}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
