"""The original's snapshot files and HRNet ImageNet files load into the HRNet-OCR models (narrow widths)."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from network import build_model
from tests.fixtures import tiny_options
from utils.checkpoint import CheckpointError, load_checkpoint, load_trunk_weights

CLASS_HEADS = {"ocr.cls_head.weight", "ocr.cls_head.bias", "ocr.aux_head.2.weight", "ocr.aux_head.2.bias"}
SCALE_ATTN = {
    f"scale_attn.{m}.{p}"
    for m, ps in (("conv0", ["weight"]), ("conv1", ["weight"]), ("conv2", ["weight"]),
                  ("bn0", ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]),
                  ("bn1", ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]))
    for p in ps
}


def small_model(arch: str, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    name = {"ocrnet.HRNet": "ocrnet_hrnet_w48", "ocrnet.HRNet_Mscale": "hmsa_ocrnet_hrnet_w48"}[arch]
    model = build_model(name, num_classes, **tiny_options(name))
    with torch.no_grad():  # trained-looking weights: nothing equals a fresh init by chance
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01 * torch.rand_like(t))
    return model.eval()


def save_original_format(model: nn.Module, path, arch: str, num_classes: int) -> None:
    """What the original's eval_metrics + runx write: a DataParallel/DDP state dict."""
    torch.save(
        {
            "epoch": 174,
            "arch": arch,
            "num_classes": num_classes,
            "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "momentum": 0.9}]},
            "mean_iu": 0.8692,
            "command": "--dataset cityscapes --arch " + arch,
            "__metric": 0.8692,
        },
        path,
    )


def assert_same(a: nn.Module, b: nn.Module, skip: set[str] = frozenset()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for key in sb:
        if key not in skip:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch", ["ocrnet.HRNet_Mscale", "ocrnet.HRNet"])
@pytest.mark.slow
def test_original_snapshot_loads_strictly(tmp_path, arch):
    src = small_model(arch, 19, seed=0)
    path = tmp_path / "snapshot.pth"
    save_original_format(src, path, arch, 19)
    dst = small_model(arch, 19, seed=1)
    report = load_checkpoint(dst, str(path))
    assert report.complete and len(report.loaded) == len(dst.state_dict())
    assert_same(src, dst)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        want = src(x)["pred"]
        assert torch.isfinite(want).all() and want.std() > 0
        torch.testing.assert_close(dst(x)["pred"], want, rtol=0, atol=0)


@pytest.mark.slow
def test_other_class_count_skips_exactly_the_class_heads(tmp_path):
    """Mapillary (65) -> Cityscapes (19) fine-tuning."""
    src = small_model("ocrnet.HRNet_Mscale", 65, seed=0)
    path = tmp_path / "mapillary.pth"
    save_original_format(src, path, "ocrnet.HRNet_Mscale", 65)
    dst = small_model("ocrnet.HRNet_Mscale", 19, seed=1)
    heads_before = {k: dst.state_dict()[k].clone() for k in CLASS_HEADS}
    with pytest.raises(CheckpointError, match="ocr.cls_head.weight: \\(65, 32, 1, 1\\) vs \\(19, 32, 1, 1\\)"):
        load_checkpoint(dst, str(path))
    report = load_checkpoint(dst, str(path), strict=False)
    assert {m.split(":")[0] for m in report.mismatched} == CLASS_HEADS
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(dst.state_dict()) - 4
    assert "shape differs (skipped) [4]" in report.summary()
    assert_same(src, dst, skip=CLASS_HEADS)
    for k, v in heads_before.items():
        assert torch.equal(dst.state_dict()[k], v), k


@pytest.mark.slow
def test_single_scale_snapshot_into_mscale_skips_exactly_the_attention_head(tmp_path):
    """The Cityscapes recipes start HRNet_Mscale from the Mapillary ocrnet.HRNet snapshot."""
    assert len(SCALE_ATTN) == 13
    src = small_model("ocrnet.HRNet", 65, seed=0)
    path = tmp_path / "ocrnet.HRNet_industrious-chicken.pth"
    save_original_format(src, path, "ocrnet.HRNet", 65)
    dst = small_model("ocrnet.HRNet_Mscale", 19, seed=1)
    with pytest.raises(CheckpointError, match="not in the file"):
        load_checkpoint(dst, str(path))
    report = load_checkpoint(dst, str(path), strict=False)
    assert set(report.missing) == SCALE_ATTN
    assert {m.split(":")[0] for m in report.mismatched} == CLASS_HEADS
    assert report.unexpected == []
    assert_same(src, dst, skip=SCALE_ATTN | CLASS_HEADS)


@pytest.mark.slow
def test_mscale_snapshot_into_single_scale_ignores_the_attention_head(tmp_path):
    src = small_model("ocrnet.HRNet_Mscale", 19, seed=0)
    path = tmp_path / "mscale.pth"
    save_original_format(src, path, "ocrnet.HRNet_Mscale", 19)
    dst = small_model("ocrnet.HRNet", 19, seed=1)
    report = load_checkpoint(dst, str(path), strict=False)
    assert set(report.unexpected) == SCALE_ATTN and not report.missing and not report.mismatched
    assert_same(src, dst)


@pytest.mark.slow
def test_another_architectures_snapshot_is_an_error(tmp_path):
    torch.manual_seed(0)
    other = build_model("hmsa_deeplabv3plus", 19, **tiny_options("hmsa_deeplabv3plus"))
    path = tmp_path / "mscale.DeepV3R50.pth"
    save_original_format(other, path, "mscale.DeepV3R50", 19)
    model = small_model("ocrnet.HRNet_Mscale", 19, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(CheckpointError, match="mscale.DeepV3R50.pth"):
            load_checkpoint(model, str(path), strict=strict)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing half-loaded


def test_unreadable_files_are_errors_naming_the_file(tmp_path):
    model = small_model("ocrnet.HRNet_Mscale", 19, seed=0)
    missing = tmp_path / "cityscapes_ocrnet.HRNet_Mscale_outstanding-turtle.pth"
    with pytest.raises(CheckpointError, match="not found: .*outstanding-turtle.pth"):
        load_checkpoint(model, str(missing))

    good = tmp_path / "good.pth"
    save_original_format(model, good, "ocrnet.HRNet_Mscale", 19)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint(model, str(truncated))

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pth"):
        load_checkpoint(model, str(text))

    no_weights = tmp_path / "no_weights.pth"
    torch.save({"epoch": 3, "arch": "ocrnet.HRNet_Mscale"}, no_weights)
    with pytest.raises(CheckpointError, match="no_weights.pth: no model weights"):
        load_checkpoint(model, str(no_weights))


# ----------------------------------------------------------------------------------------------- ImageNet


@pytest.fixture()
def imagenet_file(tmp_path):
    """An HRNet classification checkpoint (HRNet-Image-Classification / timm layout) of the narrow width."""
    torch.manual_seed(0)
    net = timm.create_model("hrnet_w18_small", pretrained=False)
    state = {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = tmp_path / "hrnet_w18_small_imagenet.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.slow
def test_imagenet_file_loads_into_the_trunk_dropping_exactly_the_head(imagenet_file):
    path, state = imagenet_file
    head = {k for k in state if k.split(".")[0] in ("incre_modules", "downsamp_modules", "final_layer", "classifier")}
    assert head and "classifier.weight" in head
    model = small_model("ocrnet.HRNet_Mscale", 19, seed=1)
    ocr_before = {k: v.clone() for k, v in model.ocr.state_dict().items()}
    report = load_trunk_weights(model.backbone, str(path))
    trunk_keys = set(model.backbone.state_dict())
    assert set(report.loaded) == trunk_keys == set(state) - head
    assert set(report.unexpected) == head and not report.missing and not report.mismatched
    for k in trunk_keys:
        assert torch.equal(model.backbone.state_dict()[k], state[k]), k
    assert all(torch.equal(v, model.ocr.state_dict()[k]) for k, v in ocr_before.items())


@pytest.mark.slow
def test_imagenet_file_that_does_not_fit_names_file_and_keys(imagenet_file, tmp_path):
    _, state = imagenet_file
    state = dict(state)
    state["stage2.0.branches.0.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    state["stage5.0.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "hrnetv2_w48_imagenet_pretrained.pth"
    torch.save(state, path)
    model = small_model("ocrnet.HRNet_Mscale", 19, seed=1)
    with pytest.raises(CheckpointError) as err:
        load_trunk_weights(model.backbone, str(path))
    msg = str(err.value)
    for part in ("hrnetv2_w48_imagenet_pretrained.pth", "stage2.0.branches.0.0.conv1.weight: (3, 3, 3, 3)",
                 "stage5.0.weight", "layer1.0.conv1.weight"):
        assert part in msg
    with pytest.raises(CheckpointError, match="not found: .*missing_imagenet.pth"):
        load_trunk_weights(model.backbone, str(tmp_path / "missing_imagenet.pth"))
