"""Whether the Aligner keeps the sign of the attention it is given, with and without the residual Aligner.

A tiny IDEFICS (the test suite's, `tests/idefics_testers.py`) is trained on a tiny shapes world against oracle targets
(its blurred word masks) for `--steps` steps at lambda 100, once per seed, with the paper's Aligner
(`--no-aligner-residual`) and with the residual one. Printed per run: the mean `aligner_sign` of the last 10 steps
(correlation of each word's Aligner input with its output) and the correlation of the VLM's own attention maps with
the masks after training (`lavender eval attention`, mean-mean), against the untrained model's.

    python benchmarks/aligner_sign.py [--seeds 6] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    from family_testers import attention_maps, train_toward
    from idefics_testers import save_tiny_idefics
    from test_vlm_llava_next import _correlation

    from lavender.world.data import WorldDataConfig, write_world
    from lavender.world.oracle import write_oracle_store

    root = Path(tempfile.mkdtemp(prefix="aligner-sign-"))
    world = write_world(WorldDataConfig(out=str(root / "world"), size=32, train=12, test=4, ood=4))
    model = save_tiny_idefics(root / "model")
    oracle = write_oracle_store(world / "masks-train.safetensors", root / "oracle", resolution=8)
    before = _correlation(attention_maps(model, world, oracle, root / "before"), oracle)
    print(f"attention-mask correlation before training: {before:.3f}")
    print("| Aligner | seed | sign agreement (last 10 steps) | attention-mask correlation after |")
    print("| --- | --- | --- | --- |")
    for residual in (False, True):
        for seed in range(args.seeds):
            out = root / f"{residual}-{seed}"
            final = train_toward(model, world, oracle, out, 100.0, steps=args.steps, seed=seed,
                                 aligner_residual=residual)
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            sign = [m["aligner_sign"] for m in metrics if "aligner_sign" in m][-10:]
            after = _correlation(attention_maps(model, world, oracle, out / "maps", adapter=str(final)), oracle)
            print(f"| {'residual' if residual else 'paper'} | {seed} | {sum(sign) / len(sign):+.3f} | {after:+.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
