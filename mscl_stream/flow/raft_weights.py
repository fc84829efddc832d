"""RAFT weights: a local file (torchvision state_dict or an original princeton-vl checkpoint, whose key
names are remapped), a torchvision weights enum name (fetched only when asked for), or "none".

Every failure (missing file, unreadable file, wrong keys, another architecture, offline enum) is a
one-line UserError that says what to do.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import torch

from mscl_stream.errors import UserError

log = logging.getLogger(__name__)


# Original princeton-vl RAFT names (after the DataParallel "module." prefix is dropped) -> torchvision.
_PRINCETON_UPDATE = [
    (r"update_block\.encoder\.convc(\d)\.", r"update_block.motion_encoder.convcorr\1.0."),
    (r"update_block\.encoder\.convf(\d)\.", r"update_block.motion_encoder.convflow\1.0."),
    (r"update_block\.encoder\.conv\.", r"update_block.motion_encoder.conv.0."),
    (r"update_block\.gru\.conv([zrq])(\d)\.", r"update_block.recurrent_block.convgru\2.conv\1."),
    (r"update_block\.gru\.conv([zrq])\.", r"update_block.recurrent_block.convgru1.conv\1."),
    (r"update_block\.flow_head\.", r"update_block.flow_head."),
    (r"update_block\.mask\.0\.", r"mask_predictor.convrelu.0."),
    (r"update_block\.mask\.2\.", r"mask_predictor.conv."),
]
_PRINCETON_ENCODERS = {"fnet": "feature_encoder", "cnet": "context_encoder"}


def is_princeton_checkpoint(state: dict) -> bool:
    """True for the original RAFT layout (fnet/cnet/update_block.encoder names, maybe 'module.')."""
    return any(k.startswith(("module.", "fnet.", "cnet.")) or k.startswith("update_block.encoder.") for k in state)


def princeton_to_torchvision(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Rename an original princeton-vl RAFT state_dict to torchvision's RAFT names.

    The original residual blocks register their downsample norm twice (``normK`` and
    ``downsample.1``), so both names map to torchvision's ``downsample.1``. Residual blocks
    (raft_large) have 2 convs, bottleneck blocks (raft_small) 3; the norm after the last conv is the
    downsample norm.

    Raises:
        UserError: a key that fits neither layout (the file is not a RAFT checkpoint).
    """
    n_convs = 3 if arch == "small" else 2
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        new = None
        enc = re.fullmatch(r"(fnet|cnet)\.(.+)", k)
        if enc:
            prefix, rest = _PRINCETON_ENCODERS[enc.group(1)], enc.group(2)
            if m := re.fullmatch(r"conv1\.(.+)", rest):
                new = f"{prefix}.convnormrelu.0.{m.group(1)}"
            elif m := re.fullmatch(r"norm1\.(.+)", rest):
                new = f"{prefix}.convnormrelu.1.{m.group(1)}"
            elif m := re.fullmatch(r"conv2\.(.+)", rest):
                new = f"{prefix}.conv.{m.group(1)}"
            elif m := re.fullmatch(r"(layer\d\.\d)\.conv(\d)\.(.+)", rest):
                new = f"{prefix}.{m.group(1)}.convnormrelu{m.group(2)}.0.{m.group(3)}"
            elif m := re.fullmatch(r"(layer\d\.\d)\.norm(\d)\.(.+)", rest):
                k_norm = int(m.group(2))
                mid = f"convnormrelu{k_norm}.1" if k_norm <= n_convs else "downsample.1"
                new = f"{prefix}.{m.group(1)}.{mid}.{m.group(3)}"
            elif m := re.fullmatch(r"(layer\d\.\d\.downsample\.[01]\..+)", rest):
                new = f"{prefix}.{m.group(1)}"
        else:
            for pattern, repl in _PRINCETON_UPDATE:
                if re.match(pattern, k):
                    new = re.sub(pattern, repl, k, count=1)
                    break
        if new is None:
            raise UserError(f"unrecognised key {key!r} in a princeton-vl RAFT checkpoint")
        out[new] = value
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; the message is what matters
        first = (str(e).splitlines() or [""])[0][:160]
        raise UserError(f"cannot load RAFT weights {path} with weights_only=True "
                        f"({type(e).__name__}: {first}); save a state_dict") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"RAFT weights {path} do not hold a state_dict of tensors")
    return obj


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """load_state_dict with one-line errors for wrong keys and architecture mismatches."""
    own = model.state_dict()
    other = "large" if arch == "small" else "small"
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    hint = ""
    if any(k.startswith("mask_predictor.") for k in state) != any(k.startswith("mask_predictor.") for k in own):
        hint = f" (looks like a raft_{other} checkpoint)"
    if missing or unexpected:
        raise UserError(f"RAFT weights {source} do not match raft_{arch}{hint}: {len(missing)} missing keys "
                        f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise UserError(f"RAFT weights {source} do not fit raft_{arch}: {k} has shape {tuple(v.shape)} in "
                            f"the file, {tuple(own[k].shape)} in the model (a raft_{other} checkpoint?)")
    model.load_state_dict(state, strict=True)


def _weights_enum(arch: str, spec: str):
    """The torchvision weights enum member a name refers to, or None if it is not an enum name."""
    from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights
    enums = {"small": Raft_Small_Weights, "large": Raft_Large_Weights}
    cls_name, _, member = spec.rpartition(".")
    own, other = enums[arch], enums["large" if arch == "small" else "small"]
    if cls_name == other.__name__:
        raise UserError(f"weights {spec!r} are for {other.__name__[:10].lower()}, not raft_{arch}")
    if cls_name not in ("", own.__name__):
        return None
    try:
        return own[member]
    except KeyError:
        if cls_name:
            names = ", ".join(m for m in own.__members__)
            raise UserError(f"{own.__name__} has no member {member!r}; choose one of {names}") from None
        return None


def load_raft_weights(model: torch.nn.Module, arch: str, weights: str | os.PathLike) -> str:
    """Load weights into a torchvision RAFT model; return a description of the source for logs.

    Args:
        model: ``raft_small()`` / ``raft_large()`` built without weights.
        arch: "small" or "large".
        weights: "none" (keep the random init, warn), a file path (torchvision or princeton-vl
            layout), or a torchvision enum name, looked up first in ``$TORCH_HOME/hub/checkpoints``
            and otherwise downloaded by torchvision.

    Raises:
        UserError: missing file, unreadable file, wrong keys, mismatched architecture, unknown name,
            or a download that fails (offline): the message says where to place the file.
    """
    spec = os.fspath(weights)
    if spec.strip().lower() in ("", "none", "random"):
        msg = (f"raft_{arch}: weights=none, RANDOM INITIALISATION: the flow is meaningless until real "
               f"weights are given (a file path or a torchvision enum name such as "
               f"{'C_T_V2' if arch == 'small' else 'C_T_SKHT_V2'})")
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
        return "none (random init)"
    path = Path(spec).expanduser()
    if path.is_file():
        state = _read_state_dict(path)
        layout = "torchvision"
        if is_princeton_checkpoint(state):
            state = princeton_to_torchvision(state, arch)
            layout = "princeton-vl"
        _load_into(model, state, arch, str(path))
        return f"file:{path.resolve()} ({layout} layout)"
    member = None if ("/" in spec or os.sep in spec or path.suffix in (".pth", ".pt", ".ckpt")) \
        else _weights_enum(arch, spec)
    if member is None:
        if path.suffix or "/" in spec:
            raise UserError(f"RAFT weights file not found: {spec}")
        raise UserError(f"unknown RAFT weights {spec!r}: give a file path, a torchvision enum name "
                        f"(e.g. {'C_T_V2' if arch == 'small' else 'C_T_SKHT_V2'}) or none")
    label = f"torchvision:{type(member).__name__}.{member.name}"
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache_dir / os.path.basename(member.url)
    if cached.is_file():
        _load_into(model, _read_state_dict(cached), arch, str(cached))
        return f"{label} (file:{cached})"
    try:
        state = member.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # URLError, socket timeouts, hash mismatch...
        raise UserError(f"could not download {label} ({type(e).__name__}); offline, place {cached.name} in "
                        f"{cache_dir}/ or pass weights=<path to a state_dict file>") from None
    _load_into(model, state, arch, label)
    return label
