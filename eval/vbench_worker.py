"""Run vbench 0.1.5 in custom-input mode; executed by the vbench environment's python, not vidlab's.

Standard library and vbench only (no vidlab import): eval/vbench.py starts it as
`.venv-vbench/bin/python -I eval/vbench_worker.py --videos-dir ... --output-dir ... --dimensions ...`
with VBENCH_CACHE_DIR set and the weights already checked. Writes `{output}/{name}_eval_results.json`
and `{output}/{name}_full_info.json`; exits 1 with a one-line reason on stderr when vbench fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

# Run as a script, this folder (eval/, which holds eval/vbench.py) would come first on sys.path and
# shadow the vbench package; `-I` already leaves it out, this covers a direct `python vbench_worker.py`.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run `VBench(...).evaluate(..., mode="custom_input", local=True)`; 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--videos-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--name", default="vidlab")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dimensions", nargs="+", required=True)
    args = parser.parse_args(argv)
    try:
        import vbench  # noqa: PLC0415  (here, so an import failure is reported like any other)
        import torch  # noqa: PLC0415

        cache_dir = os.environ.get("VBENCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vbench")
        # DINO's hubconf (subject_consistency) loads its weights via torch.hub's checkpoint cache:
        # keep that under the vbench cache too (dino_model/checkpoints/), not under ~/.cache/torch.
        torch.hub.set_dir(os.path.join(cache_dir, "dino_model"))
        full_info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
        bench = vbench.VBench(args.device, full_info, args.output_dir)
        bench.evaluate(args.videos_dir, args.name, dimension_list=args.dimensions, local=True, mode="custom_input")
    except BaseException as exc:  # noqa: BLE001  (any failure becomes exit 1 with its reason)
        traceback.print_exc()
        print(f"vbench_worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    results = os.path.join(args.output_dir, f"{args.name}_eval_results.json")
    if not os.path.isfile(results):
        print(f"vbench_worker: vbench wrote no {results}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
