"""On-device RGB augmentation of one clip window, with one parameter set per clip.

:func:`sample_params` draws every random choice on the CPU (``params``); :func:`upload_views` sends all
parameters of a step to the device as ONE float32 table (``upload``); :func:`apply_uploaded` runs the
pixel work on whatever device the frames are on, reading nothing back (``rgb``). The split keeps runs
reproducible, keeps the host from waiting on the device, and lets the flow side reuse exactly the same
crop box and flip of a view (:func:`mscl_stream.geometry.crop_resize`).
"""

from mscl_stream.augment.params import (COL_BLUR, COL_BOX, COL_FACTORS, COL_FLIP, COL_GRAY, COL_JITTER, COL_ORDER,
                                        COL_SIGMA, IMAGENET_MEAN, IMAGENET_STD, N_UNIFORMS, VIEW_COLS,
                                        AugmentParams, crop_boxes_from_uniforms, param_table, params_from_uniforms,
                                        sample_crop_boxes, sample_params, subset_rows)
from mscl_stream.augment.rgb import (AugmentedView, apply_params, apply_uploaded, augment_backend, augment_view,
                                     blur_kernel_size)
from mscl_stream.augment.upload import UploadedView, upload, upload_views
from mscl_stream.config import AugmentConfig
from mscl_stream.geometry import crop_resize

__all__ = [
    "COL_BLUR", "COL_BOX", "COL_FACTORS", "COL_FLIP", "COL_GRAY", "COL_JITTER", "COL_ORDER", "COL_SIGMA",
    "IMAGENET_MEAN", "IMAGENET_STD", "N_UNIFORMS", "VIEW_COLS", "AugmentConfig", "AugmentParams",
    "AugmentedView", "UploadedView", "apply_params", "apply_uploaded", "augment_backend", "augment_view",
    "blur_kernel_size", "crop_boxes_from_uniforms", "crop_resize", "param_table", "params_from_uniforms",
    "sample_crop_boxes", "sample_params", "subset_rows", "upload", "upload_views",
]
