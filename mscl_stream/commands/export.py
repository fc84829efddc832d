"""`mscl-stream export CHECKPOINT -o FILE`: a pretrain checkpoint's RGB encoder as a torchvision ``r3d_18`` state dict.

What is written: the query RGB encoder (``MSCL.rgb_encoder``, the network every downstream evaluation
starts from; not the momentum copy ``rgb_encoder_k``, the flow encoder or the necks) under torchvision's
own keys (``stem.*``, ``layer1.*`` .. ``layer4.*``), plus an ``fc`` of torchvision's default shape
(400 x 512) holding torchvision's initialisation drawn from a fixed seed. The head is untrained: it is
there only so that the file loads with ``strict=True`` into ``torchvision.models.video.r3d_18()``;
replace it (``model.fc = nn.Linear(512, classes)``) before fine-tuning. The file is a plain dict of
tensors, readable with ``torch.load(path, weights_only=True)``, and written atomically.

torchvision's ``r3d_18`` has one width (64, ``model.rgb_width``'s default): a checkpoint of a narrower
demo trunk cannot be held by it and is refused with a one-line error, as is a file that is not a
pretraining checkpoint (an exported or fine-tuned state dict, a results file).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mscl_stream.errors import UserError
from mscl_stream.eval.features import ENCODER_PREFIX, check_finite_state
from mscl_stream.models.r3d import WIDTH, R3DBackbone, to_torchvision, width_of
from mscl_stream.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint

HEAD_SEED = 0            # the untrained fc: the same bytes on every export of the same checkpoint
HEAD_CLASSES = 400       # torchvision r3d_18()'s default head


def pretrain_encoder_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The query RGB encoder of the pretrain checkpoint ``path``, as torchvision keys without ``fc``.

    Raises:
        UserError: missing or unreadable file, not a pretraining checkpoint, weights with NaN/inf.
    """
    state = load_checkpoint(path)
    model = state.get("model")
    if not isinstance(model, dict):
        hint = " (it looks like an r3d_18 state dict already)" if "stem.0.weight" in state else ""
        raise UserError(f"{path}: not a pretraining checkpoint: no 'model' entry{hint}")
    for prefix in (ENCODER_PREFIX, "module." + ENCODER_PREFIX):    # a DDP-wrapped model's keys too
        enc = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix) and torch.is_tensor(v)}
        if enc:
            break
    else:
        raise UserError(f"{path}: not a pretraining checkpoint: its model holds no {ENCODER_PREFIX}* weights "
                        f"(a fine-tuned or other model's checkpoint?)")
    enc = {k: v for k, v in enc.items() if not k.startswith("fc.")}
    if "stem.0.weight" not in enc:
        raise UserError(f"{path}: the {ENCODER_PREFIX}* weights hold no stem (not an R3D-18 encoder)")
    check_finite_state(enc, str(path))
    return enc


def export_encoder(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the torchvision ``r3d_18`` state dict of ``checkpoint``'s query RGB encoder to ``out``.

    Returns:
        The path written.

    Raises:
        UserError: see :func:`pretrain_encoder_state`; a trunk narrower or wider than torchvision's
            (``model.rgb_width`` != 64); ``out`` is a folder or cannot be written.
    """
    out = Path(out)
    if out.is_dir():
        raise UserError(f"-o {out}: is a folder; give a file name such as {out / 'r3d18_mscl.pt'}")
    enc = pretrain_encoder_state(checkpoint)
    width = width_of(enc)
    if width != WIDTH:
        raise UserError(f"{checkpoint}: the encoder is {width} channels wide (model.rgb_width={width}); "
                        f"torchvision's r3d_18 holds only width {WIDTH}")
    backbone = R3DBackbone(WIDTH)
    load_model_state(backbone, enc, what=f"{checkpoint} encoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)
        net = to_torchvision(backbone, num_classes=HEAD_CLASSES)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return save_checkpoint(out, state)
