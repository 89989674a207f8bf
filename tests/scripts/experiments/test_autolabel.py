"""scripts/experiments/autolabel.py: stage configs and hashes, the threshold and class rules on hand-made masks, the report page,
each stage on a tiny budget with skip-when-done and resume, and the sbatch chain on the test SLURM cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.slurm_cluster import started_cluster

from datasets import DataError, build_dataset
from datasets.synthetic import generate_synthetic_cityscapes
from scripts.experiments import autolabel
from utils.config import load_config, to_dict
from utils.evaluation.visualize import write_images
from scripts.experiments.autolabel_page import ThresholdStats, kept, sample_pictures, write_autolabel_page

ROOT = Path(__file__).resolve().parents[3]
TINY = [
    "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.num_extra=3",
    "data.synthetic.height=32", "data.synthetic.width=64", "data.augment.crop_size=[32,32]", "data.batch_size=2",
    "data.val_batch_size=1", "data.num_workers=0", "train.max_iter=2", "train.log_interval=1",
    "model.options={trunk: resnet18, aspp_ch: 8, fine_ch: 8, head_ch: 8, attn_ch: 8}", "eval.scales=[0.5,1.0]",
    "eval.num_dump=0",
]
ROAD, CAR, TRUCK, BUS = 7, 26, 27, 28  # label ids; train ids 0, 13, 14, 15


# ----------------------------------------------------------------------------------------------- configs


def test_overrides_split_by_stage_prefix():
    parts = autolabel.split_overrides(["train.lr=0.1", "teacher.train.max_iter=9", "student.eval.flip=true",
                                       "teacher=1"])
    assert parts == {"all": ["train.lr=0.1", "teacher=1"], "teacher": ["train.max_iter=9"],
                     "student": ["eval.flip=true"]}


def test_arguments_seeds_and_one_stage_per_process_group(monkeypatch, capsys):
    args = autolabel.parse_args(["--out", "x", "--seeds", "0,3", "train.lr=0.1", "--stage", "student"])
    assert (args.seeds, args.overrides, args.stage) == ([0, 3], ["train.lr=0.1"], "student")
    with pytest.raises(SystemExit):
        autolabel.parse_args(["--out", "x", "--seeds", "1,1"])
    assert "seeds must be distinct, got '1,1'" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(autolabel.CliError, match=r"several processes run one stage at a time \(--stage NAME"):
        autolabel.main(["--out", "x"])


def test_stage_hash_ignores_output_paths_and_follows_config_and_inputs():
    a = to_dict(load_config(None, ["run.output_dir=/x", "run.name=a", "data.coarse.autolabel_dir=/p"]))
    b = to_dict(load_config(None, ["run.output_dir=/y", "run.name=b", "eval.dump_dir=elsewhere"]))
    c = to_dict(load_config(None, ["train.max_iter=7"]))
    assert autolabel.stage_hash(a, {"t": 1}) == autolabel.stage_hash(b, {"t": 1})
    assert autolabel.stage_hash(a, {"t": 1}) != autolabel.stage_hash(a, {"t": 2})
    assert autolabel.stage_hash(a, {}) != autolabel.stage_hash(c, {})
    assert "autolabel_dir" in a["data"]["coarse"]  # the hash works on a copy


def test_student_takes_the_sota_coarse_values_unless_set_and_teacher_none(tmp_path):
    plan = autolabel.Plan(str(tmp_path), None, None, [0], [], [], ["data.coarse.mask_out=false"])
    student = load_config(None, plan.student_overrides(3, "/labels")).data.coarse
    assert student.boost_classes == (3, 4, 6, 7, 9, 11, 12, 13, 14, 15, 16, 17, 18)
    assert student.dropout_classes == (14, 15, 16) and student.autolabel_threshold == 0.5
    assert student.mask_out is False and student.autolabel_dir == "/labels"  # the override wins
    assert load_config(None, plan.student_overrides(3, "/labels")).train.seed == 3
    assert load_config(None, plan.fine_only_overrides(3)).data.coarse.boost_classes == ()
    recipe = str(ROOT / "configs/cityscapes/hmsa_ocrnet_hrnet_w48_1024x2048_sota.yaml")
    sota = autolabel.Plan(str(tmp_path), recipe, None, [0], [], [], [])
    assert load_config(recipe, sota.teacher_overrides()).data.coarse.boost_classes == ()  # fine data only
    assert autolabel.recipe_sets_coarse(recipe, []) >= {"boost_classes", "dropout_classes", "autolabel_threshold"}


# ----------------------------------------------------------------------------------------------- thresholds


def test_threshold_statistics_on_a_hand_made_mask():
    ids = np.array([[0, 0, 13, 13], [0, 255, 13, 14]], np.uint8)
    prob = np.array([[255, 127, 128, 0], [200, 255, 40, 255]], np.uint8)
    # prob / 255 < 0.5 is dropped: 127 (0.498) is, 128 (0.502) is not
    np.testing.assert_array_equal(kept(prob, 0.5), [[True, False, True, False], [True, True, False, True]])
    stats = ThresholdStats(19, 0.5)
    stats.add(ids, prob)
    stats.add(np.zeros((2, 4), np.uint8), np.full((2, 4), 255, np.uint8))
    assert stats.images == 2
    assert stats.pixels[[0, 13, 14]].tolist() == [11, 3, 1] and stats.pixels.sum() == 15  # ignore not counted
    assert stats.kept[[0, 13, 14]].tolist() == [10, 1, 1]
    assert stats.kept_share() == pytest.approx(12 / 15)
    rows = stats.per_class([f"c{i}" for i in range(19)])
    assert rows[13]["kept_share"] == pytest.approx(1 / 3) and np.isnan(rows[5]["kept_share"])


def test_page_shows_the_class_table_and_the_pictures_side_by_side(tmp_path):
    palette = np.array([[10, 20, 30], [200, 100, 50]], np.uint8)
    ids = np.array([[0, 1], [1, 255]], np.uint8)
    prob = np.array([[255, 10], [255, 255]], np.uint8)
    pics = sample_pictures(np.full((2, 2, 3), 7, np.uint8), ids, prob, 0.5, palette)
    assert pics["label"][0, 1].tolist() == [200, 100, 50] and pics["label"][1, 1].tolist() == [0, 0, 0]
    assert pics["thresholded"][0, 1].tolist() == [0, 0, 0] and pics["thresholded"][1, 0].tolist() == [200, 100, 50]
    assert pics["prob"][0, 1].tolist() == [10, 10, 10]
    files = write_images(str(tmp_path / "page"), "img", pics)
    stats = ThresholdStats(2, 0.5)
    stats.add(ids, prob)
    page = write_autolabel_page(str(tmp_path / "page" / "index.html"), "labels", stats, ["road", "car"],
                                [{"name": "img", "files": files}])
    text = open(page).read()
    assert "<td>1</td><td>car</td><td>2</td><td>66.67</td><td>1</td><td>50.00</td>" in text
    assert text.index("img_input.png") < text.index("img_label.png") < text.index("img_prob.png") < text.index(
        "img_thresholded.png")
    assert "66.67%</b>" in text  # 2 of 3 labelled pixels kept
    assert cv2.imread(files["thresholded"])[0, 1].tolist() == [0, 0, 0]


def write_autolabel(folder: Path, city: str, stem: str, label_ids: np.ndarray, prob: np.ndarray) -> None:
    """An auto-label in the layout the autolabel stage writes (LabelIdWriter under labels/train_extra/<city>)."""
    base = folder / "train_extra" / city / f"{stem}_leftImg8bit"
    base.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(base) + ".png", label_ids)
    cv2.imwrite(str(base) + "_prob.png", prob)


def test_student_rules_on_hand_made_masks(tmp_path):
    """The student's mask from an auto-label the way the stage writes it, with the pipeline's default (SOTA)
    threshold, dropout classes and mask-out, worked out by hand."""
    root = generate_synthetic_cityscapes(str(tmp_path / "cs"), 2, 1, 32, 64, 0, num_extra=1)
    stem = "augsburg_000000_000019"
    auto = np.full((32, 64), ROAD, np.uint8)
    auto[:, 32:] = CAR
    auto[0:10, 0:10] = BUS  # a dropout class present in the auto-label
    prob = np.full((32, 64), 255, np.uint8)
    prob[0:4, 20:30] = 127  # below 0.5
    human = np.zeros((32, 64), np.uint8)
    human[0:4, 40:50] = BUS  # the annotator's bus, over the teacher's car: unioned in (28 > 26)
    human[20:24, 0:5] = TRUCK  # truck is not in the auto-label: not added
    write_autolabel(tmp_path / "labels", "augsburg", stem, auto, prob)
    cv2.imwrite(os.path.join(root, "gtCoarse/train_extra/augsburg", f"{stem}_gtCoarse_labelIds.png"), human)
    plan = autolabel.Plan(str(tmp_path), None, None, [0], ["data.dataset=cityscapes", f"data.root={root}",
                                                           "data.num_workers=0"], [], [])
    cfg = load_config(None, plan.student_overrides(0, str(tmp_path / "labels")))
    ds = build_dataset(cfg.data, "train", train=True)
    assert ds.num_main == 2 and len(ds) == 3
    m = ds.load_mask(2)
    rows = round(840 / 1024 * 32)  # mask-out keeps rows 0..26 (round(15/1024*32) = 0) and columns 0..62
    assert (m[rows:] == 255).all() and (m[:rows, 63] == 255).all()
    assert (m[0:4, 20:30] == 255).all()  # probability 127 / 255 < 0.5
    assert (m[0:10, 0:10] == 15).all() and (m[0:4, 40:50] == 15).all()  # the teacher's bus and the human bus
    assert (m[20:24, 0:5] == 0).all()  # no human truck: road
    assert (m[10:rows, 32:63] == 13).all() and (m[10:20, 0:20] == 0).all()
    fine = build_dataset(load_config(None, plan.fine_only_overrides(0)).data, "train", train=True)
    assert len(fine) == 2  # fine-only: no auto-labelled images


def custom_data(root: Path) -> Path:
    """A custom dataset (class list with an id map) with train, val and an unlabelled train_extra split."""
    root.mkdir()
    (root / "classes.yaml").write_text("names: [background, road, car]\nid_map: {0: 0, 7: 1, 26: 2, 255: 255}\n")
    rng = np.random.default_rng(0)
    for split, names in (("train", ["a", "b"]), ("val", ["c"]), ("train_extra", ["city/x", "city/y"])):
        for name in names:
            image = root / "images" / split / f"{name}.jpg"
            image.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(image), rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
            if split != "train_extra":
                mask = root / "masks" / split / f"{name}.png"
                mask.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(mask), np.where(np.arange(48)[None, :] < 24, 7, 26).repeat(32, 0).astype(np.uint8))
    return root


def test_custom_dataset_takes_autolabels_the_same_way(tmp_path):
    root = custom_data(tmp_path / "custom")
    common = ["data.dataset=custom", f"data.root={root}", f"data.custom.classes={root / 'classes.yaml'}",
              "data.num_workers=0"]
    plan = autolabel.Plan(str(tmp_path), None, None, [0], common, [],
                          ["data.coarse.boost_classes=[1,2]", "data.coarse.dropout_classes=[]",
                           "data.coarse.mask_out=false"])
    cfg = load_config(None, plan.student_overrides(0, str(tmp_path / "labels")))
    assert autolabel.extra_images(cfg.data) == [(str(root / "images/train_extra/city/x.jpg"), "city/x"),
                                               (str(root / "images/train_extra/city/y.jpg"), "city/y")]
    for name in ("x", "y"):  # what the autolabel stage writes: label values of the id map, probability
        (tmp_path / "labels" / "city").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "labels" / "city" / f"{name}.png"), np.full((32, 48), 26, np.uint8))
        prob = np.full((32, 48), 255, np.uint8)
        prob[:, :10] = 100
        cv2.imwrite(str(tmp_path / "labels" / "city" / f"{name}_prob.png"), prob)
    ds = build_dataset(cfg.data, "train", train=True)
    assert ds.num_main == 2 and len(ds) == 4 and ds.samples[3].name == "city_y"
    m = ds.load_mask(3)
    assert (m[:, :10] == 255).all() and (m[:, 10:] == 2).all()  # car (id 26 -> 2); below 0.5 -> ignore
    assert len(build_dataset(cfg.data, "val", train=False)) == 1
    (tmp_path / "labels" / "city" / "y_prob.png").unlink()
    with pytest.raises(DataError, match=r"1 train_extra image\(s\) without an autolabel .*: city/y"):
        build_dataset(cfg.data, "train", train=True)


# ----------------------------------------------------------------------------------------------- stages


def run_pipeline(out: Path, *args: str) -> dict:
    return autolabel.main(["--out", str(out), *args])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    out = base / "out"
    args = [*TINY, f"data.root={base / 'data'}"]
    report = run_pipeline(out, *args)
    return out, args, report


@pytest.mark.slow
def test_pipeline_on_a_tiny_budget_writes_every_stage(pipeline):
    out, _, report = pipeline
    saved = json.loads((out / "report.json").read_text())
    assert saved == report
    assert 0 <= report["teacher_miou"] <= 1 and 0 <= report["student_miou"] <= 1
    assert 0 <= report["fine_only_miou"] <= 1 and report["autolabelled_images"] == 3
    # Teacher and fine-only model: the same config and budget, so one run.
    assert report["stages"]["teacher"] == report["stages"]["fine_only_s0"] != report["stages"]["student_s0"]
    assert report["fine_only_miou"] == report["teacher_miou"]
    auto = Path(report["stages"]["autolabel"])
    labels = sorted(str(p.relative_to(auto / "labels")) for p in (auto / "labels").rglob("*.png"))
    assert labels == [
        "train_extra/augsburg/augsburg_000000_000019_leftImg8bit.png",
        "train_extra/augsburg/augsburg_000000_000019_leftImg8bit_prob.png",
        "train_extra/bamberg/bamberg_000001_000019_leftImg8bit.png",
        "train_extra/bamberg/bamberg_000001_000019_leftImg8bit_prob.png",
        "train_extra/dortmund/dortmund_000002_000019_leftImg8bit.png",
        "train_extra/dortmund/dortmund_000002_000019_leftImg8bit_prob.png",
    ]
    ids = cv2.imread(str(auto / "labels/train_extra/augsburg/augsburg_000000_000019_leftImg8bit.png"),
                     cv2.IMREAD_UNCHANGED)
    assert ids.shape == (32, 64) and set(np.unique(ids)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26,
                                                             27, 28, 31, 32, 33}  # Cityscapes label ids
    # The kept share, recounted from the PNGs: probability / 255 >= 0.5 over every labelled pixel.
    probs = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((auto / "labels").rglob("*_prob.png"))]
    assert report["kept_share"] == pytest.approx(np.mean([(p / 255.0 >= 0.5).mean() for p in probs]))
    # Every stage wrote its config and a short report.
    stage = json.loads((auto / "report.json").read_text())
    assert stage["images"] == 3 and set(stage["kept_per_class"]) >= {"road", "car"}
    assert stage["kept_share"] == report["kept_share"] and stage["seconds"] >= 0
    assert (auto / "config.yaml").is_file() and (auto / "page" / "index.html").is_file()
    assert load_config(str(auto / "config.yaml")).eval.scales == (0.5, 1.0)
    student = Path(report["stages"]["student_s0"])
    student_cfg = load_config(str(student / "config.yaml"))
    assert student_cfg.data.coarse.autolabel_dir == str(auto / "labels")
    assert student_cfg.data.coarse.autolabel_threshold == 0.5
    assert json.loads((student / "report.json").read_text())["autolabelled_images"] == 3
    for name in ("teacher", "autolabel", "student_s0", "fine_only_s0"):
        assert json.loads((out / "stages" / f"{name}.json").read_text())["folder"] == report["stages"][name]


@pytest.mark.slow
def test_finished_stages_are_skipped_and_changed_inputs_rerun(pipeline, capsys):
    out, args, report = pipeline
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("done.json")}
    capsys.readouterr()
    again = run_pipeline(out, *args)
    assert again == report
    assert {p: p.stat().st_mtime_ns for p in out.rglob("done.json")} == stamps  # nothing redone
    err = capsys.readouterr().err
    assert err.count("done already") == 4 and "training" not in err
    # Another student budget and threshold: the teacher is kept, the auto-labels are recounted (not labelled
    # again), the student and the fine-only model are new.
    other = run_pipeline(out, *args, "student.train.max_iter=3", "student.data.coarse.autolabel_threshold=0.3")
    assert other["stages"]["teacher"] == report["stages"]["teacher"]
    assert other["stages"]["autolabel"] == report["stages"]["autolabel"]
    recount = json.loads((Path(other["stages"]["autolabel"]) / "done.json").read_text())
    assert (recount["threshold"], recount["labelled_now"], other["threshold"]) == (0.3, 0, 0.3)
    assert other["kept_share"] >= report["kept_share"]
    assert other["stages"]["student_s0"] != report["stages"]["student_s0"]
    assert other["stages"]["fine_only_s0"] not in (report["stages"]["fine_only_s0"], other["stages"]["student_s0"])
    assert json.loads((Path(other["stages"]["student_s0"]) / "report.json").read_text())["iterations"] == 3
    recounted = Path(other["stages"]["autolabel"]) / "done.json"
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != recounted)  # the first runs' untouched


@pytest.mark.slow
def test_autolabel_stage_resumes_and_a_given_teacher_checkpoint_is_scored(pipeline, tmp_path):
    out, args, report = pipeline
    auto = Path(report["stages"]["autolabel"])
    (auto / "done.json").unlink()  # as if stopped before the end
    (auto / "labels/train_extra/bamberg/bamberg_000001_000019_leftImg8bit.png").unlink()
    run_pipeline(out, *args, "--stage", "autolabel")
    assert json.loads((auto / "done.json").read_text())["labelled_now"] == 1
    ckpt = json.loads((out / "stages" / "teacher.json").read_text())["checkpoint"]
    given = run_pipeline(tmp_path / "given", *args, "--teacher", ckpt)
    assert given["teacher_miou"] == pytest.approx(report["teacher_miou"], abs=1e-6)  # the same weights, scored
    assert given["autolabelled_images"] == 3 and Path(given["stages"]["teacher"]).name.startswith("teacher_")


@pytest.mark.slow
def test_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.experiments.autolabel", "--out", str(tmp_path / "o"), "--stage", "report"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: stage report needs the teacher stage, which has not finished in {tmp_path / 'o'} (run --stage "
        "teacher first, or --stage all)")
    missing = subprocess.run([sys.executable, "-m", "scripts.experiments.autolabel", "--out", str(tmp_path / "o"), "--teacher",
                              str(tmp_path / "none.pth"), "--stage", "teacher", *TINY,
                              f"data.root={tmp_path / 'data'}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: stage teacher: --teacher {tmp_path / 'none.pth'}: no such file (give a checkpoint, or leave "
        "--teacher out to train the teacher)")


# ----------------------------------------------------------------------------------------------- sbatch chain


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from started_cluster(tmp_path_factory, "slurm_autolabel")


ONE_TASK = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=10"]


def submit_chain(cluster, out: Path, *args: str) -> dict[str, str]:
    env = {**cluster.env(), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = cluster.run(str(ROOT / "scripts/slurm/autolabel.sh"), *ONE_TASK, f"--output={out}/%x-%j.out", "--",
                       "--out", str(out), *args, cwd=ROOT, env=env)
    jobs = dict(line.split() for line in proc.stdout.strip().splitlines())
    assert (out / "chain.txt").read_text() == proc.stdout
    return jobs


def start_of(info: dict[str, str]) -> float:
    return time.mktime(time.strptime(info["StartTime"], "%Y-%m-%dT%H:%M:%S"))


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_chain_honours_the_dependencies(cluster, tmp_path):
    out = tmp_path / "chain"
    out.mkdir()
    jobs = submit_chain(cluster, out, *TINY, f"data.root={tmp_path / 'data'}")
    assert list(jobs) == ["teacher", "fine_only", "autolabel", "student", "report"]
    info = {stage: cluster.wait_job(job, timeout=600) for stage, job in jobs.items()}
    outputs = "\n".join(p.read_text()[-2000:] for p in out.glob("*.out")) + cluster.logs(10)
    assert all(i["JobState"] == "COMPLETED" for i in info.values()), outputs
    assert info["autolabel"]["Dependency"] in ("(null)", "") and info["teacher"]["Dependency"] in ("(null)", "")
    # afterok: a stage starts only once the stages it waits for have ended
    for later, earlier in (("autolabel", "teacher"), ("fine_only", "teacher"), ("student", "autolabel"),
                           ("report", "student"), ("report", "fine_only")):
        end = time.mktime(time.strptime(info[earlier]["EndTime"], "%Y-%m-%dT%H:%M:%S"))
        assert start_of(info[later]) >= end, (later, earlier)
    report = json.loads((out / "report.json").read_text())
    assert report["autolabelled_images"] == 3 and 0 <= report["student_miou"] <= 1


@pytest.mark.slurm
@pytest.mark.slow
def test_a_failed_stage_stops_the_chain_with_a_message(cluster, tmp_path):
    out = tmp_path / "failed"
    out.mkdir()
    jobs = submit_chain(cluster, out, "--teacher", str(tmp_path / "missing.pth"), *TINY,
                        f"data.root={tmp_path / 'data'}")
    teacher = cluster.wait_job(jobs["teacher"], timeout=300)
    assert teacher["JobState"] == "FAILED"
    for stage in ("fine_only", "autolabel", "student", "report"):
        info = cluster.wait_job(jobs[stage], timeout=120)
        assert info["JobState"] == "CANCELLED", (stage, info)
    text = next(out.glob(f"hmsa-autolabel-teacher-{jobs['teacher']}.out")).read_text()
    assert f"--teacher {tmp_path / 'missing.pth'}: no such file" in text
    assert "stage teacher failed (exit code 2): the chain stops here" in text
    assert not (out / "report.json").exists() and not list(out.glob("autolabel_*"))
