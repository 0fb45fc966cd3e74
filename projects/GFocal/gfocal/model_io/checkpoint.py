"""A :class:`DetectionCheckpointer` for GFL: atomic saves, clear errors for unreadable files and
for checkpoints whose head does not fit the model."""
import os
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..config import HEAD_MISMATCH_POLICIES

__all__ = ["GFLCheckpointer", "CheckpointReadError", "HeadMismatchError", "HEAD_MISMATCH_POLICIES"]

_HEAD_PREFIX = "head."


class CheckpointReadError(RuntimeError):
    """A checkpoint path that cannot be read: an empty, truncated or corrupt file, a file that is
    no checkpoint, or a directory."""


class HeadMismatchError(RuntimeError):
    """A checkpoint's head tensors do not fit the model's head."""


def _first_line(error: BaseException) -> str:
    """The useful line of a load error: for torch's safe loader (``weights_only=True``) the
    unpickler's own line, not its advice to unpickle the file unsafely."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = text.split(marker, 1)[1].split("Check the documentation")[0]
        return f"torch's safe loader: {' '.join(detail.split())}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _unreadable_reason(path: str, error: BaseException) -> Tuple[str, bool]:
    """Why ``path`` failed to load, and whether it looks cut short (empty or truncated)."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)", True
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":  # torch's zip format: its central directory is at the very end
        try:
            with zipfile.ZipFile(path) as archive:
                bad_member = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"the zip archive is truncated or corrupt ({size} bytes; {e})", True
        if bad_member is not None:
            return f"member {bad_member!r} of the zip archive is corrupt", True
        return (f"torch.load cannot read this intact zip archive ({size} bytes; "
                f"{_first_line(error)})"), False
    if isinstance(error, EOFError) or "truncated" in str(error):
        return f"the pickle data ends early ({size} bytes): the file is truncated", True
    return (f"it is neither a torch checkpoint nor a readable pickle file ({size} bytes, "
            f"starting {magic!r}; {_first_line(error)})"), False


class GFLCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that

    * writes each checkpoint (and the ``last_checkpoint`` tag) to a temporary file and renames it
      into place, so that a crash during a save leaves the previous checkpoint loadable and tagged;
    * turns an empty, truncated or corrupt file into a :class:`CheckpointReadError` that names it;
    * refuses (``head_mismatch="error"``) a checkpoint that would fill only part of the GFL head:
      head tensors of other shapes (class count, ``reg_max``), head tensors missing from it or
      extra ones (tower depth, quality branch). The error lists the keys and shapes. A checkpoint
      with no head tensors at all (an ImageNet backbone) is fine: the head keeps its init.
      With ``head_mismatch="reinit"`` the mismatching tensors keep their initialisation instead,
      with the same list logged as a warning (fine-tuning on a dataset with other classes).
    * refuses a checkpoint of which no tensor matches the model (e.g. another framework's keys).
    """

    def __init__(self, model, save_dir: str = "", *, head_mismatch: str = "error", **kwargs):
        if head_mismatch not in HEAD_MISMATCH_POLICIES:
            raise ValueError(
                f"MODEL.GFL.CHECKPOINT_HEAD_MISMATCH={head_mismatch!r} is not one of "
                f"{list(HEAD_MISMATCH_POLICIES)}"
            )
        super().__init__(model, save_dir, **kwargs)
        self.head_mismatch = head_mismatch
        self._path: str = ""

    # ------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------
    def _is_local(self) -> bool:
        return "://" not in self.save_dir

    def save(self, name: str, **kwargs: Any) -> None:
        """Like :meth:`Checkpointer.save`, but atomic on a local ``save_dir``."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        self._write_atomic(save_file, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        tag_file = os.path.join(self.save_dir, "last_checkpoint")
        self._write_atomic(tag_file, lambda f: f.write(last_filename_basename), "w")

    @staticmethod
    def _write_atomic(path: str, write, mode: str) -> None:
        """Write to ``path + ".tmp"``, flush it to disk, then rename it over ``path``. The
        temporary name does not end in ``.pth``, so it is never taken for a checkpoint."""
        tmp = path + ".tmp"
        try:
            with open(tmp, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------
    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        self._path = path
        if path and os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pkl")))
            raise CheckpointReadError(
                f"Cannot load checkpoint {path}: it is a directory, not a file; give a checkpoint "
                f"file{' in it: ' + str(files[:5]) if files else ''} (MODEL.WEIGHTS or "
                "train.init_checkpoint), or resume from the folder with --resume and OUTPUT_DIR."
            )
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            loaded = super()._load_file(filename)
        except Exception as e:  # noqa: BLE001 - any failure to read an existing file is named
            if not os.path.isfile(filename):
                raise
            reason, cut_short = _unreadable_reason(filename, e)
            others = sorted(set(self.get_all_checkpoint_files()) - {filename}) if self.save_dir else []
            hint = f" Other checkpoints in {self.save_dir}: {others}." if others else ""
            cause = ("It was probably cut short while being written or copied" if cut_short else
                     "It is not a checkpoint this checkpointer reads (a .pth of torch.save'd "
                     "tensors, or a detectron2 / Detectron .pkl)")
            error = CheckpointReadError(
                f"Cannot load checkpoint {filename}: {reason}. {cause}; use another file "
                f"(MODEL.WEIGHTS, or the name in {self.save_dir or '<save_dir>'}/last_checkpoint "
                f"when resuming).{hint}"
            )
            # torch's safe-loader error advises weights_only=False: not for an unreadable file.
            raise error from (None if "weights_only" in str(e) else e)
        if not isinstance(loaded.get("model"), dict):
            raise CheckpointReadError(
                f"Cannot load checkpoint {filename}: its 'model' entry is a "
                f"{type(loaded.get('model')).__name__}, not a dict of tensors."
            )
        return loaded

    def _load_model(self, checkpoint: Any):
        num_checkpoint_keys = len(checkpoint.get("model", {}))
        incompatible = super()._load_model(checkpoint)
        model_keys = self.model.state_dict().keys()
        missing = set(incompatible.missing_keys)
        shapes = {k: (c, m) for k, c, m in incompatible.incorrect_shapes}
        if num_checkpoint_keys and all(k in missing or k in shapes for k in model_keys):
            raise HeadMismatchError(
                f"None of the {num_checkpoint_keys} tensors of checkpoint {self._path} fits the "
                f"model (first keys: {list(incompatible.unexpected_keys)[:5]}). Is it a checkpoint "
                "of another framework or model?"
            )
        self._check_head(incompatible)
        return incompatible

    def _check_head(self, incompatible) -> None:
        missing = sorted(k for k in incompatible.missing_keys if k.startswith(_HEAD_PREFIX))
        unexpected = sorted(k for k in incompatible.unexpected_keys if k.startswith(_HEAD_PREFIX))
        wrong = sorted(
            (k, c, m) for k, c, m in incompatible.incorrect_shapes if k.startswith(_HEAD_PREFIX)
        )
        model_head = [k for k in self.model.state_dict() if k.startswith(_HEAD_PREFIX)]
        if not wrong and not unexpected and len(missing) == len(model_head):
            if model_head:
                self.logger.info("The checkpoint has no GFL head tensors: the head keeps its init.")
            return
        if not (missing or unexpected or wrong):
            return
        report = self._head_report(missing, unexpected, wrong)
        if self.head_mismatch == "error":
            raise HeadMismatchError(
                f"Checkpoint {self._path} does not fit the GFL head; refusing a partial load.\n"
                f"{report}\nFix MODEL.GFL.NUM_CLASSES / REG_MAX / NUM_CONVS / QUALITY / "
                "BOX_REPRESENTATION to match the checkpoint, or set "
                "MODEL.GFL.CHECKPOINT_HEAD_MISMATCH 'reinit' to train these tensors from their "
                "initialisation (fine-tuning on other classes)."
            )
        reinit = sorted({k for k, _, _ in wrong} | set(missing))
        # fvcore drops the tensors of other shapes before loading: they count as missing too.
        loaded = len(set(self.model.state_dict()) - set(incompatible.missing_keys))
        self.logger.warning(
            f"Checkpoint {self._path}: re-initialised {reinit}; loaded the other {loaded} tensors "
            f"(MODEL.GFL.CHECKPOINT_HEAD_MISMATCH='reinit').\n"
            f"These GFL head tensors keep their initialisation:\n{report}"
        )

    @staticmethod
    def _head_report(
        missing: List[str], unexpected: List[str], wrong: List[Tuple[str, tuple, tuple]]
    ) -> str:
        lines = [f"  shape of {k}: checkpoint {c} vs model {m}" for k, c, m in wrong]
        lines += [f"  missing from the checkpoint: {k}" for k in missing]
        lines += [f"  in the checkpoint only: {k}" for k in unexpected]
        for k, c, m in wrong:
            if k == "head.cls_score.weight":
                lines.append(f"  -> the checkpoint has {c[0]} classes, the model {m[0]} (NUM_CLASSES)")
            if k == "head.box_pred.weight" and c[0] % 4 == 0 and m[0] % 4 == 0:
                lines.append(
                    f"  -> the checkpoint has {c[0] // 4} outputs per box edge, the model "
                    f"{m[0] // 4} (REG_MAX + 1, or 1 for BOX_REPRESENTATION 'dirac')"
                )
        return "\n".join(lines)
