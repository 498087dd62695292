"""The `lavender` command line: one subcommand per step of the data flow."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lavender.config import add_dataclass_args, config_from_args

log = logging.getLogger("lavender")


def cmd_extract(args: argparse.Namespace) -> None:
    from lavender.diffusion.extract import ExtractConfig, run_extract

    cfg = config_from_args(ExtractConfig, args)
    root = run_extract(cfg)
    print(f"targets store: {root}")


def cmd_viz(args: argparse.Namespace) -> None:
    from lavender.data.samples import read_samples
    from lavender.data.targets import AttentionTargets
    from lavender.eval.viz import write_overlays

    written = write_overlays(read_samples(args.data, args.image_root), AttentionTargets(args.targets), args.out,
                             args.count)
    print(f"{len(written)} overlays in {args.out}")


def cmd_grounding(args: argparse.Namespace) -> None:
    from lavender.data.targets import AttentionTargets
    from lavender.eval.grounding import store_grounding
    from lavender.world.data import read_masks
    from lavender.world.scenes import word_type

    targets = AttentionTargets(args.targets)
    report = store_grounding(targets, read_masks(args.masks), word_type)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def cmd_attention(args: argparse.Namespace) -> None:
    from lavender.eval.attention import AttentionMapsConfig, write_attention_store

    print(f"VLM attention store: {write_attention_store(config_from_args(AttentionMapsConfig, args))}")


def cmd_eval_answers(args: argparse.Namespace) -> None:
    from lavender.eval.answers import PREDICTIONS, SUMMARY, AnswersConfig, format_table, run_answers

    cfg = config_from_args(AnswersConfig, args)
    summary = run_answers(cfg)
    print(format_table(summary["scores"]))
    if summary["skipped"]:
        print("left out: " + ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()))
    print(f"predictions: {Path(cfg.out) / PREDICTIONS}, summary: {Path(cfg.out) / SUMMARY}")


def cmd_eval_compare(args: argparse.Namespace) -> None:
    from lavender.eval.compare import CompareConfig, compare, format_comparison

    cfg = config_from_args(CompareConfig, args)
    report = compare(cfg)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(report, indent=2) + "\n")
    print(format_comparison(report))


def cmd_eval_diagnostics(args: argparse.Namespace) -> None:
    from lavender.data.targets import AttentionTargets
    from lavender.eval.grounding import format_diagnostics, read_masks, store_diagnostics
    from lavender.world.scenes import word_type

    maps = AttentionTargets(args.maps)
    targets = AttentionTargets(args.targets) if args.targets else None
    masks = read_masks(args.masks) if args.masks else None
    report = store_diagnostics(maps, targets, masks, word_type)
    names = {"maps": args.maps, "targets": args.targets}
    if args.out:
        Path(args.out).write_text(json.dumps({"stores": {k: v for k, v in names.items() if v}, **report},
                                             indent=2) + "\n")
    print(format_diagnostics(report, names))


def cmd_export(args: argparse.Namespace) -> None:
    from lavender.data.authors_layout import export_authors_layout
    from lavender.data.samples import read_samples

    names = {s.id: s.image_name for s in read_samples(args.data, args.image_root)} if args.data else None
    print(export_authors_layout(args.targets, args.out, names, overwrite=args.overwrite))


def cmd_import(args: argparse.Namespace) -> None:
    from lavender.data.authors_layout import import_authors_layout
    from lavender.data.targets import AttentionTargets

    store = import_authors_layout(args.root, args.out, args.diffusion_model, frame=args.frame)
    if AttentionTargets(store).frame == "unknown":
        log.warning("the imported maps' image frame is unknown, so stage 2 cannot tell which part of each image "
                    "a map covers and will take it as the whole image. If you know how the maps were made, import "
                    "again with --frame full (maps of the whole image) or --frame center-square (maps of the centred "
                    "square crop), or set \"frame\" in the settings of %s", store / "store.json")
    print(store)


def cmd_world_data(args: argparse.Namespace) -> None:
    from lavender.world.data import WorldDataConfig, write_world

    print(f"shapes world: {write_world(config_from_args(WorldDataConfig, args))}")


def cmd_world_teacher(args: argparse.Namespace) -> None:
    from lavender.world.teacher import TeacherConfig, train_teacher

    print(f"teacher pipeline: {train_teacher(config_from_args(TeacherConfig, args))}")


def cmd_world_teacher_sd3(args: argparse.Namespace) -> None:
    from lavender.world.mmdit_teacher import MMDiTTeacherConfig, train_mmdit_teacher

    print(f"teacher pipeline: {train_mmdit_teacher(config_from_args(MMDiTTeacherConfig, args))}")


def cmd_train(args: argparse.Namespace) -> None:
    from lavender.train.config import TrainConfig
    from lavender.train.trainer import train

    print(f"fine-tuned model: {train(config_from_args(TrainConfig, args))}")


def cmd_merge(args: argparse.Namespace) -> None:
    from lavender.train.merge import merge_adapter

    print(f"merged model: {merge_adapter(args.adapter, args.out, args.base, args.overwrite)}")


def cmd_world_oracle(args: argparse.Namespace) -> None:
    from lavender.world.oracle import write_oracle_store

    print(f"oracle store: {write_oracle_store(args.masks, args.out, args.resolution, args.text)}")


def cmd_world_vlm(args: argparse.Namespace) -> None:
    from lavender.world.base_vlm import PretrainConfig, pretrain_base_vlm

    print(f"base VLM: {pretrain_base_vlm(config_from_args(PretrainConfig, args))}")


def cmd_world_experiment(args: argparse.Namespace) -> None:
    from lavender.world.experiment import ExperimentConfig, run_experiment
    from lavender.world.study_report import headline

    report = run_experiment(config_from_args(ExperimentConfig, args))
    print(headline(report))


def cmd_demo(args: argparse.Namespace) -> None:
    from lavender.world.demo import run_demo

    run_demo(Path(args.out), args.train_scenes, args.test_scenes, args.steps)


def build_parser() -> argparse.ArgumentParser:
    from lavender.diffusion.extract import ExtractConfig
    from lavender.eval.attention import AttentionMapsConfig
    from lavender.train.config import TrainConfig
    from lavender.world.base_vlm import PretrainConfig
    from lavender.world.data import WorldDataConfig
    from lavender.world.experiment import ExperimentConfig
    from lavender.world.mmdit_teacher import MMDiTTeacherConfig
    from lavender.world.teacher import TeacherConfig

    parser = argparse.ArgumentParser(
        prog="lavender", description="Diffusion-guided instruction tuning of vision-language models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="stage 1: per-word diffusion attention targets for image-text data",
                       description="Invert each image a few steps with a text-to-image diffusion model (SD "
                                   "v1.x/2.x, SDXL, PixArt, SD3, Flux), denoise it back, and store one normalised "
                                   "map of its text attention per word. Resumable; runs under `accelerate launch`.")
    add_dataclass_args(p, ExtractConfig)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("viz", help="PNG overlays of a store's per-word maps on their images")
    p.add_argument("--targets", required=True, help="targets store directory")
    p.add_argument("--data", required=True, help="the data the store was extracted from")
    p.add_argument("--image-root", default=None, help="directory image paths are relative to")
    p.add_argument("--out", required=True, help="output directory for PNGs")
    p.add_argument("--count", type=int, default=8, help="number of samples to draw")
    p.set_defaults(func=cmd_viz)

    p = sub.add_parser("train", help="stage 2: fine-tune a VLM with L_VLM + lambda * L_att (+ mu * L_rec, DS-VLM; "
                                     "resumable)",
                       description="Fine-tune a Hugging Face VLM (the families of docs/vlm.md: Mllama, LLaVA, "
                                   "LLaVA-NeXT/OneVision, Qwen2/2.5/3-VL, Idefics3/SmolVLM, MiniCPM-V) on image-text "
                                   "data, aligning its text-to-image attention with a stage-1 targets store, and/or "
                                   "(--method dsvlm, LLaVA and Qwen2-VL) training its vision side by diffusion "
                                   "reconstruction. LoRA or full fine-tuning; runs under `accelerate launch` (DDP, "
                                   "FSDP, DeepSpeed).")
    add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", help="merge a trained LoRA adapter into its base model")
    p.add_argument("--adapter", required=True, help="the adapter directory (`<train --out>/final`)")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--base", default="", help="base model (default: the one recorded in the adapter)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_merge)

    ev = sub.add_parser("eval", help="evaluate maps and models").add_subparsers(dest="eval", required=True,
                                                                               metavar="WHAT")
    p = ev.add_parser("grounding", help="pointing accuracy, IoU and entropy of a store against word masks")
    p.add_argument("--targets", required=True, help="targets store directory")
    p.add_argument("--masks", required=True, help="masks side file (masks-<split>.safetensors)")
    p.add_argument("--out", default="", help="also write the report as JSON here")
    p.set_defaults(func=cmd_grounding)

    p = ev.add_parser("attention", help="a VLM's own per-word attention maps, written as a targets store",
                      description="Score the result with `lavender eval grounding` like a stage-1 store.")
    add_dataclass_args(p, AttentionMapsConfig)
    p.set_defaults(func=cmd_attention)
    from lavender.eval.answers import AnswersConfig
    from lavender.eval.compare import CompareConfig

    p = ev.add_parser("answers", help="a VLM's greedy answers to the data's questions, with exact match, VQA "
                                      "accuracy and caption scores, overall and per question type")
    add_dataclass_args(p, AnswersConfig)
    p.set_defaults(func=cmd_eval_answers)
    p = ev.add_parser("compare", help="paired bootstrap of two `eval answers` prediction files on the same items")
    add_dataclass_args(p, CompareConfig)
    p.set_defaults(func=cmd_eval_compare)
    p = ev.add_parser("diagnostics", help="entropy of a store's attention distributions, its alignment MSE against "
                                          "another store, and its grounding against word masks",
                      description="Entropy needs a store that keeps distributions (written by `lavender extract` "
                                  "or `lavender eval attention` since they are kept).")
    p.add_argument("--maps", required=True, help="a store, e.g. a VLM's attention from `lavender eval attention`")
    p.add_argument("--targets", default="", help="a second store (e.g. the teacher's) for entropy and alignment MSE")
    p.add_argument("--masks", default="", help="word masks file for grounding (format in docs/eval.md)")
    p.add_argument("--out", default="", help="also write the report as JSON here")
    p.set_defaults(func=cmd_eval_diagnostics)

    tg = sub.add_parser("targets", help="convert targets stores").add_subparsers(dest="targets", required=True,
                                                                                metavar="WHAT")
    p = tg.add_parser("export", help="write a store in the authors' per-word JPEG layout")
    p.add_argument("--targets", required=True, help="targets store directory")
    p.add_argument("--out", required=True, help="root of the JPEG tree")
    p.add_argument("--data", default="", help="the data, to name image folders after image files")
    p.add_argument("--image-root", default=None, help="directory image paths are relative to")
    p.add_argument("--overwrite", action="store_true", help="delete the contents of a non-empty --out first")
    p.set_defaults(func=cmd_export)
    from lavender.data.targets import FRAMES

    p = tg.add_parser("import", help="read the authors' per-word JPEG layout into a store")
    p.add_argument("--root", required=True, help="root of the JPEG tree")
    p.add_argument("--out", required=True, help="new targets store directory")
    p.add_argument("--diffusion-model", default="unknown", help="model the maps came from, for the record")
    p.add_argument("--frame", choices=FRAMES, default="unknown",
                   help="which region of each original (EXIF-upright) image the maps cover: 'full' the whole image, "
                        "'center-square' its centred square of side min(width, height). Stage 2 must know it to "
                        "lay each map over the part of the image it describes; the authors' JPEGs do not say. "
                        "A tree exported by lavender records its own frame (default: unknown)")
    p.set_defaults(func=cmd_import)

    wd = sub.add_parser("world", help="the shapes world: data, teacher, base VLM, oracle").add_subparsers(dest="world",
                                                                                       required=True, metavar="WHAT")
    p = wd.add_parser("data", help="generate shapes-world scenes in LLaVA format with word masks")
    add_dataclass_args(p, WorldDataConfig)
    p.set_defaults(func=cmd_world_data)
    p = wd.add_parser("teacher", help="train the shapes text-to-image teacher (resumable)")
    add_dataclass_args(p, TeacherConfig)
    p.set_defaults(func=cmd_world_teacher)
    p = wd.add_parser("teacher-sd3", help="train an SD3-layout (MMDiT) shapes teacher on the shipped teacher's frozen "
                                          "VAE (resumable)")
    add_dataclass_args(p, MMDiTTeacherConfig)
    p.set_defaults(func=cmd_world_teacher_sd3)
    p = wd.add_parser("oracle", help="a targets store of the true word masks (blurred), for controls")
    p.add_argument("--masks", required=True, help="a split's masks side file (masks-<split>.safetensors)")
    p.add_argument("--out", required=True, help="new targets store directory")
    p.add_argument("--resolution", type=int, default=16, help="side of the stored maps")
    p.add_argument("--text", default="caption", help="the text the words come from, as stage 1 records it")
    p.set_defaults(func=cmd_world_oracle)
    p = wd.add_parser("vlm", help="pretrain the shapes world's base VLM (Mllama layout; resumable)")
    add_dataclass_args(p, PretrainConfig)
    p.set_defaults(func=cmd_world_vlm)
    p = wd.add_parser("experiment", help="the controlled study: arms x seeds, evaluated on held-out, OOD and "
                                         "non-square scenes, with a report (resumable)",
                      description="Fine-tune the shipped base VLM on shapes-world scenes in several arms (no "
                                  "fine-tuning, autoregressive, Lavender, ground-truth-mask oracle, aggregation and "
                                  "other ablations), each with several seeds; score answers, captions and the VLM's "
                                  "own attention; write <out>/report/report.md with figures. Rerun the same command "
                                  "to resume: finished runs are kept.")
    add_dataclass_args(p, ExperimentConfig)
    p.set_defaults(func=cmd_world_experiment)

    p = sub.add_parser("demo", help="the main job: a reduced shapes-world study (world, stage 1, autoregressive "
                                    "against Lavender against the oracle, evaluation, report)")
    p.add_argument("--out", default="demo-output", help="output directory (rerun to resume)")
    p.add_argument("--train-scenes", type=int, default=0, help="fine-tuning scenes (0: the demo preset's)")
    p.add_argument("--test-scenes", type=int, default=0, help="held-out test scenes (0: the demo preset's)")
    p.add_argument("--steps", type=int, default=0, help="stage-2 steps per arm (0: the demo preset's)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # accelerate narrates every checkpoint file at INFO
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        args.func(args)
    except (ValueError, OSError) as err:  # OSError: also a model or file that cannot be found or read
        if args.verbose:
            raise
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; what was finished is kept, and the same command continues from there")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
