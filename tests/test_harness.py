"""External harnesses (`lavender/eval/harness.py`): the lmms-eval model and the VLMEvalKit model answer a question
as `lavender eval answers` does, with the shipped base VLM and with a LoRA adapter on it; loglikelihood against
the model's own greedy decoding; requests and messages of the documented shapes, and clear errors for others.
The tests against the installed lmms-eval run only where it is installed (`pip install "lavender-vlm[lmms]"`)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest
import torch

from lavender.cli import main
from lavender.data.samples import read_samples
from lavender.eval.answers import build_items
from lavender.eval.harness import (
    HarnessModel,
    Question,
    VLMEvalKitModel,
    cut_at_stop,
    generation_settings,
    lmms_generate,
    lmms_loglikelihood,
    vlmevalkit_question,
)
from lavender.eval.metrics import exact_match
from lavender.train.data import adds_special_tokens
from lavender.world.demo import shipped_vlm

MAX_NEW = 16


@dataclass
class Request:
    """An lmms-eval request as its documentation describes it: only `args` is read."""

    args: tuple


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Generation on one thread: on two shared cores, two threads of small matmuls mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def items(tiny_world):
    """Every question of the tiny world's test split, each asked alone (`--turns all`)."""
    found, _ = build_items(read_samples(tiny_world / "test.json"), {}, "all", "Describe the image.")
    return found


def _eval_answers(tiny_world, out, *model) -> list[str]:
    assert main(["eval", "answers", *model, "--data", str(tiny_world / "test.json"), "--out", str(out),
                 "--turns", "all", "--batch-size", "4", "--max-new-tokens", str(MAX_NEW)]) == 0
    return [r["prediction"] for r in json.loads((out / "predictions.json").read_text())]


@pytest.fixture(scope="module")
def base_predictions(tiny_world, tmp_path_factory):
    return _eval_answers(tiny_world, tmp_path_factory.mktemp("base"), "--model", str(shipped_vlm()))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter on the shipped base VLM with random, non-zero weights (so it changes answers), saved by
    peft as `lavender train` saves one (the base recorded in adapter_config.json, no processor)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(shipped_vlm())
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "final"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_predictions(tiny_world, adapter, tmp_path_factory):
    return _eval_answers(tiny_world, tmp_path_factory.mktemp("adapted"), "--adapter", str(adapter))


@pytest.fixture(scope="module")
def base_vlm():
    return HarnessModel(str(shipped_vlm()), batch_size=3, max_new_tokens=MAX_NEW)


def _lmms_requests(items) -> tuple[list[Request], dict]:
    """generate_until requests of an lmms-eval simple model over `items`, and the task_dict they refer to: the
    context carries LLaVA's `<image>` tag, the image comes from `doc_to_visual`."""
    docs = [{"image": item.sample.load_image(), "question": item.question} for item in items]
    requests = [Request((f"<image>\n{doc['question']}", {"max_new_tokens": MAX_NEW, "until": ["\n\n"],
                                                         "temperature": 0, "do_sample": False},
                         lambda doc: [doc["image"]], k, "world", "test")) for k, doc in enumerate(docs)]
    return requests, {"world": {"test": docs}}


def test_question_layout_is_the_projects(items):
    item = next(i for i in items if i.type != "caption")
    question = Question.of(f"<image>\n{item.question}", [item.sample.load_image()])
    assert question.content == item.messages[0]["content"] == [{"type": "image"},
                                                                {"type": "text", "text": item.question}]
    assert question.images[0].mode == "RGB"
    with pytest.raises(ValueError, match="a text or an image"):
        Question.of("<image>")


def test_vlmevalkit_messages(items, tiny_world, tmp_path):
    image = str(tiny_world / read_samples(tiny_world / "test.json")[0].image_path)
    parts = [{"type": "image", "value": image}, {"type": "text", "value": "How many"},
             {"type": "text", "value": "objects?"}]
    question = vlmevalkit_question(parts)  # consecutive texts joined, interleaving kept
    assert question.content == [{"type": "image"}, {"type": "text", "text": "How many\nobjects?"}]
    assert vlmevalkit_question([image, "How many objects?"]).content == [{"type": "image"},
                                                                          {"type": "text",
                                                                           "text": "How many objects?"}]
    assert vlmevalkit_question("Hello").content == [{"type": "text", "text": "Hello"}]
    assert len(vlmevalkit_question({"type": "image", "value": question.images[0]}).images) == 1
    with pytest.raises(ValueError, match="'video'"):
        vlmevalkit_question([{"type": "video", "value": "clip.mp4"}, {"type": "text", "value": "?"}])
    with pytest.raises(ValueError, match="URL"):
        vlmevalkit_question([{"type": "image", "value": "https://example.com/a.jpg"}])
    with pytest.raises(FileNotFoundError):
        vlmevalkit_question([{"type": "image", "value": str(tmp_path / "missing.png")}])
    for bad in ([], [{"value": "no type"}], 3):
        with pytest.raises(ValueError):
            vlmevalkit_question(bad)
    with pytest.raises(ValueError, match="unknown arguments"):
        VLMEvalKitModel(model=str(shipped_vlm()), temperature=0.7)


def test_generation_settings_and_stops():
    assert generation_settings({"max_new_tokens": 5, "until": "###"}, 32) == (5, ("###",))
    assert generation_settings({"until": ["\n\n", "Q:"]}, 32) == (32, ("\n\n", "Q:"))
    assert generation_settings(None, 7) == (7, ())
    assert cut_at_stop("a red circle. Q: next", ["Q:", "circle"]) == "a red "
    assert cut_at_stop("a red circle", ["", "square"]) == "a red circle"
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation_settings({"max_new_tokens": -1}, 32)
    with pytest.raises(ValueError, match="batch_size"):
        HarnessModel(str(shipped_vlm()), batch_size=0)
    with pytest.raises(ValueError, match="model"):
        HarnessModel()
    with pytest.raises(FileNotFoundError, match="adapter"):
        HarnessModel(adapter="/nonexistent/run/final")


def test_lmms_requests_answer_as_eval_answers(items, base_vlm, base_predictions):
    requests, task_dict = _lmms_requests(items)
    assert len({len(i.question) for i in items}) > 1  # prompts of different lengths share batches of 3
    answers = lmms_generate(base_vlm, requests, task_dict)
    assert answers == base_predictions and len(set(answers)) > 3

    # `until` cuts an answer; requests with other settings are answered in their own batches, in order
    caption = next(k for k, i in enumerate(items) if i.type == "caption")
    word = answers[caption].split()[1]
    context, gen_kwargs, *rest = requests[caption].args
    cut = Request((context, {**gen_kwargs, "until": [f" {word}"]}, *rest))
    mixed = lmms_generate(base_vlm, [requests[0], cut, requests[1]], task_dict)
    assert mixed == [answers[0], answers[caption].split(f" {word}")[0], answers[1]]

    with pytest.raises(ValueError, match="6 values"):
        lmms_generate(base_vlm, [Request(("ctx", {}, None, 0, "world"))], task_dict)
    with pytest.raises(ValueError, match="no document 99"):
        lmms_generate(base_vlm, [Request(("ctx", {}, lambda d: [], 99, "world", "test"))], task_dict)
    with pytest.raises(ValueError, match="images only"):
        lmms_generate(base_vlm, [Request(("ctx", {}, lambda d: [{"array": [0.0]}], 0, "world", "test"))], task_dict)


def test_loglikelihood_against_greedy_decoding(items, base_vlm, base_predictions):
    questions = [Question.of(i.question, [i.sample.load_image()]) for i in items[:5]]
    processor, model = base_vlm.processor, base_vlm.model
    tokenizer = processor.tokenizer
    # the log-probability of the greedy reply, token by token, from generate's own logits (KV cache path)
    expected = []
    for question in questions:
        chat = processor.apply_chat_template([{"role": "user", "content": question.content}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = processor(text=[chat], images=[question.images], return_tensors="pt",
                           add_special_tokens=adds_special_tokens(processor, chat))
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        kept = new[:max(k for k, t in enumerate(new) if t not in tokenizer.all_special_ids) + 1]  # up to EOS
        logprob = sum(torch.log_softmax(out.logits[k][0].float(), -1)[t].item() for k, t in enumerate(kept))
        expected.append((tokenizer.decode(kept, skip_special_tokens=True), logprob))
    assert [text for text, _ in expected] == base_predictions[:5]

    batched = base_vlm.loglikelihood(questions, [text for text, _ in expected])
    assert all(greedy for _, greedy in batched)
    assert [logprob for logprob, _ in batched] == pytest.approx([want for _, want in expected], abs=1e-4)
    alone = [base_vlm.loglikelihood([q], [text])[0][0] for q, (text, _) in zip(questions, expected)]
    assert [logprob for logprob, _ in batched] == pytest.approx(alone, abs=1e-5)  # right padding: as each alone

    # another answer is not the greedy one and is less likely; an empty continuation costs nothing
    yes_no = next(k for k, i in enumerate(items[:5]) if i.type == "yes/no")
    other = "yes" if expected[yes_no][0] != "yes" else "no"
    logprob, greedy = base_vlm.loglikelihood([questions[yes_no]], [other])[0]
    assert not greedy and logprob < expected[yes_no][1]
    assert base_vlm.loglikelihood([questions[0]], [""]) == [(0.0, True)]

    # lmms-eval's loglikelihood requests: a continuation string (multiple choice) or doc_to_target
    requests, task_dict = _lmms_requests(items[:5])
    continuations = [" " + text for text, _ in expected]  # multiple-choice targets lead with the delimiter
    for doc, text in zip(task_dict["world"]["test"], continuations):
        doc["target"] = text
    by_string = [Request((r.args[0], text, *r.args[2:])) for r, text in zip(requests, continuations)]
    by_function = [Request((r.args[0], lambda doc: doc["target"], *r.args[2:])) for r in requests]
    scored = lmms_loglikelihood(base_vlm, by_string, task_dict)
    assert scored == lmms_loglikelihood(base_vlm, by_function, task_dict)
    assert all(greedy for _, greedy in scored)  # the word-level tokenizer drops the leading space
    assert [logprob for logprob, _ in scored] == pytest.approx([logprob for logprob, _ in batched], abs=1e-5)
    with pytest.raises(ValueError, match="6 values"):
        lmms_loglikelihood(base_vlm, [Request(("", " yes"))], task_dict)


def test_vlmevalkit_model_with_an_adapter(items, tiny_world, adapter, adapter_predictions, base_predictions):
    # the adapter changes the answers, and both harness models give the adapted model's `eval answers` answers
    assert adapter_predictions != base_predictions
    vlm = VLMEvalKitModel(adapter=str(adapter), batch_size=4, max_new_tokens=MAX_NEW)
    # VLMEvalKit's inference loop: set_dump_image, use_custom_prompt, then generate(message=..., dataset=...)
    vlm.set_dump_image(lambda line: [line["image_path"]])
    assert vlm.dump_image({"image_path": "x.png"}, "MME") == ["x.png"] and not vlm.use_custom_prompt("MME")
    messages = [[{"type": "image", "value": str(tiny_world / i.sample.image_path)},
                 {"type": "text", "value": i.question}] for i in items]
    assert [vlm.generate(message=m, dataset="shapes") for m in messages[:3]] == adapter_predictions[:3]
    assert vlm.generate_batch(messages) == adapter_predictions

    requests, task_dict = _lmms_requests(items)
    assert lmms_generate(vlm.vlm, requests, task_dict) == adapter_predictions


# -- the installed lmms-eval ----------------------------------------------------------------------------------
def test_lmms_eval_plugin(items, base_predictions):
    pytest.importorskip("lmms_eval")
    from lmms_eval import models
    from lmms_eval.api.instance import Instance

    from lavender.eval.harness import register_lmms

    cls = register_lmms()
    assert models.get_model("lavender") is cls and cls.is_simple
    with pytest.raises(ValueError, match="unknown model_args for lavender: temperature"):
        cls.create_from_arg_string(f"pretrained={shipped_vlm()},temperature=0.2")
    lm = cls.create_from_arg_string(f"pretrained={shipped_vlm()},max_new_tokens={MAX_NEW}",
                                    {"batch_size": "4", "device": "cpu"})
    requests, lm.task_dict = _lmms_requests(items)
    instances = [Instance(request_type="generate_until", arguments=r.args, idx=0,
                          metadata={"task": "world", "doc_id": k, "repeats": 1}) for k, r in enumerate(requests)]
    assert lm.generate_until(instances) == base_predictions
    choices = [Instance(request_type="loglikelihood", arguments=(r.args[0], f" {answer}", *r.args[2:]), idx=0,
                        metadata={"task": "world", "doc_id": k, "repeats": 1})
               for k, (r, answer) in enumerate(zip(requests[:4], base_predictions))]
    assert all(greedy for _, greedy in lm.loglikelihood(choices))
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round(instances)


TASK_YAML = """\
task: shapes_qa
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function shapes_qa_utils.doc_to_visual
doc_to_text: !function shapes_qa_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new}
  until: ["\\n\\n"]
process_results: !function shapes_qa_utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = """\
from lavender.eval.metrics import exact_match


def doc_to_visual(doc):
    return [doc["image"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact": exact_match(results[0], doc["answer"])}
"""


def test_lmms_eval_end_to_end_with_an_adapter(items, adapter, adapter_predictions, tmp_path):
    # lmms-eval's own evaluator on a local task (an HF dataset on disk) with `--model lavender` and an adapter
    pytest.importorskip("lmms_eval")
    pytest.importorskip("filelock._api", reason="lmms-eval 0.7's evaluator needs filelock < 4")
    import datasets
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from lavender.eval.harness import register_lmms

    register_lmms()
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    rows = {"image": [i.sample.load_image() for i in items], "question": [i.question for i in items],
            "answer": [i.reference for i in items]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(tmp_path / "data")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "shapes_qa.yaml").write_text(TASK_YAML.format(data=tmp_path / "data", max_new=MAX_NEW))
    (tasks / "shapes_qa_utils.py").write_text(TASK_UTILS)
    results = simple_evaluate(model="lavender", model_args=f"pretrained={shipped_vlm()},adapter={adapter}",
                              tasks=["shapes_qa"], batch_size=4, device="cpu", log_samples=True,
                              task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    samples = sorted(results["samples"]["shapes_qa"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == adapter_predictions
    exact = sum(exact_match(p, i.reference) for p, i in zip(adapter_predictions, items)) / len(items)
    assert results["results"]["shapes_qa"]["exact,none"] == pytest.approx(exact)


def test_lmms_eval_main_without_lmms_eval(monkeypatch, capsys):
    from lavender.eval import harness

    monkeypatch.delitem(harness.__dict__, "LavenderLMMs", raising=False)
    for name in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")] + ["lmms_eval"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert harness.lmms_eval_main(["--model", "lavender", "--tasks", "mme"]) == 2
    assert "pip install 'lavender-vlm[lmms]'" in capsys.readouterr().err
    with pytest.raises(ImportError, match="lmms-eval is not installed"):
        harness.register_lmms()
