"""Full-size simulations under FakeTensorMode: exact reference peaks, in seconds and a few hundred MB of host memory.

Each family runs in a fresh interpreter so its time and host memory (ru_maxrss) are its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_SCRIPT = """
import json, resource, sys, time
from memopt import simulate_family
start = time.perf_counter()
trace = simulate_family(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - start, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "total": trace.total_peak_bytes, "baseline": trace.baseline_bytes, "peak": trace.peak_bytes,
                  "op": trace.peak_op, "module": trace.peak_module, "ops": trace.num_ops, "ld": trace.meta["ld"]}))
"""

GIB = 1024**3

# Reference values found independently (research/profiler_anchors.md, DESIGN.md), bf16, `from_pretrained`-style
# dtypes (`_keep_in_fp32_modules` stay fp32), the output counted as activation.
REFERENCE = {
    "wan": dict(total=37_259_494_856, baseline=28_650_270_856, peak=8_609_224_000, op="mul",
                module="blocks.0.attn2.norm_q", ops=6041, ld=11.1),
    "hunyuanvideo": dict(total=38_937_829_682, baseline=25_659_332_234, peak=13_278_497_448, op="mul",
                         module="single_transformer_blocks.0.attn", ops=8150, ld=18.2),
    "flux": dict(total=24_293_631_626, baseline=23_807_564_422, peak=486_067_204, op="mul",
                 module="single_transformer_blocks.0.attn", ops=6943, ld=19.3),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(REFERENCE))
def test_full_size_simulation_matches_reference(family: str) -> None:
    run = subprocess.run([sys.executable, "-c", _SCRIPT, family], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    expected = REFERENCE[family]
    for key in ("total", "baseline", "peak", "op", "module", "ops"):
        assert result[key] == expected[key], (key, result[key], expected[key])
    assert round(result["ld"], 1) == expected["ld"]
    assert result["seconds"] < 60, f"simulation took {result['seconds']:.1f} s"
    assert result["rss"] < 2 * GIB, f"host memory {result['rss'] / GIB:.2f} GiB"
