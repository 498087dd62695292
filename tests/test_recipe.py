"""docs/recipe-llama-3.2-vision.md, run: every command block the recipe marks with `<!-- test_recipe: NAME -->` is
read from the document and run in a shell, in the recipe's working-directory layout, on tiny random models of the
recipe's classes (an `MllamaForConditionalGeneration` with its `MllamaProcessor`, a `StableDiffusionPipeline`) and
on Flickr30k- and RLAIF-V-shaped sources made from the shapes world. `Recipe.command` is everything the test changes
in a command: the model and dataset names of `REAL_NAMES` become the local tiny copies, 8 processes become 2 (gloo
on the CPU), and a training run gets `TRAIN_SIZES`. So the document cannot drift from what runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from lavender.config import build_config
from lavender.data.samples import read_samples
from lavender.data.targets import AttentionTargets

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "recipe-llama-3.2-vision.md"
RECIPE = ROOT / "examples" / "llama32-vision"
BLOCK = re.compile(r"<!-- test_recipe: (?P<name>[\w.-]+) -->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S)
TRAIN_SIZES = "--steps 3 --save-every 2 --num-workers 0"  # appended to every `lavender train`
REAL_NAMES = ("meta-llama/Llama-3.2-11B-Vision-Instruct", "CompVis/stable-diffusion-v1-4", "openbmb/RLAIF-V-Dataset")
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Accelerate does not run FSDP on a CPU: its FSDP plugin looks for a GPU to put the weights on, and its state turns
# only a multi-GPU run into FSDP. This sitecustomize, put on PYTHONPATH for one test, patches that and nothing else:
# each process loads the whole model itself instead of rank 0 broadcasting it (sync_module_states off), the CPU run
# becomes FSDP on device "cpu", and the gathered state dict stays where it is (torch's FSDP crashes the process
# with SIGSEGV when asked to offload to the CPU a state dict that is already there).
ACCELERATE_FSDP_ON_CPU = '''
import os
if os.environ.get("ACCELERATE_USE_FSDP") == "true":
    os.environ["FSDP_SYNC_MODULE_STATES"] = os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    import torch
    import torch.distributed.fsdp as fsdp
    import accelerate.state as state
    from accelerate.utils import DistributedType

    _init = state.AcceleratorState.__init__

    def __init__(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None,
                 **kwargs):
        _init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.device = state.PartialState._shared_state["device"] = torch.device("cpu")
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = __init__
    _full = fsdp.FullStateDictConfig.__init__

    def _in_place(self, *args, **kwargs):
        _full(self, *args, **kwargs)
        self.offload_to_cpu = False

    fsdp.FullStateDictConfig.__init__ = _in_place
'''


def doc_blocks(lang: str = "bash") -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(DOC.read_text()) if m["lang"] == lang}


def commands(body: str) -> list[str]:
    """The block's commands, continuation lines joined, comments and blank lines left out."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


class Recipe:
    """The recipe's working directory, with the tiny models and sources in place of the real ones."""

    def __init__(self, root: Path, tiny: dict[str, str]):
        self.root, self.tiny = root, tiny
        self.env = {**ENV, "HF_DATASETS_CACHE": str(root / ".datasets-cache")}

    def command(self, cmd: str) -> str:
        for real, small in self.tiny.items():
            cmd = cmd.replace(real, small)
        if re.search(r"\blavender train\b", cmd):
            cmd = f"{cmd} {TRAIN_SIZES}"
        return cmd

    def run(self, cmd: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", "-c", f"set -euo pipefail; {cmd}"], cwd=self.root,
                              env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=600)
        if check:
            assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc

    def block(self, name: str, env: dict | None = None, check: bool = True) -> list[subprocess.CompletedProcess]:
        return [self.run(self.command(cmd), env, check) for cmd in commands(doc_blocks()[name])]


def flickr30k_source(world: Path, root: Path) -> None:
    """Karpathy's dataset_flickr30k.json layout over shapes-world scenes: five captions per image, landscape JPEGs."""
    images = root / "flickr30k" / "flickr30k-images"
    images.mkdir(parents=True)
    entries = []
    for split, name in (("train", "train.json"), ("test", "test.json")):
        for record in json.loads((world / name).read_text()):
            caption = record["conversations"][1]["value"]
            with Image.open(world / record["image"]) as im:
                im.convert("RGB").resize((48, 32)).save(images / f"{record['id']}.jpg", quality=95)
            sentences = [caption, f"a picture of {caption}", f"an image of {caption}", f"there is {caption}",
                         f"{caption} in a picture"]
            entries.append({"filename": f"{record['id']}.jpg", "imgid": len(entries), "split": split,
                            "sentids": list(range(5 * len(entries), 5 * len(entries) + 5)),
                            "sentences": [{"raw": s, "tokens": s.split(), "imgid": len(entries)} for s in sentences]})
    (root / "flickr30k" / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))


def rlaifv_source(world: Path, out: Path) -> Path:
    """A local copy in openbmb/RLAIF-V-Dataset's parquet layout: an image, a question, a chosen and a rejected
    answer, and the bookkeeping columns."""
    import datasets

    rows = []
    for record in json.loads((world / "train.json").read_text()):
        turns = [t["value"] for t in record["conversations"]]
        rows.append({"ds_name": "shapes", "image": Image.open(world / record["image"]).convert("RGB"),
                     "question": turns[2], "chosen": f"{turns[3]}. {turns[1]}", "rejected": "I cannot tell.",
                     "origin_dataset": "shapes-world", "origin_split": "train", "idx": record["id"],
                     "image_path": record["image"]})
    text = datasets.Value("string")
    features = datasets.Features({k: datasets.Image() if k == "image" else text for k in rows[0]})
    out.mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(out / "RLAIF-V-Dataset_000.parquet"))
    return out


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """A random Mllama (Llama 3.2 Vision's classes and tiling, up to 4 tiles) saved with its processor."""
    from lavender.world.base_vlm import BaseVLMConfig, build_base_vlm

    return build_base_vlm(BaseVLMConfig(out=str(tmp_path_factory.mktemp("mllama") / "m"), max_num_tiles=4))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_world, tiny_sd, tiny_vlm) -> Recipe:
    root = tmp_path_factory.mktemp("recipe")
    (root / "examples").symlink_to(ROOT / "examples")
    flickr30k_source(tiny_world, root)
    rlaifv = rlaifv_source(tiny_world, root / "rlaif-v-local")
    tiny = dict(zip(REAL_NAMES, (str(tiny_vlm), tiny_sd, str(rlaifv))))
    return Recipe(root, {**tiny, "--num_processes 8": "--num_processes 2"})


@pytest.fixture(scope="module")
def data(recipe) -> Path:
    *_, check = recipe.block("data")
    assert check.stdout.strip() == "24 samples"
    return recipe.root / "data"


@pytest.fixture(scope="module")
def targets(recipe, data) -> tuple[Path, list]:
    runs = [recipe.block("stage1") for _ in range(2)]  # the second run is the recipe's "rerun to resume"
    return recipe.root / "targets", runs


@pytest.fixture(scope="module")
def lora(recipe, targets) -> tuple[Path, subprocess.CompletedProcess]:
    (run,) = recipe.block("stage2-lora")
    return recipe.root / "runs" / "lora", run


@pytest.fixture(scope="module")
def patched_for_cpu(tmp_path_factory) -> dict:
    """The environment that puts ACCELERATE_FSDP_ON_CPU in every Python process the command starts."""
    shim = tmp_path_factory.mktemp("accelerate-fsdp-on-cpu")
    (shim / "sitecustomize.py").write_text(ACCELERATE_FSDP_ON_CPU)
    return {"PYTHONPATH": str(shim)}


@pytest.fixture(scope="module")
def fsdp_on_cpu(recipe, targets, patched_for_cpu) -> tuple[Path, subprocess.CompletedProcess, ...]:
    (run,) = recipe.block("stage2-fsdp", env=patched_for_cpu)
    (rerun,) = recipe.block("stage2-fsdp", env=patched_for_cpu)  # resumes from the last sharded checkpoint
    return recipe.root / "runs" / "fsdp", run, rerun


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _yaml(name: str) -> dict:
    return yaml.safe_load((RECIPE / name).read_text())


def _script(name: str):
    """A script of examples/llama32-vision/ as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the recipe's files ----------------------------------------------------------------------------------------
def test_the_recipe_configs_fill_their_commands_configs():
    from lavender.diffusion.extract import ExtractConfig
    from lavender.eval.answers import AnswersConfig
    from lavender.train.config import TrainConfig

    stage1 = build_config(ExtractConfig, _yaml("stage1.yaml"))
    assert (stage1.text, stage1.resolution, stage1.inversion_steps, stage1.denoise_steps) == ("caption", 32, 5, 10)
    lora = build_config(TrainConfig, _yaml("stage2-lora.yaml"))
    full = build_config(TrainConfig, _yaml("stage2-fsdp.yaml"))
    assert lora.lora and not full.lora and full.dtype == "float32" and lora.dtype == "bfloat16"
    assert lora.batch_size * 8 == full.batch_size * 8 == 16  # the global batch on 8 GPUs
    assert build_config(AnswersConfig, _yaml("eval.yaml")).turns == "first"
    blocks = doc_blocks()
    assert {"data", "stage1", "viz", "stage2-lora", "stage2-fsdp", "eval", "eval-fsdp", "merge"} <= set(blocks)
    text = "\n".join(blocks.values())
    for real in REAL_NAMES:  # the test swaps what the recipe names
        assert real in text
    assert "--num_processes 8" in blocks["stage1"] and "--num_processes 8" in blocks["stage2-fsdp"]


# -- data ------------------------------------------------------------------------------------------------------
def test_data_commands_write_the_record_shapes_the_recipe_shows(data):
    shown = {name: json.loads(body) for name, body in doc_blocks("json").items()}
    first = {name: json.loads((data / f"{name}.jsonl").read_text().splitlines()[0])
             for name in ("flickr30k-train", "rlaifv")}
    flickr, rlaifv = shown["record-flickr30k"], shown["record-rlaifv"]
    assert set(first["flickr30k-train"]) == set(flickr) and len(first["flickr30k-train"]["answers"]) == 5
    assert set(first["rlaifv"]) == set(rlaifv)
    assert [t["from"] for t in first["rlaifv"]["conversations"]] == [t["from"] for t in rlaifv["conversations"]]
    assert first["rlaifv"]["conversations"][0]["value"].startswith("<image>\n")

    refused: list = []
    train = read_samples(data / "train.jsonl", refused=refused)
    assert len(train) == 24 and not refused
    assert sum(s.id.startswith("flickr30k-") for s in train) == sum(s.id.startswith("rlaifv-") for s in train) == 12
    for sample in train:  # every image path resolves from the merged file's folder
        sample.load_image()
    flickr_sample = next(s for s in train if s.id.startswith("flickr30k-"))
    rlaifv_sample = next(s for s in train if s.id.startswith("rlaifv-"))
    assert flickr_sample.text("caption") and not flickr_sample.turns
    assert rlaifv_sample.text("caption") == rlaifv_sample.turns[1][1]  # stage 1 draws maps of the chosen answer
    assert len(read_samples(data / "flickr30k-test.jsonl")) == 4


def test_flickr30k_converter_reads_the_hugging_face_csv_too(tmp_path):
    import csv

    prepare = _script("prepare_data")
    with open(tmp_path / "flickr_annotations_30k.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["raw", "sentids", "split", "filename", "img_id"])
        writer.writeheader()
        writer.writerow({"raw": json.dumps(["A dog runs.", "A brown dog."]), "sentids": "[0, 1]", "split": "test",
                         "filename": "1.jpg", "img_id": "0"})
        writer.writerow({"raw": json.dumps(["Two men talk."]), "sentids": "[2]", "split": "train",
                         "filename": "2.jpg", "img_id": "1"})
    prepare.main(["flickr30k", "--annotations", str(tmp_path / "flickr_annotations_30k.csv"), "--images",
                  str(tmp_path / "images"), "--split", "test", "--captions", "all", "--out", str(tmp_path / "t.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["flickr30k-1-0", "flickr30k-1-1"]
    assert rows[1] == {"id": "flickr30k-1-1", "image": "images/1.jpg", "caption": "A brown dog.",
                       "answers": ["A dog runs.", "A brown dog."]}


# -- stage 1 ---------------------------------------------------------------------------------------------------
def test_stage1_on_two_processes_makes_one_store_and_a_rerun_only_resumes(targets):
    store, (first, again) = targets
    log, relog = first[0].stderr, again[0].stderr
    assert "process 0/2: 12 of 24 samples to do" in log and "process 1/2: 12 of 24 samples to do" in log
    assert "process 0/2: 0 of 24 samples to do" in relog and "process 1/2: 0 of 24 samples to do" in relog
    maps = AttentionTargets(store)
    assert len(maps) == 24 and {p.name.split("-")[1] for p in store.glob("shard-*.safetensors")} == {"r0", "r1"}
    expected = _yaml("stage1.yaml")
    for key in ("text", "inversion_steps", "denoise_steps", "resolution", "dtype"):
        assert maps.settings[key] == expected[key]
    assert maps.frame == "full" and all(maps[s] for s in maps)


def test_viz_draws_the_maps(recipe, targets):
    recipe.block("viz")
    assert len(list((recipe.root / "viz").glob("*.png"))) == 16


# -- stage 2 ---------------------------------------------------------------------------------------------------
def test_stage2_lora_on_two_processes(lora):
    out, run = lora
    assert "training on 2 processes (MULTI_CPU" in run.stdout
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["matched_words"] > 0 for r in rows)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert adapter and all("language_model" in k and re.search(r"\.(q_proj|v_proj)\.lora_", k) for k in adapter)
    alignment = json.loads((out / "final" / "aligner" / "alignment_config.json").read_text())
    assert alignment["position"] == "predict" and alignment["text"] == "caption" and alignment["lam"] == 10.0


def test_stage2_fsdp_command_is_refused_by_accelerate_on_a_cpu(recipe, targets):
    (run,) = recipe.block("stage2-fsdp", check=False)
    assert run.returncode != 0
    assert "There are currently no available devices found" in run.stderr


def test_stage2_fsdp_trains_when_accelerate_is_patched_for_the_cpu(fsdp_on_cpu, lora, tiny_vlm):
    out, run, rerun = fsdp_on_cpu
    assert "training on 2 processes (FSDP, cpu)" in run.stdout
    assert "resumed from runs/fsdp/checkpoints/checkpoint-3 at step 3" in rerun.stdout
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["matched_words"] > 0 for r in rows)
    # before the first update both runs compute the same loss on the same first batch (bf16 compute in both)
    assert rows[0]["L_VLM"] == pytest.approx(_metrics(lora[0])[0]["L_VLM"], rel=1e-3)
    assert (out / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # sharded checkpoints
    trained, base = load_file(str(out / "final" / "model.safetensors")), load_file(str(tiny_vlm / "model.safetensors"))
    assert set(trained) == set(base)
    changed = {k for k in base if not torch.equal(trained[k], base[k].to(trained[k].dtype))}
    assert changed and all("language_model" in k or "lm_head" in k for k in changed)  # vision side frozen
    assert (out / "final" / "aligner" / "model.safetensors").exists()


def _lora_under_fsdp(out: str) -> str:
    """The recipe's FSDP command with the LoRA settings instead of full fine-tuning, writing to `runs/<out>`."""
    (cmd,) = commands(doc_blocks()["stage2-fsdp"])
    return cmd.replace("stage2-fsdp.yaml", "stage2-lora.yaml").replace("runs/fsdp", f"runs/{out}")


def test_lora_under_fsdp_writes_every_adapter_weight(recipe, targets, patched_for_cpu, lora):
    """The adapter gathered from FSDP's shards holds the LoRA weights the data-parallel run's holds, trained alike."""
    run = recipe.run(recipe.command(_lora_under_fsdp("fsdp-lora")) + " --dtype float32", patched_for_cpu)
    assert "training on 2 processes (FSDP, cpu)" in run.stdout
    adapter = load_file(str(recipe.root / "runs" / "fsdp-lora" / "final" / "adapter_model.safetensors"))
    data_parallel = load_file(str(lora[0] / "final" / "adapter_model.safetensors"))
    assert adapter.keys() == data_parallel.keys()
    assert all(adapter[k].shape == data_parallel[k].shape and adapter[k].dtype == torch.float32 for k in adapter)
    # B starts at zero: the same ones were trained (the cross-attention values get no gradient in either run), and to
    # about the same size (the data-parallel run keeps its frozen weights in bf16, this one in float32)
    trained = {k for k in adapter if "lora_B" in k and adapter[k].abs().sum() > 0}
    assert trained and trained == {k for k in data_parallel if "lora_B" in k and data_parallel[k].abs().sum() > 0}
    for k in trained:
        assert float(adapter[k].norm()) == pytest.approx(float(data_parallel[k].norm()), rel=0.05), k


def test_lora_under_fsdp_with_bf16_weights_is_refused_before_loading(recipe, targets, patched_for_cpu):
    """FSDP cannot flatten bf16 frozen and float32 LoRA weights into one unit; the run says so, and what to do, before
    the model is loaded."""
    run = recipe.run(recipe.command(_lora_under_fsdp("fsdp-lora-bf16")), patched_for_cpu, check=False)
    assert run.returncode != 0
    assert "--dtype bfloat16 keeps frozen weights in another dtype" in run.stderr
    assert "load with --dtype float32 and compute in bf16 with --mixed-precision bf16" in run.stderr
    assert "Loading weights" not in run.stderr and not (recipe.root / "runs" / "fsdp-lora-bf16" / "final").exists()


def _step(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one forward and backward on `inputs`, and the gradients of the trainable parameters."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _watch(model) -> dict:
    """Filled in as `model` (a peft Mllama) runs: whether the vision tower's output needs a gradient, how often the
    backward ran through its first layer, and how often the first language layer's attention ran (a recomputation
    runs it again)."""
    seen = {"tower output needs a gradient": [], "vision backward": 0, "language attention": 0}
    tower = model.get_base_model().model.vision_model
    tower = tower.modules_to_save["default"] if hasattr(tower, "modules_to_save") else tower  # a trained tower's copy

    def count(key):
        return lambda *_: seen.update({key: seen[key] + 1})

    tower.register_forward_hook(
        lambda m, a, out: seen["tower output needs a gradient"].append(out.last_hidden_state.requires_grad))
    tower.transformer.layers[0].register_full_backward_hook(count("vision backward"))
    model.get_base_model().model.language_model.layers[0].self_attn.register_forward_hook(count("language attention"))
    return seen


@pytest.mark.parametrize("train_vision", [False, True], ids=["frozen-tower", "trained-tower"])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the trained tower's inputs need no gradient
def test_gradient_checkpointing_keeps_the_frozen_vision_tower_out_of_the_backward(tiny_vlm, train_vision):
    """With the tower frozen, checkpointing does not make the backward run through it (its output needs no gradient),
    while the language model's layers are recomputed and the loss and LoRA gradients are those of the run without
    checkpointing. A trained tower is still back-propagated."""
    from lavender.train.config import TrainConfig
    from lavender.train.trainer import enable_gradient_checkpointing, load_model, load_processor, select_parameters

    cfg = build_config(TrainConfig, {**_yaml("stage2-lora.yaml"), "model": str(tiny_vlm), "data": "-", "out": "-",
                                     "lora_dropout": 0.0, "train_vision": train_vision})
    processor = load_processor(cfg.model)
    inputs = processor(text="<|image|>describe the image", images=[Image.new("RGB", (48, 32), "red")],
                       return_tensors="pt")
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the trainer's order: load, LoRA, then checkpointing
        model = select_parameters(load_model(cfg.model, "float32"), cfg).train()
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would leave A without a gradient to compare
                torch.nn.init.normal_(p, std=0.1)
        if checkpointing:
            enable_gradient_checkpointing(model)
        seen = _watch(model)
        runs[checkpointing] = (*_step(model, inputs), seen)
    (loss, grads, plain), (loss_gc, grads_gc, checkpointed) = runs[False], runs[True]
    assert plain == {"tower output needs a gradient": [train_vision], "vision backward": int(train_vision),
                     "language attention": 1}
    # the language model's first layer runs again in the backward: checkpointing is on
    assert checkpointed == plain | {"language attention": 2}
    torch.testing.assert_close(loss_gc, loss)
    assert grads.keys() == grads_gc.keys() and any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    assert any("vision_model" in n for n in grads) == train_vision
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


# -- evaluation ------------------------------------------------------------------------------------------------
def test_eval_answers_and_compare(recipe, lora):
    recipe.block("eval")
    for run in ("base", "lora"):
        predictions = json.loads((recipe.root / "eval" / run / "predictions.json").read_text())
        assert len(predictions) == 4 and all(p["type"] == "caption" and len(p["answers"]) == 5 for p in predictions)
        assert "cider" in json.loads((recipe.root / "eval" / run / "summary.json").read_text())["scores"]["all"]
    report = json.loads((recipe.root / "eval" / "lora-vs-base.json").read_text())
    assert report["metric"] == "cider" and report["items"] == 4


def test_eval_of_the_fsdp_model(recipe, fsdp_on_cpu):
    recipe.block("eval-fsdp")
    assert len(json.loads((recipe.root / "eval" / "fsdp" / "predictions.json").read_text())) == 4


def test_merge_writes_a_plain_model(recipe, lora):
    recipe.block("merge")
    merged = recipe.root / "merged" / "lora"
    assert (merged / "model.safetensors").exists() and (merged / "aligner" / "alignment_config.json").exists()
    assert not (merged / "adapter_config.json").exists()


# -- the cost estimate -----------------------------------------------------------------------------------------
def test_cost_numbers_in_the_recipe_are_the_scripts(capsys):
    _script("cost").main(["--tokens", "64"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    shown = doc_blocks("text")["cost-output"].splitlines()
    assert len(printed) == 6 and all(line in shown for line in printed), (printed, shown)

