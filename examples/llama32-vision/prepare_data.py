"""Write Flickr30k captions and RLAIF-V conversations as records `lavender` reads (docs/data.md).

    python examples/llama32-vision/prepare_data.py flickr30k --annotations dataset_flickr30k.json \
        --images flickr30k-images --split train --out data/flickr30k-train.jsonl
    python examples/llama32-vision/prepare_data.py rlaifv --source openbmb/RLAIF-V-Dataset --out data/rlaifv.jsonl

Flickr30k: Karpathy's `dataset_flickr30k.json` ({"images": [{"filename", "split", "sentences": [{"raw"}]}]}) or
the `flickr_annotations_30k.csv` of the Hugging Face copy (columns `raw`, a JSON list of captions, `split`,
`filename`), with the folder of the JPEGs. One record per image:

    {"id": "flickr30k-1000092795", "image": "../flickr30k/flickr30k-images/1000092795.jpg",
     "caption": "Two young guys with shaggy hair look at their hands while hanging out in the yard.",
     "answers": ["Two young guys with shaggy hair ...", "Two young, White males are outside near many bushes.", ...]}

`caption` is what stage 1 draws maps for and stage 2 trains on (`--captions all`: one record per caption instead);
`answers`, every caption of the image, are the references `lavender eval answers` scores BLEU-4 and CIDEr-D against.

RLAIF-V: the `openbmb/RLAIF-V-Dataset` rows (`image`, `question`, `chosen`, `rejected`, ...) through
`datasets.load_dataset` (a hub name or a local copy). Each image is written once as a JPEG under `--images`, and the
preferred answer becomes the reply of a LLaVA conversation (stage 2 is supervised fine-tuning; `rejected` is dropped):

    {"id": "rlaifv-000000", "image": "rlaifv-images/000000.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the man holding?"},
                       {"from": "gpt", "value": "The man is holding a red umbrella ..."}]}

Image paths are written relative to the folder of `--out`, so several outputs in one folder can be concatenated
into one JSONL file. A rerun rewrites the records and reuses the JPEGs already written.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path


def _relative(path: Path, out: Path) -> str:
    return os.path.relpath(path.resolve(), out.parent.resolve())


def _write_jsonl(records, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, out)
    return n


def flickr30k_images(annotations: Path) -> list[dict]:
    """[{"filename", "split", "captions"}] from Karpathy's JSON or the Hugging Face copy's CSV."""
    if annotations.suffix == ".csv":
        with open(annotations, newline="") as f:
            return [{"filename": row["filename"], "split": row["split"], "captions": json.loads(row["raw"])}
                    for row in csv.DictReader(f)]
    images = json.loads(annotations.read_text())["images"]
    return [{"filename": im["filename"], "split": im["split"], "captions": [s["raw"] for s in im["sentences"]]}
            for im in images]


def flickr30k(args: argparse.Namespace) -> int:
    splits = set(args.split.split(","))
    out, root = Path(args.out), Path(args.images)

    def records():
        for image in flickr30k_images(Path(args.annotations)):
            captions = [c.strip() for c in image["captions"] if c.strip()]
            if image["split"] not in splits or not captions:
                continue
            stem = Path(image["filename"]).stem
            path = _relative(root / image["filename"], out)
            if args.captions == "first":
                yield {"id": f"flickr30k-{stem}", "image": path, "caption": captions[0], "answers": captions}
            else:
                for k, caption in enumerate(captions):
                    yield {"id": f"flickr30k-{stem}-{k}", "image": path, "caption": caption, "answers": captions}

    return _write_jsonl(records(), out)


def rlaifv(args: argparse.Namespace) -> int:
    import datasets

    out = Path(args.out)
    images = Path(args.images) if args.images else out.with_name(out.stem + "-images")
    images.mkdir(parents=True, exist_ok=True)
    rows = datasets.load_dataset(args.source, split="train")
    if args.limit:
        rows = rows.select(range(min(args.limit, len(rows))))

    def records():
        for i, row in enumerate(rows):
            path = images / f"{i:06d}.jpg"
            if not path.exists():
                tmp = path.with_name(path.stem + ".tmp.jpg")
                row["image"].convert("RGB").save(tmp, quality=95)
                os.replace(tmp, path)
            question = row["question"].strip()
            yield {"id": f"rlaifv-{i:06d}", "image": _relative(path, out),
                   "conversations": [
                       {"from": "human", "value": question if "<image>" in question else f"<image>\n{question}"},
                       {"from": "gpt", "value": row["chosen"].strip()}]}

    return _write_jsonl(records(), out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="source_kind", required=True)
    p = sub.add_parser("flickr30k", help="Flickr30k captions -> caption records")
    p.add_argument("--annotations", required=True,
                   help="Karpathy's dataset_flickr30k.json, or the Hugging Face copy's flickr_annotations_30k.csv")
    p.add_argument("--images", required=True, help="folder of the Flickr30k JPEGs")
    p.add_argument("--split", default="train", help="split(s) to write, comma-separated: train, val, test")
    p.add_argument("--captions", choices=("first", "all"), default="first",
                   help="first: one record per image; all: one record per caption (ids <id>-<k>)")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.set_defaults(func=flickr30k)
    p = sub.add_parser("rlaifv", help="RLAIF-V preference rows -> conversation records (the chosen answer)")
    p.add_argument("--source", default="openbmb/RLAIF-V-Dataset", help="hub name or local copy of the dataset")
    p.add_argument("--images", default="", help="folder for the JPEGs (default: <out stem>-images beside --out)")
    p.add_argument("--limit", type=int, default=0, help="at most this many rows (0: all)")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.set_defaults(func=rlaifv)
    args = parser.parse_args(argv)
    print(f"{args.func(args)} records in {args.out}")


if __name__ == "__main__":
    main()
