"""The data.verify pass: decode every image and mask of a split before any work, in parallel worker processes.

Each sample is read as training reads it (a missing, unreadable or truncated file, OpenCV decode, label table, mask
size against image size, a Cityscapes autolabel's probability map) and, for formats without checksums (JPEG and the
rest, not PNG), decoded once more with PIL, which refuses some damaged data that OpenCV decodes with a warning.
"""
from __future__ import annotations

import logging

import cv2
from torch.utils.data import DataLoader, Dataset

from .base import DataError, SegmentationDataset, read_image

log = logging.getLogger(__name__)

SHOWN = 20  # bad files listed in the error message (all of them are returned)


def _strict_decode(path: str, kind: str) -> None:
    """Raise DataError when PIL cannot decode all of `path` (truncated data included)."""
    if path.lower().endswith(".png"):
        return  # libpng checks every chunk's CRC: OpenCV has already refused a damaged PNG
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Image.DecompressionBombError:
        return  # over Pillow's own pixel limit, yet OpenCV (whose limit the user sets) has decoded the file
    except (OSError, ValueError, SyntaxError) as e:  # PIL's decoders raise all three
        raise DataError(f"cannot fully decode {kind} (truncated or corrupt: {e}): {path}") from e


def check_sample(dataset: SegmentationDataset, index: int) -> tuple[str, str] | None:
    """(file, problem) of sample `index`, or None when its image and mask decode and agree in size."""
    sample = dataset.samples[index]
    try:
        image = read_image(sample.image)
        _strict_decode(sample.image, "image")
    except DataError as e:
        return sample.image, str(e)
    if sample.mask is None:
        return None
    try:
        mask = dataset.load_mask(index)
        _strict_decode(sample.mask, "mask")
    except DataError as e:
        return sample.mask, str(e)
    if mask.shape != image.shape[:2]:
        return sample.mask, (f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                             f"{image.shape[1]}x{image.shape[0]} (WxH): {sample.mask} (image {sample.image})")
    return None


class _Checks(Dataset):
    """check_sample of every index, as a Dataset so that DataLoader workers run it."""

    def __init__(self, dataset: SegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.samples)

    def __getitem__(self, index: int) -> tuple[str, str] | None:
        return check_sample(self.dataset, index)


def _as_is(item: tuple[str, str] | None) -> tuple[str, str] | None:
    return item


def find_bad_samples(dataset: SegmentationDataset, workers: int = 0) -> dict[int, tuple[str, str]]:
    """{sample index: (file, problem)} of every unusable sample of `dataset`, in sample order; `workers`
    processes (0: inline)."""
    if workers > 0:
        cv2.setNumThreads(0)  # OpenCV's thread pool is not fork-safe (see datasets.build_loader)
    loader = DataLoader(_Checks(dataset), batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is)
    return {index: found for index, found in enumerate(loader) if found is not None}


def find_bad_files(dataset: SegmentationDataset, workers: int = 0) -> list[tuple[str, str]]:
    """(file, problem) of every unusable sample of `dataset`, in sample order; `workers` processes (0: inline)."""
    return list(find_bad_samples(dataset, workers).values())


def problem_line(file: str, problem: str) -> str:
    """One line per bad file; the problem usually names the file already."""
    line = problem if file in problem else f"{file}: {problem}"
    return " ".join(line.split())


def verify_dataset(dataset: SegmentationDataset, workers: int = 0, skip_bad: bool = False) -> list[tuple[str, str]]:
    """Decode every image and mask of `dataset` (data.verify=true); returns the (file, problem) pairs found.

    Any bad file raises DataError listing them, one line each, unless `skip_bad` (data.skip_bad=true), in which
    case each is logged as a warning and its sample dropped from the dataset: skipped, not replaced by another, so
    that an evaluation counts every image once. Ranks decide this each for itself: datasets.agree makes them agree.
    """
    found = find_bad_samples(dataset, workers)
    bad = list(found.values())
    total = len(dataset.samples)
    if not bad:
        log.info("data.verify: %d samples of %s decode, masks match their images", total, dataset.description)
        return bad
    if skip_bad:
        if len(bad) == total:
            raise DataError(f"data.verify: all {total} samples of {dataset.description} have unusable files, e.g. "
                            f"{problem_line(*bad[0])}; check data.root")
        for file, problem in bad:
            log.warning("data.verify: %s (skipped: data.skip_bad=true)", problem_line(file, problem))
        dataset.drop_samples({index: problem_line(*pair) for index, pair in found.items()})
        log.warning("data.verify: %d of %d samples of %s skipped (data.skip_bad=true), %d left", len(bad), total,
                    dataset.description, len(dataset.samples))
        return bad
    lines = [problem_line(file, problem) for file, problem in bad[:SHOWN]]
    if len(bad) > SHOWN:
        lines.append(f"... and {len(bad) - SHOWN} more")
    raise DataError(
        f"data.verify: {len(bad)} of {total} samples of {dataset.description} have unusable files; replace or "
        "remove them, or set data.skip_bad=true to skip them\n" + "\n".join(lines)
    )
