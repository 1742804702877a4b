"""Trim the PSGD-QUAD reference trajectories into ``tests/data/quad_reference.npz`` (run once, by hand).

    python tests/data/make_quad_reference.py /path/to/shared/quad

The source files come from running the PyTorch reference (``quad.py`` of
evanatyourservice/mlx-grokking @ 36a93bc) eagerly on the CPU with the grokking configuration on 17
tensor shapes for 300 steps, from seeded NumPy gradients that ``tests/test_quad.py`` regenerates
bit for bit. Kept, to stay small: parameters after steps 1, 10, 100 and 300 in float64 and float32
(the 128x512 tensor after step 300 only), the float32 factor states after steps 1, 249, 250 and 300
(the 128x512 tensor's after step 250 only), the tolerances, and two gradients to check the recipe.
"""
import json
import sys
from pathlib import Path

import numpy as np

PARAM_STEPS = (1, 10, 100, 300)
STATE_STEPS = (1, 249, 250, 300)
BIG = 6  # the (128, 512) tensor


def main(src: Path):
    out = {}
    for precision in ("float64", "float32"):
        ref = np.load(src / f"reference_grokking_{precision}.npz")
        for key in ref.files:
            parts = key.split("__")
            if parts[0] != "a_grokking":
                continue
            k = int(parts[1][1:])
            if parts[2].startswith("p"):
                step = int(parts[2][1:])
                if step in PARAM_STEPS and (k != BIG or step == 300):
                    out[f"{precision}__{parts[1]}__{parts[2]}"] = ref[key]
            elif precision == "float32":
                step = int(parts[2][len("state"):])
                if step in STATE_STEPS and (k != BIG or step == 250):
                    out[f"{precision}__{parts[1]}__{parts[2]}__{parts[3]}"] = ref[key]
        if precision == "float32":
            for k in (3, 12):
                out[f"grad__s{k:02d}__g2"] = ref[f"grad__s{k:02d}__g2"]
    tolerances = json.loads((src / "tolerances_grokking.json").read_text())
    out["tolerances_json"] = np.array(json.dumps(
        {"float64": tolerances["float64"]["a_grokking"], "float32": tolerances["float32"]["a_grokking"],
         "float32_states": tolerances["float32_states"]["a_grokking"]}))
    path = Path(__file__).with_name("quad_reference.npz")
    np.savez_compressed(path, **out)
    print(f"{path}: {len(out)} arrays, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
