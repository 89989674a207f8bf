"""Shared set-up of the evaluation tests: a tiny multi-scale model, its checkpoint and a small generated dataset."""
from __future__ import annotations

import os

import torch

import network
from datasets.synthetic import generate_synthetic_cityscapes

TINY = {"trunk": "resnet18", "aspp_ch": 8, "fine_ch": 8, "head_ch": 8, "attn_ch": 8}
TINY_YAML = "{trunk: resnet18, aspp_ch: 8, fine_ch: 8, head_ch: 8, attn_ch: 8}"
NUM_VAL, HEIGHT, WIDTH = 5, 48, 96


def tiny_model(num_classes: int = 19, seed: int = 0) -> torch.nn.Module:
    """The tiny hmsa_deeplabv3plus with non-trivial BN statistics, so that predictions vary over the image."""
    torch.manual_seed(seed)
    model = network.build_model("hmsa_deeplabv3plus", num_classes, **TINY)
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
        "data.num_workers=0", f"model.options={TINY_YAML}", f"train.output_dir={root}/runs", "eval.scales=[0.5,1.0]",
    ]
    return overrides, ckpt
