"""Tiny sizes shared by the hook tests: token counts (70 / 35 / 45) not divisible by the chunk counts they use."""

import torch

from memopt.models import Size

FAMILIES = ["wan", "chronoedit", "skyreels_v2", "helios", "flux", "flux2", "hunyuanvideo", "hunyuanvideo15",
            "cogvideox", "ltx", "ltx2", "qwenimage", "sd3", "mochi"]
# Families whose output head runs whole by plan (FLUX.2 slices the text tokens off the last block's output before its
# head, which the tail pass cannot follow); apply_sequence_chunking reports it as skipped.
HEAD_RUNS_WHOLE = {"flux2"}
SIZES = {
    "wan": Size(80, 112, 5),
    "chronoedit": Size(80, 112, 5),
    "skyreels_v2": Size(80, 112, 9),
    "helios": Size(48, 80, 9),
    "flux": Size(80, 112),
    "flux2": Size(80, 112),
    "hunyuanvideo": Size(80, 112, 5),
    "hunyuanvideo15": Size(80, 112, 9),
    "cogvideox": Size(80, 112, 5),
    "ltx": Size(160, 224, 9),
    "ltx2": Size(96, 160, 17),
    "qwenimage": Size(80, 112),
    "sd3": Size(80, 112),
    "mochi": Size(48, 80, 13),
}


def check_report(family: str, report) -> None:
    """Every block chunked and its attention exchanging K/V; the output head in chunks unless the plan says not."""
    assert report.blocks and report.attention, report
    if family in HEAD_RUNS_WHOLE:
        assert report.tail is None and [path for path, _ in report.skipped] == ["<model>"], report
    else:
        assert report.tail and not report.skipped, report


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()
