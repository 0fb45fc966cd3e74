"""A user's own annotations: COCO JSON, a folder of Pascal VOC XML and a deepforest CSV
(gfocal/data/formats.py), registered from ``--dataset NAME=FORMAT:PATH[:IMAGE_ROOT]``
(gfocal/data/register.py), on the real files that ship in deepforest's data folder; and each bad
input a clear error naming the file and the row, raised before anything is written."""
import argparse
import importlib.util
import json
import logging
import os
import shutil

import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import REPO_ROOT
from gfocal.data.annotations import sanitize_annotations
from gfocal.data.formats import DataFormatError, load_csv, load_voc_folder, parse_voc_xml
from gfocal.data.register import (
    add_dataset_arguments,
    parse_dataset_spec,
    register_datasets,
    register_datasets_from_args,
)
from gfocal.data.tree_crowns import deepforest_data_dir

DATA = deepforest_data_dir()
_counter = [0]


def unique(prefix: str = "own") -> str:
    _counter[0] += 1
    return f"{prefix}_{os.getpid()}_{_counter[0]}"


def register(*specs: str, classes=None):
    parser = add_dataset_arguments(argparse.ArgumentParser())
    argv = [f"--dataset={s}" for s in specs] + ([f"--classes={classes}"] if classes else [])
    return register_datasets_from_args(parser.parse_args(argv))


@pytest.fixture
def voc(tmp_path):
    """deepforest's OSBS_029 (61 'Tree') and SOAP_061 (37 'Alive'/'Dead') XML + PNG."""
    folder = tmp_path / "voc"
    folder.mkdir()
    for stem in ("OSBS_029", "SOAP_061"):
        for ext in (".xml", ".png"):
            shutil.copy(os.path.join(DATA, stem + ext), folder)
    return folder


def test_the_yell_xml_files_parse():
    for name, count in (("2019_YELL_2_528000_4978000_image_crop2", 574),
                        ("2019_YELL_2_541000_4977000_image_crop", 279)):
        filename, size, objects = parse_voc_xml(os.path.join(DATA, name + ".xml"))
        assert filename == name + ".png" and len(objects) == count
        assert {o.name for o in objects} == {"Tree"}
        assert all(o.box[0] < o.box[2] and o.box[1] < o.box[3] for o in objects)


def test_voc_folder(voc):
    records, classes = load_voc_folder(str(voc))
    assert classes == ["Alive", "Dead", "Tree"]  # sorted labels
    by_file = {os.path.basename(r["file_name"]): r for r in records}
    # OSBS_029.xml names OSBS_029.tif; the folder has OSBS_029.png (same stem) instead.
    assert set(by_file) == {"OSBS_029.png", "SOAP_061.png"}
    assert all((r["height"], r["width"]) == (400, 400) for r in records)
    osbs, soap = by_file["OSBS_029.png"], by_file["SOAP_061.png"]
    assert len(osbs["annotations"]) == 61 and {a["category_id"] for a in osbs["annotations"]} == {2}
    assert len(soap["annotations"]) == 37 and {a["category_id"] for a in soap["annotations"]} == {0, 1}
    assert soap["annotations"][3]["id"] == "SOAP_061.xml object 3"
    # An explicit class list fixes the ids.
    records, classes = load_voc_folder(str(voc), classes=["Tree", "Dead", "Alive"])
    tree = [r for r in records if r["file_name"].endswith("OSBS_029.png")][0]
    assert classes == ["Tree", "Dead", "Alive"] and {a["category_id"] for a in tree["annotations"]} == {0}


def test_csv_matches_the_voc_file_of_the_same_image(voc):
    """deepforest's testfile_multi.csv holds SOAP_061.xml's boxes: both readers agree."""
    records, classes = load_csv(os.path.join(DATA, "testfile_multi.csv"), str(voc))
    assert classes == ["Alive", "Dead"] and len(records) == 1
    voc_records, voc_classes = load_voc_folder(str(voc), classes=classes + ["Tree"])
    soap = [r for r in voc_records if r["file_name"].endswith("SOAP_061.png")][0]

    def boxes(record, names):
        return sorted((tuple(a["bbox"]), names[a["category_id"]]) for a in record["annotations"])

    assert boxes(records[0], classes) == boxes(soap, voc_classes)
    assert records[0]["annotations"][0]["id"] == "testfile_multi.csv line 2"


def test_csv_row_of_zeros_is_an_image_without_boxes(tmp_path):
    shutil.copy(os.path.join(DATA, "SOAP_061.png"), tmp_path)
    shutil.copy(os.path.join(DATA, "OSBS_029.png"), tmp_path)
    (tmp_path / "a.csv").write_text(
        "image_path,xmin,ymin,xmax,ymax,label\nSOAP_061.png,1,2,30,40,Dead\nOSBS_029.png,0,0,0,0,Tree\n"
    )
    records, classes = load_csv(str(tmp_path / "a.csv"))
    assert [len(r["annotations"]) for r in records] == [1, 0] and classes == ["Dead", "Tree"]


def test_coco_json_with_sparse_category_ids(voc, tmp_path):
    """detectron2's mapping: category ids 3 and 7 become 0 and 1, names from ``categories``."""
    records, _ = load_voc_folder(str(voc), classes=["Alive", "Dead", "Tree"])
    soap = [r for r in records if r["file_name"].endswith("SOAP_061.png")][0]
    ids = {0: 3, 1: 7}  # Alive -> 3, Dead -> 7
    coco = {
        "images": [{"id": 5, "file_name": "SOAP_061.png", "height": 400, "width": 400}],
        "annotations": [
            {"id": i + 1, "image_id": 5, "category_id": ids[a["category_id"]], "iscrowd": 0,
             "bbox": [a["bbox"][0], a["bbox"][1], a["bbox"][2] - a["bbox"][0], a["bbox"][3] - a["bbox"][1]],
             "area": 1.0}
            for i, a in enumerate(soap["annotations"])
        ],
        "categories": [{"id": 7, "name": "dead"}, {"id": 3, "name": "alive"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    name = unique("coco")
    register(f"{name}=coco:{tmp_path / 'coco.json'}:{voc}")
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["alive", "dead"] and meta.json_file == str(tmp_path / "coco.json")
    (record,) = DatasetCatalog.get(name)
    got = sorted(a["category_id"] for a in record["annotations"])
    assert got == sorted(a["category_id"] for a in soap["annotations"])


def test_registered_datasets_share_one_class_list(voc, tmp_path):
    """A validation set without 'Tree' keeps the training set's ids; names go to the metadata."""
    val = tmp_path / "val"
    val.mkdir()
    for ext in (".xml", ".png"):
        shutil.copy(os.path.join(DATA, "SOAP_061" + ext), val)
    train, held_out = unique("train"), unique("val")
    assert register(f"{train}=voc:{voc}", f"{held_out}=voc:{val}") == [train, held_out]
    assert MetadataCatalog.get(train).thing_classes == ["Alive", "Dead", "Tree"]
    assert MetadataCatalog.get(held_out).thing_classes == ["Alive", "Dead", "Tree"]
    assert MetadataCatalog.get(held_out).evaluator_type == "coco"
    assert len(DatasetCatalog.get(train)) == 2 and len(DatasetCatalog.get(held_out)) == 1
    # The same flags again in the same process (train_net.py's main with one worker): a no-op.
    register(f"{train}=voc:{voc}", f"{held_out}=voc:{val}")


def test_spec_syntax():
    spec = parse_dataset_spec("a=VOC:data/xml:data/img")
    assert (spec.name, spec.format, spec.path, spec.image_root) == ("a", "voc", "data/xml", "data/img")
    assert parse_dataset_spec("b=csv:x.csv").image_root is None
    for bad, match in (("nofmt", "NAME=FORMAT:PATH"), ("a=voc", "NAME=FORMAT:PATH"),
                       ("a=yolo:x", "'yolo' is not one of")):
        with pytest.raises(ValueError, match=match):
            parse_dataset_spec(bad)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def _xml(path, body, filename="SOAP_061.png", size="<size><width>400</width><height>400</height></size>"):
    path.write_text(f"<annotation><filename>{filename}</filename>{size}{body}</annotation>")


OBJ = "<object><name>{}</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>{}</xmax><ymax>40</ymax></bndbox></object>"


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing image", r"bad\.xml: image not found \(<filename> 'gone\.png'"),
        ("unreadable image", r"bad\.xml: image .*SOAP_061\.png cannot be read"),
        ("malformed xml", r"bad\.xml: malformed XML"),
        ("not a number", r"bad\.xml object 1: xmax='ten' is not a number"),
        ("no bndbox", r"bad\.xml object 0 \('Dead'\): no <bndbox>"),
        ("label not in classes", r"bad\.xml object 1: label 'Cat' is not in the class list \['Alive', 'Dead'\]"),
        ("size mismatch", r"bad\.xml: <size> says 500x400 .* is 400x400"),
        ("no xml", r"has no \.xml files"),
    ],
)
def test_bad_voc_input_names_file_and_object(tmp_path, case, match):
    folder = tmp_path / "voc"
    folder.mkdir()
    shutil.copy(os.path.join(DATA, "SOAP_061.png"), folder)
    xml = folder / "bad.xml"
    body = OBJ.format("Dead", 30) + OBJ.format("Cat" if case == "label not in classes" else "Alive",
                                                "ten" if case == "not a number" else 30)
    if case == "missing image":
        _xml(xml, body, filename="gone.png")
        os.remove(folder / "SOAP_061.png")
    elif case == "unreadable image":
        _xml(xml, body)
        (folder / "SOAP_061.png").write_bytes(b"not a png")
    elif case == "malformed xml":
        xml.write_text("<annotation><object>")
    elif case == "no bndbox":
        _xml(xml, "<object><name>Dead</name></object>")
    elif case == "size mismatch":
        _xml(xml, body, size="<size><width>500</width><height>400</height></size>")
    elif case != "no xml":
        _xml(xml, body)
    with pytest.raises(DataFormatError, match=match) as err:
        register(f"{unique()}=voc:{folder}", classes="Alive,Dead")
    assert "--dataset" in str(err.value)  # which flag


@pytest.mark.parametrize(
    "content, match",
    [
        ("image_path,xmin,ymin,xmax,ymax\n", r"line 1: header .* lacks \['label'\]"),
        ("image_path,xmin,ymin,xmax,ymax,label\nSOAP_061.png,1,2,30\n", r"a\.csv line 2: 4 fields"),
        ("image_path,xmin,ymin,xmax,ymax,label\nSOAP_061.png,1,2,30,40,Dead,7\n", r"a\.csv line 2: 7 fields"),
        ("image_path,xmin,ymin,xmax,ymax,label\nSOAP_061.png,1,2,30,40,Dead\nSOAP_061.png,1,x,30,40,Dead\n",
         r"a\.csv line 3: ymin='x' is not a number"),
        ("image_path,xmin,ymin,xmax,ymax,label\nSOAP_061.png,1,2,30,40,Dead\nnope.png,1,2,30,40,Dead\n",
         r"a\.csv line 3: image .*nope\.png does not exist"),
        ("image_path,xmin,ymin,xmax,ymax,label\nSOAP_061.png,1,2,30,40,Cat\n",
         r"a\.csv line 2: label 'Cat' is not in the class list"),
        ("image_path,xmin,ymin,xmax,ymax,label\n", r"no rows after the header"),
    ],
)
def test_bad_csv_input_names_file_and_line(tmp_path, content, match):
    shutil.copy(os.path.join(DATA, "SOAP_061.png"), tmp_path)
    (tmp_path / "a.csv").write_text(content)
    with pytest.raises(DataFormatError, match=match):
        register(f"{unique()}=csv:{tmp_path / 'a.csv'}", classes="Alive,Dead")


def test_bad_coco_input(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "gone.png", "height": 10, "width": 10}],
        "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(DataFormatError, match=r"a\.json: image id 1: image .*gone\.png does not exist"):
        register(f"{unique()}=coco:{tmp_path / 'a.json'}")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(Exception, match=r"b\.json"):
        register(f"{unique()}=coco:{tmp_path / 'b.json'}")


def test_dataset_name_given_twice_or_taken(voc):
    name = unique()
    with pytest.raises(ValueError, match=r"name\(s\) \['%s'\] given more than once" % name):
        register(f"{name}=voc:{voc}", f"{name}=csv:{DATA}/OSBS_029.csv")
    with pytest.raises(ValueError, match="'neon_trees_train' is already registered \\(built in\\)"):
        register(f"neon_trees_train=voc:{voc}")
    register(f"{name}=voc:{voc}")
    with pytest.raises(ValueError, match="already registered \\(by another --dataset\\)"):
        register(f"{name}=voc:{voc}", classes="Alive,Dead,Tree,Car")


def test_zero_size_and_outside_boxes_follow_the_documented_rules_naming_the_row(tmp_path, caplog):
    """Kept by the reader; dropped / clipped by gfocal.data.annotations, which names the CSV line."""
    shutil.copy(os.path.join(DATA, "SOAP_061.png"), tmp_path)
    (tmp_path / "a.csv").write_text(
        "image_path,xmin,ymin,xmax,ymax,label\nSOAP_061.png,10,10,10,30,Dead\n"
        "SOAP_061.png,390,10,420,30,Dead\nSOAP_061.png,500,10,520,30,Dead\nSOAP_061.png,1,1,9,9,Dead\n"
    )
    records, _ = load_csv(str(tmp_path / "a.csv"))
    with caplog.at_level(logging.WARNING):
        cleaned, counts = sanitize_annotations(records, "mine", 1)
    assert counts["empty"] == 1 and counts["outside"] == 1 and counts["clipped"] == 1 and counts["kept"] == 2
    assert "annotation id a.csv line 2" in caplog.text and "annotation id a.csv line 4" in caplog.text
    assert cleaned[0]["annotations"][0]["bbox"] == [390.0, 10.0, 400.0, 30.0]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_net_checks_the_data_before_writing_anything(voc, tmp_path):
    train_net = _load_script("train_net")
    parser = add_dataset_arguments(train_net.default_argument_parser())
    out = tmp_path / "out"
    name = unique()
    base = ["--config-file", os.path.join(REPO_ROOT, "configs", "gfl_R_50_FPN_1x.yaml"),
            "--dataset", f"{name}=voc:{voc}"]
    opts = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out),
            "MODEL.DEVICE", "cpu"]
    with pytest.raises(ValueError, match="set MODEL.GFL.NUM_CLASSES 3"):
        train_net.main(parser.parse_args(base + opts))  # the config says 80 classes
    with pytest.raises(ValueError, match="not registered; register your own with --dataset"):
        train_net.main(parser.parse_args(base + opts[:1] + ["('typo',)"] + opts[2:]))
    bad = tmp_path / "bad"
    shutil.copytree(voc, bad)
    (bad / "SOAP_061.xml").write_text("<annotation>")
    with pytest.raises(DataFormatError, match="SOAP_061.xml: malformed XML"):
        train_net.main(parser.parse_args(base[:3] + [f"{unique()}=voc:{bad}"] + opts))
    assert not out.exists()


def test_lazy_config_checks_the_data_before_writing_anything(voc, tmp_path):
    lazy = _load_script("lazyconfig_train_net")
    parser = add_dataset_arguments(lazy.default_argument_parser())
    out, name = tmp_path / "out", unique()
    args = parser.parse_args([
        "--config-file", os.path.join(REPO_ROOT, "configs", "trees", "gfl_lite0_trees.py"),
        "--dataset", f"{name}=voc:{voc}", f"dataloader.train.dataset.names={name}",
        f"dataloader.test.dataset.names={name}", f"train.output_dir={out}",
    ])
    with pytest.raises(ValueError, match="set model.num_classes=3 dataloader.train.dataset.num_classes=3"):
        lazy.main(args)
    assert not out.exists()


def test_demo_draws_class_names_of_a_registered_dataset(voc, capsys):
    import sys

    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    name = unique()
    args = demo.get_parser().parse_args([
        "--config-file", os.path.join(REPO_ROOT, "configs", "gfl_R_50_FPN_1x.yaml"),
        "--input", "x.png", "--dataset", f"{name}=voc:{voc}", "MODEL.GFL.NUM_CLASSES", "3"])
    registered = register_datasets_from_args(args)
    cfg = demo.setup_cfg(args)
    assert demo.class_metadata(cfg, registered).thing_classes == ["Alive", "Dead", "Tree"]
    cfg.defrost()
    cfg.MODEL.GFL.NUM_CLASSES = 2
    with pytest.raises(ValueError, match="set MODEL.GFL.NUM_CLASSES 3"):
        demo.class_metadata(cfg, registered)
    cfg.DATASETS.TEST = ("not_registered_here",)
    assert demo.class_metadata(cfg, []).get("thing_classes", None) is None
    assert "pass --dataset" in capsys.readouterr().err


@pytest.mark.trains_in_subprocess
def test_two_cpu_workers_register_the_dataset_each(tmp_path):
    """``train_net.py --num-gpus 2``: each spawned worker registers the --dataset itself."""
    import subprocess
    import sys

    import torch

    voc = tmp_path / "voc"
    voc.mkdir()
    for ext in (".xml", ".png"):
        shutil.copy(os.path.join(DATA, "OSBS_029" + ext), voc)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-W", "ignore", os.path.join(REPO_ROOT, "train_net.py"), "--num-gpus", "2",
        "--config-file", os.path.join(REPO_ROOT, "configs", "trees", "gfl_lite0_trees.yaml"),
        "--dataset", f"workers_voc=voc:{voc}", "DATASETS.TRAIN", "('workers_voc',)", "DATASETS.TEST", "()",
        "MODEL.DEVICE", "cpu", "MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB", "0", "SOLVER.MAX_ITER", "2",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
        "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "256",
        "OUTPUT_DIR", str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "World size: 2" in (out / "log.txt").read_text()
    # Rank 1 builds its own training loader from the dataset: it was registered there too.
    assert "Starting training from iteration 0" in (out / "log.txt.rank1").read_text()
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] == 1


@pytest.mark.trains_in_subprocess
def test_lazyconfig_trains_and_evaluates_a_voc_dataset(voc, tmp_path):
    """``lazyconfig_train_net.py --dataset``: a few iterations and the COCO evaluation of it."""
    import subprocess
    import sys

    one = tmp_path / "one"
    one.mkdir()
    for ext in (".xml", ".png"):
        shutil.copy(os.path.join(DATA, "OSBS_029" + ext), one)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-W", "ignore", os.path.join(REPO_ROOT, "lazyconfig_train_net.py"),
        "--config-file", os.path.join(REPO_ROOT, "configs", "trees", "gfl_lite0_trees.py"),
        "--dataset", f"lazy_voc=voc:{one}", "dataloader.train.dataset.names=lazy_voc",
        "dataloader.test.dataset.names=lazy_voc", "train.max_iter=2",
        "dataloader.train.total_batch_size=1", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0", "model.backbone.bottom_up.feature_cache_mb=0",
        "lr_multiplier.scheduler.milestones=[]", "lr_multiplier.scheduler.values=[1.0]",
        "lr_multiplier.scheduler.num_updates=2", "model.test_score_thresh=0.0",
        f"train.output_dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "copypaste: AP,AP50" in proc.stdout + proc.stderr
    copy = json.loads((out / "inference" / "lazy_voc_coco_format.json").read_text())
    assert [c["name"] for c in copy["categories"]] == ["Tree"] and len(copy["annotations"]) == 61
