"""`mscl-stream index`: discover and probe a video collection, optionally score MDS starts, write the manifest.

The wiring of the command: the data layer builds the manifest (``mscl_stream.data.indexing``), and with
``--mds`` it is handed the index-time MDS scorer of ``mscl_stream.motion.mds``, so the data layer never
imports flow or motion code.
"""

from __future__ import annotations

import os

from mscl_stream.config import DataConfig
from mscl_stream.data.indexing import build_manifest
from mscl_stream.motion.mds import MDSScorer


def index_videos(src: str | os.PathLike, output: str | os.PathLike, *, data: DataConfig, workers: int = 0,
                 mds: bool = False, mds_estimator: str = "dis_fast", fmt: str = "auto",
                 splits: list[int] | None = None) -> dict:
    """Index ``src`` into the manifest ``output`` (and its report); returns the report.

    Args:
        src, output, data, workers, fmt, splits: as :func:`mscl_stream.data.indexing.build_manifest`.
        mds: also compute the MDS allowed starts of every usable video (docs/method.md, section 4),
            with flows F_j = flow(raw 2j -> raw 2j + ``data.flow_gap``) from ``mds_estimator``.
        mds_estimator: flow estimator name for the MDS flows (built on the CPU in every worker).
    """
    scorer = MDSScorer(estimator=mds_estimator, flow_gap=data.flow_gap) if mds else None
    return build_manifest(src, output, data=data, workers=workers, mds_scorer=scorer, fmt=fmt, splits=splits)
