"""GFLCheckpointer: head mismatches are reported (never a silent partial load of the head),
damaged files give a clear error, and a crash during a save never loses the last checkpoint."""
import logging
import os

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import tiny_cfg
from gfocal.model_io.checkpoint import CheckpointReadError, GFLCheckpointer, HeadMismatchError


def _model(**overrides):
    torch.manual_seed(len(overrides))
    return build_model(tiny_cfg(**overrides))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny 3-class GFL model (REG_MAX 16, 2 tower convs) saved as model_a.pth."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = _model()
    GFLCheckpointer(model, str(folder)).save("model_a")
    return model, str(folder / "model_a.pth")


def _equal(a, b, prefix=""):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))


# --------------------------------------------------------------------------------------------
# Head mismatches
# --------------------------------------------------------------------------------------------
def test_same_layout_loads_exactly(saved):
    source, path = saved
    target = _model(**{"MODEL.GFL.PRIOR_PROB": 0.02})
    GFLCheckpointer(target).load(path)
    assert _equal(source, target)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"MODEL.GFL.NUM_CLASSES": 5},
         ["head.cls_score.weight: checkpoint (3, 64, 3, 3) vs model (5, 64, 3, 3)",
          "the checkpoint has 3 classes, the model 5"]),
        ({"MODEL.GFL.REG_MAX": 8},
         ["head.box_pred.weight: checkpoint (68, 64, 3, 3) vs model (36, 64, 3, 3)",
          "17 outputs per box edge, the model 9"]),
        ({"MODEL.GFL.NUM_CONVS": 1},
         ["in the checkpoint only: head.cls_tower.3.weight"]),
        ({"MODEL.GFL.CLS_LOSS": "FL", "MODEL.GFL.QUALITY": "centerness"},
         ["missing from the checkpoint: head.quality.weight"]),
    ],
)
def test_head_mismatch_is_an_error_with_keys_and_shapes(saved, overrides, expected):
    _, path = saved
    target = _model(**overrides)
    with pytest.raises(HeadMismatchError) as err:
        GFLCheckpointer(target).load(path)
    message = str(err.value)
    assert path in message and "refusing a partial load" in message
    for text in expected:
        assert text in message
    # detectron2's own checkpointer accepts the same file with warnings only: a partial head.
    DetectionCheckpointer(_model(**overrides)).load(path)


def test_reinit_keeps_init_of_mismatching_head_tensors_and_warns(saved, caplog):
    source, path = saved
    target = _model(**{"MODEL.GFL.NUM_CLASSES": 5})
    init_cls = target.head.cls_score.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        GFLCheckpointer(target, head_mismatch="reinit").load(path)
    assert torch.equal(target.head.cls_score.weight, init_cls)
    assert _equal(source, target, "head.cls_tower") and _equal(source, target, "backbone")
    assert "head.cls_score.weight" in caplog.text and "keep their initialisation" in caplog.text


def test_unknown_policy_is_refused(saved):
    with pytest.raises(ValueError, match=r"CHECKPOINT_HEAD_MISMATCH='skip'.*\['error', 'reinit'\]"):
        GFLCheckpointer(saved[0], head_mismatch="skip")


def test_backbone_only_checkpoint_is_fine(saved, tmp_path):
    source, _ = saved
    path = str(tmp_path / "backbone.pth")
    torch.save({"model": {k: v for k, v in source.state_dict().items() if k.startswith("backbone.")}}, path)
    target = _model(**{"MODEL.GFL.NUM_CLASSES": 7})
    GFLCheckpointer(target).load(path)
    assert _equal(source, target, "backbone.")


def test_checkpoint_matching_nothing_is_an_error(saved, tmp_path):
    source, _ = saved
    path = str(tmp_path / "other.pth")
    torch.save({"model": {"bbox_head." + k: v for k, v in source.state_dict().items()}}, path)
    with pytest.raises(HeadMismatchError, match="None of the .* tensors"):
        GFLCheckpointer(_model()).load(path)


# --------------------------------------------------------------------------------------------
# Damaged files
# --------------------------------------------------------------------------------------------
def _random_bytes(n: int, seed: int) -> bytes:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8).numpy().tobytes()


def _no_unsafe_advice(excinfo) -> str:
    """The whole report a user sees, chained causes included; it must not advise unpickling."""
    import traceback

    text = "".join(traceback.format_exception(excinfo.value))
    assert "weights_only=False" not in text and "weights_only` set to `False" not in text, text
    return text


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
@pytest.mark.parametrize("content", ["random100", "random4096", "empty", "zip_magic", "text"])
def test_unreadable_file_is_a_checkpoint_read_error_naming_it(saved, tmp_path, suffix, content):
    data = {
        "random100": _random_bytes(100, 0),  # torch: "Unsupported operand 95"; pickle: load key
        "random4096": _random_bytes(4096, 1),
        "empty": b"",
        "zip_magic": b"PK\x03\x04" + _random_bytes(200, 2),
        "text": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n",
    }[content]
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(data)
    with pytest.raises(CheckpointReadError) as err:
        GFLCheckpointer(saved[0]).load(str(path))
    assert str(path) in str(err.value)
    _no_unsafe_advice(err)


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_pickle_that_is_no_checkpoint_is_a_read_error(saved, tmp_path, suffix):
    import pickle

    path = tmp_path / f"numbers{suffix}"
    if suffix == ".pth":
        torch.save([1, 2, 3], str(path))
    else:
        path.write_bytes(pickle.dumps(42))
    with pytest.raises(CheckpointReadError, match=str(path)):
        GFLCheckpointer(saved[0]).load(str(path))


def test_directory_is_a_read_error_listing_its_checkpoints(saved):
    folder = os.path.dirname(saved[1])
    with pytest.raises(CheckpointReadError, match=r"is a directory.*model_a\.pth") as err:
        GFLCheckpointer(saved[0]).load(folder)
    assert folder in str(err.value)


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.999])
def test_truncated_pth_is_a_clear_error(saved, tmp_path, keep):
    _, path = saved
    data = open(path, "rb").read()
    cut = str(tmp_path / "model_cut.pth")
    with open(cut, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointReadError) as err:
        GFLCheckpointer(saved[0], str(tmp_path)).load(cut)
    message = str(err.value)
    assert cut in message and ("truncated" in message or "empty" in message)


def test_truncated_pkl_is_a_clear_error(saved, tmp_path):
    import pickle

    source, _ = saved
    blob = pickle.dumps({"model": {k: v.numpy() for k, v in source.state_dict().items()},
                         "__author__": "test"})
    cut = str(tmp_path / "model_cut.pkl")
    with open(cut, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(CheckpointReadError, match="truncated"):
        GFLCheckpointer(source).load(cut)


# --------------------------------------------------------------------------------------------
# Crash during a save
# --------------------------------------------------------------------------------------------
class _Crash(Exception):
    pass


def _crashing_save(obj, f, *args, **kwargs):
    """Write half of a real checkpoint, then die (a kill or a full disk mid-write)."""
    real = _crashing_save.real
    import io

    buffer = io.BytesIO()
    real(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    raise _Crash("killed while writing")


@pytest.mark.parametrize("checkpointer_cls", [GFLCheckpointer, DetectionCheckpointer])
def test_crash_while_saving_keeps_last_checkpoint(saved, tmp_path, monkeypatch, checkpointer_cls):
    model = saved[0]
    folder = str(tmp_path)
    checkpointer = checkpointer_cls(model, folder)
    checkpointer.save("model_0000001")
    checkpointer.save("model_final")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.head.cls_score.bias.add_(1.0)  # the state of a later iteration
    _crashing_save.real = torch.save
    monkeypatch.setattr(torch, "save", _crashing_save)
    for name in ("model_0000002", "model_final"):  # a new file, and one overwritten in place
        with pytest.raises(_Crash):
            checkpointer.save(name)
    monkeypatch.undo()
    with torch.no_grad():
        model.head.cls_score.bias.sub_(1.0)

    fresh = GFLCheckpointer(_model(), folder)
    if checkpointer_cls is DetectionCheckpointer:
        # detectron2 0.6 writes in place: the tag now names a half-written file.
        with pytest.raises(CheckpointReadError):
            fresh.resume_or_load("", resume=True)
        return
    assert open(os.path.join(folder, "last_checkpoint")).read() == "model_final.pth"
    assert sorted(os.listdir(folder)) == ["last_checkpoint", "model_0000001.pth", "model_final.pth"]
    fresh.resume_or_load("", resume=True)
    state = fresh.model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_leftover_temporary_file_is_not_a_checkpoint(saved, tmp_path):
    """A hard kill (no cleanup) leaves ``*.pth.tmp``: never listed, never tagged."""
    checkpointer = GFLCheckpointer(saved[0], str(tmp_path))
    checkpointer.save("model_0000001")
    (tmp_path / "model_0000002.pth.tmp").write_bytes(b"PK\x03\x04half")
    assert [os.path.basename(p) for p in checkpointer.get_all_checkpoint_files()] == ["model_0000001.pth"]
    assert checkpointer.get_checkpoint_file().endswith("model_0000001.pth")
