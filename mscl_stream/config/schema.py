"""The typed configuration tree: one dataclass per section (data, augment, flow, ...) under :class:`Config`.

Every knob of a run is a field here, with its default and a comment saying what it means;
:mod:`mscl_stream.config.loading` fills the tree from YAML and overrides and checks it
(docs/configuration.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    manifest: str = ""                  # manifest.jsonl written by `mscl-stream index`
    split: str = "train"                # manifest split used for pretraining ("" = all rows)
    frames_per_clip: int = 8            # T
    frame_stride: int = 16              # raw frames between sampled frames
    flow_gap: int = 8                   # flow pair (r, r + flow_gap)
    max_shift: int = 128                # window B starts at A + d, d in [-max_shift, max_shift], even
    wrap: bool = True                   # indices past the end wrap around (else clamp the start)
    flow_frames: Literal["even", "all"] = "even"   # which sampled frames get a flow pair
    clips_per_video: int = 1            # samples per video per epoch
    # repeated sampling (docs/data.md): each video visit gives R samples, each with its own windows, decoded
    # in one sweep; an epoch has R times the samples. 1 = off (the method's sampling)
    repeat_samples: int = 1
    batch_size: int = 8                 # clips per rank per step
    frame_size: tuple[int, int] = (128, 176)   # (H, W) working size after decode: flow runs here
    # auto: on CPU, DALI where it decodes the codec (VP8/VP9/MJPEG), else PyAV; on CUDA, PyAV unless a
    # DALI engine was measured faster on that GPU (docs/data.md, "Choosing the decoder"). dali / pyav force one path.
    decoder: Literal["auto", "dali", "pyav"] = "auto"
    # how DALI decodes (docs/data.md): decoder = fn.decoders.video on whole files; reader =
    # fn.experimental.readers.video on per-frame file lists (decoder kept open along a sample's frames);
    # legacy = fn.readers.video (GPU only), one sequence per window
    dali_mode: Literal["decoder", "reader", "legacy"] = "decoder"
    # PyAV decode workers. auto: processes on CUDA (decode threads contend for the GIL with the training
    # thread, which launches many small kernels; benchmarks/README.md), threads on CPU. data.decode_workers of them.
    pyav_workers: Literal["auto", "threads", "processes"] = "auto"
    # what PyAV workers hand over (docs/data.md, "Where colour conversion happens"): rgb = converted and
    # resized on the CPU by swscale; yuv = the decoder's 4:2:0 planes, converted and resized on the training
    # device by torch (files of other pixel formats still come as rgb). auto: yuv on CUDA, rgb on CPU
    pyav_output: Literal["auto", "rgb", "yuv"] = "auto"
    # how worker processes return frames (docs/data.md, "Where colour conversion happens"): shm = written
    # into shared-memory slots of the training process (pickled whenever no slot can be had); pickle =
    # through the pool's pipe. Decode threads need neither
    pyav_handoff: Literal["shm", "pickle"] = "shm"
    decode_workers: int = 2             # DALI threads, or PyAV worker threads / processes
    prefetch: int = 2                   # batches decoded ahead
    mds: Literal["off", "index", "online"] = "off"   # index: starts stored by `mscl-stream index --mds`
    mds_candidates: int = 2             # online: candidate windows scored per sample (K)
    seed: int = 0


@dataclass
class AugmentConfig:
    out_size: int = 112
    crop_area: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, sat, hue
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    backend: Literal["auto", "torch", "triton"] = "auto"   # auto: fused Triton kernels on CUDA, kornia/torch else


@dataclass
class FlowConfig:
    estimator: str = "raft_small"       # a registered name or "package.module:factory"
    weights: str = "none"               # file path, torchvision enum name, or "none" (random init)
    iters: int = 12
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False
    cuda_graph: bool = False
    chunk_size: int = 0                 # pairs per chunk (0 = estimator's own memory budget)
    options: dict = field(default_factory=dict)   # extra keyword options for the estimator
    # a "package.module:factory" estimator imports and runs that code: only with this opt-in (or the
    # environment variable MSCL_STREAM_ALLOW_IMPORT=1); see docs/reliability.md
    allow_import: bool = False


@dataclass
class ModelConfig:
    feat_dim: int = 128
    queue_size: int = 65536
    momentum: float = 0.994             # base EMA momentum, cosine-ramped to 1
    neck_channels: int = 128
    rgb_width: int = 64                 # R3D-18 stage widths w,2w,4w,8w; 64 = torchvision's r3d_18 (the method)
    key_bn: Literal["shuffle", "sync", "none"] = "shuffle"
    head_bn: bool = False               # BatchNorm in the projection heads (not in the method; docs/configuration.md)
    compat: Literal["default", "released"] = "default"


@dataclass
class LossConfig:
    temperature: float = 0.07
    # weight per term; 0 disables a term (ablations). Names: docs/method.md, sections 5-6.
    weights: dict = field(default_factory=lambda: {
        "rgb_rgb": 1.0, "flow_flow": 1.0, "rot_rot": 1.0, "rgb_flow": 1.0,
        "flow_rgb": 1.0, "rgb_rot": 1.0, "rot_rgb": 1.0, "lmcl": 1.0,
    })


@dataclass
class OptimConfig:
    lr: float = 0.02                    # for base_batch clips; scaled linearly by the global batch
    base_batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    clip_grad: float = 40.0
    # SGD kernels (mscl_stream/train/optim.py): auto = fused where torch supports it on the device
    # (its found_inf lets the non-finite guard skip a step without a host read), else foreach
    impl: Literal["auto", "fused", "foreach", "loop"] = "auto"


@dataclass
class TrainConfig:
    epochs: int = 400
    max_steps: int = 0                  # > 0 stops early (benchmarks, demo)
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True          # channels_last_3d on GPU
    compile: bool = False               # torch.compile encoders, neck and heads (MSCL.compile_encoders)
    flow_ahead: bool = False            # next batch's flow on a side CUDA stream (train/flow_ahead.py)
    out_dir: str = "runs/default"
    ckpt_every: int = 500               # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 3           # periodic step files kept besides last.pt (0 = keep all)
    resume: str = ""                    # "", a path, or "auto"
    overwrite: bool = False             # replace the run already in out_dir (else refused without resume)
    max_bad_steps: int = 5              # consecutive NaN/inf steps before stopping
    seed: int = 0
    deterministic: bool = False


@dataclass
class EvalConfig:
    """Downstream evaluation (`mscl-stream eval`); fine-tune defaults are the SSv2 recipe (section 8)."""
    clips: int = 1                      # clips per video, evenly spread: features (or test probabilities) averaged
    epochs: int = 22                    # fine-tune
    lr: float = 0.12                    # fine-tune, for base_batch clips; scaled by batch_size
    base_batch: int = 32
    batch_size: int = 32
    weight_decay: float = 1e-6
    clip_grad: float = 40.0
    milestones: tuple[int, int] = (14, 18)   # epochs where the lr is multiplied by 0.1
    max_steps: int = 0                  # > 0 stops fine-tuning early (smoke runs)
    test_short_side: int = 0            # > 0: test frames resized to this short side, aspect kept; 0: data.frame_size
    test_crop: int = 0                  # side of the square test crop; 0: augment.out_size
    crops: int = 1                      # test crops per clip: 1 (centre) or 3 (ends + centre of the long side)
    segments: int = 0                   # > 0: segment sampling, this many segments of one frame (SSv2)
    dataset: str = ""                   # names the results ("ucf101", "ssv2", ...)
    out_dir: str = "runs/finetune"      # fine-tune run folder (a {split} subfolder per split with --splits)
    val_every: int = 1                  # fine-tune: a validation pass every this many epochs
    val_clips: int = 1                  # fine-tune: clips per video of the validation pass (one centre crop)
    test_views: str = ""                # fine-tune final test view counts, e.g. "10x3,1x1" (default clips x crops)
    train_size: int = 0                 # fine-tune training crop side (0: augment.out_size)
    crop_scale: tuple[float, float] = (0.08, 1.0)   # random resized crop: area fraction range
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)   # and aspect ratio range


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = True
    jsonl: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
