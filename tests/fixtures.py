"""Shared set-up of the tests, in one place: tiny model widths (one row per model family), the overrides of a tiny
run on generated data, and the evaluation tests' tiny model, checkpoint and dataset."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

import network
from datasets.synthetic import generate_synthetic_cityscapes

# Tiny widths of each model family. A registered model takes the row of the family whose width option its factory
# accepts (FAMILY_OPTION), restricted to the options it has, so that a newly registered model of a known family is
# covered without an entry; a new family adds a row to both tables (tests/network/test_models.py fails for a
# registered model that no row fits).
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "deeplab": {"trunk": "resnet18", "aspp_ch": 8, "fine_ch": 8, "head_ch": 8, "attn_ch": 8},
    "ocrnet": {"trunk": "hrnet_w18_small", "mid_ch": 32, "key_ch": 16, "attn_ch": 16},
}
FAMILY_OPTION = {"deeplab": "aspp_ch", "ocrnet": "mid_ch"}


def model_family(name: str) -> str:
    """The TINY_FAMILIES row of the registered model `name`."""
    options = network.model_options(name)
    found = [family for family, key in FAMILY_OPTION.items() if key in options]
    if len(found) != 1:
        raise LookupError(f"model '{name}' (options: {', '.join(options)}) fits {len(found)} rows of TINY_FAMILIES "
                          "in tests/fixtures.py: give its family one row there")
    return found[0]


def tiny_options(name: str, **changes: Any) -> dict[str, Any]:
    """Tiny widths for the registered model `name` (its family's row, restricted to its options), with `changes`."""
    options = network.model_options(name)
    return {**{k: v for k, v in TINY_FAMILIES[model_family(name)].items() if k in options}, **changes}


def options_yaml(options: Mapping[str, Any]) -> str:
    """Model options as the YAML flow mapping of a `model.options=...` override."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}"


# The tiny run: the demo model at the tiny width, on a generated dataset of 8 training and 2 validation images.
TINY_MODEL = tiny_options("hmsa_deeplabv3plus")
TINY_MODEL_YAML = options_yaml(TINY_MODEL)
TINY_MODEL_OVERRIDE = f"model.options={TINY_MODEL_YAML}"
TINY_RUN: dict[str, Any] = {
    "data.synthetic.num_train": 8, "data.synthetic.num_val": 2, "data.synthetic.height": 64,
    "data.synthetic.width": 128, "data.augment.crop_size": "[64,64]", "data.batch_size": 4,
    "data.val_batch_size": 2, "data.num_workers": 0, "model.options": TINY_MODEL_YAML,
    "train.ckpt_interval": 2, "train.log_interval": 1, "eval.scales": "[0.5,1.0]", "eval.num_dump": 1,
}
SYNTHETIC_KEYS = ("data.synthetic.num_train", "data.synthetic.num_val", "data.synthetic.height",
                  "data.synthetic.width")


def tiny_run(changes: Mapping[str, Any] | None = None, *, root: Any = None, run: str = "run",
             max_iter: int | None = None) -> list[str]:
    """The overrides of the tiny run: TINY_RUN; with `root`, the data in root/data and the run folder root/runs/<run>;
    with `max_iter`, train.max_iter; then `changes` ({dotted key: value}; the value None leaves the key out)."""
    settings = dict(TINY_RUN)
    if root is not None:
        settings.update({"data.root": f"{root}/data", "run.output_dir": f"{root}/runs", "run.name": run})
    if max_iter is not None:
        settings["train.max_iter"] = max_iter
    settings.update(changes or {})
    return [f"{key}={value}" for key, value in settings.items() if value is not None]


# ----------------------------------------------------------------------------------------------- evaluation

NUM_VAL, HEIGHT, WIDTH = 5, 48, 96


def tiny_model(num_classes: int = 19, seed: int = 0) -> torch.nn.Module:
    """The tiny hmsa_deeplabv3plus with non-trivial BN statistics, so that predictions vary over the image."""
    torch.manual_seed(seed)
    model = network.build_model("hmsa_deeplabv3plus", num_classes, **TINY_MODEL)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def fitted_model(data_root: str, steps: int = 8) -> torch.nn.Module:
    """The tiny model after a few SGD steps on the generated images, so that images differ in IoU."""
    from datasets.cityscapes import CityscapesDataset
    from transforms import SegTransform

    items = [CityscapesDataset(data_root, split, SegTransform())[i] for split in ("train", "val")
             for i in range(NUM_VAL if split == "val" else 1)]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items])
    model = tiny_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images)["pred"], masks, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def make_setup(root: str, fit: bool = True) -> tuple[list[str], str]:
    """Generated data (1 train, NUM_VAL val images of HEIGHT x WIDTH) and a checkpoint (briefly fitted, or the
    random initialisation) under `root`; returns the eval.py overrides that use them and the checkpoint path."""
    data = os.path.join(root, "data")
    generate_synthetic_cityscapes(data, 1, NUM_VAL, HEIGHT, WIDTH, 0)
    ckpt = os.path.join(root, "tiny.pth")
    if not os.path.isfile(ckpt):
        torch.save({"model": (fitted_model(data) if fit else tiny_model()).state_dict()}, ckpt)
    overrides = [
        f"data.root={data}", "data.synthetic.num_train=1", f"data.synthetic.num_val={NUM_VAL}",
        f"data.synthetic.height={HEIGHT}", f"data.synthetic.width={WIDTH}", "data.val_batch_size=2",
        "data.num_workers=0", TINY_MODEL_OVERRIDE, f"run.output_dir={root}/runs", "eval.scales=[0.5,1.0]",
    ]
    return overrides, ckpt
