"""Motion ops of MSCL: flow normalisation and colour wheel, FRA rotation and flow views, MDS scores.

The spec is docs/method.md, sections 2-4; flow convention: channel 0 = u (right), channel 1 = v (down),
in pixels. ``wheel`` holds the colour encoding, ``views`` the per-view crop/flip/rotation, ``mds`` every
MDS score and start rule (index time and online); this package re-exports their public names.
"""

from mscl_stream.geometry import crop_resize
from mscl_stream.motion.mds import (MDS_CLIP_STEPS, MDS_POOL, MDS_STEP, mds_allowed_starts, mds_clip_scores,
                                    mds_video_starts, motion_attention, motion_boundaries, select_online_mds,
                                    window_motion_scores)
from mscl_stream.motion.views import FRA_BINS, flow_views, fra_angles, fra_angles_from_uniforms, rotate_flow
from mscl_stream.motion.wheel import (FLOW_EPS, WHEEL_SEGMENTS, WHEEL_SIZE, colorwheel, flow_to_color,
                                      normalize_flow, wheel_encode_255)

__all__ = [
    "FLOW_EPS", "FRA_BINS", "MDS_CLIP_STEPS", "MDS_POOL", "MDS_STEP", "WHEEL_SEGMENTS", "WHEEL_SIZE",
    "colorwheel", "crop_resize", "flow_to_color", "flow_views", "fra_angles", "fra_angles_from_uniforms",
    "mds_allowed_starts", "mds_clip_scores", "mds_video_starts", "motion_attention", "motion_boundaries",
    "normalize_flow", "rotate_flow", "select_online_mds", "wheel_encode_255", "window_motion_scores",
]
