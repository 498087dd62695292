"""`lavender eval answers` and `lavender eval compare`: items, left-padded generation with the shipped base VLM,
scores recomputed from the predictions, and the paired bootstrap on known cases."""

from __future__ import annotations

import json

import pytest
import torch

from lavender.cli import main
from lavender.data.samples import read_samples
from lavender.eval.answers import build_items, record_fields
from lavender.eval.compare import paired_bootstrap
from lavender.eval.metrics import exact_match, vqa_accuracy
from lavender.world.demo import shipped_vlm


@pytest.fixture(scope="module")
def world8(tmp_path_factory):
    """A shapes world of 8 test scenes at the base VLM's image size."""
    from lavender.world.data import WorldDataConfig, write_world

    return write_world(WorldDataConfig(out=str(tmp_path_factory.mktemp("world8") / "w"), size=64, train=0, test=8,
                                       ood=0))


@pytest.fixture
def one_thread():
    """Generation on one thread: on two shared cores, two threads of small matmuls mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _answers(world, out, *extra) -> list[dict]:
    code = main(["eval", "answers", "--model", str(shipped_vlm()), "--data", str(world / "test.json"),
                 "--out", str(out), *extra])
    assert code == 0
    return json.loads((out / "predictions.json").read_text())


def test_items_first_and_all_turns(world8, tmp_path):
    samples = read_samples(world8 / "test.json")
    first, unanswered = build_items(samples, {}, "first", "Describe the image.")
    assert unanswered == 0 and [i.id for i in first] == [s.id for s in samples]
    assert all(i.type == "caption" and i.reference == s.caption for i, s in zip(first, samples))
    every, _ = build_items(samples, {}, "all", "Describe the image.")
    assert len(every) == sum(1 + len(s.turns[2::2]) for s in samples)
    item = next(i for i in every if i.id.endswith("#1"))
    assert item.question == item.sample.turns[2][1] and item.reference == item.sample.turns[3][1]
    # asked alone: the image and the question in one user turn, nothing else
    assert [m["role"] for m in item.messages] == ["user"]
    assert item.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": item.question}]

    # a VQA-style record: its own answers (VQAv2's objects) and type belong to its question
    image = json.loads((world8 / "test.json").read_text())[0]["image"]
    records = [{"id": "q1", "image": str(world8 / image), "question": "<image>\nHow many dogs?", "answer": "2",
                "answers": [{"answer": "2"}, {"answer": "two"}, {"answer": "3"}], "question_type": "how many"},
               {"id": "q2", "image": str(world8 / image), "question": "What colour is it?", "answer": "red"}]
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps(records))
    items, _ = build_items(read_samples(path), record_fields(path), "first", "Describe the image.")
    assert [(i.question, i.reference, i.answers, i.type) for i in items] == [
        ("How many dogs?", "2", ["2", "two", "3"], "how many"), ("What colour is it?", "red", [], "colour")]


def test_eval_answers_end_to_end(world8, tmp_path, one_thread, capsys):
    rows = _answers(world8, tmp_path / "first", "--batch-size", "4", "--max-new-tokens", "16")
    assert [r["id"] for r in rows] == [s.id for s in read_samples(world8 / "test.json")]  # one entry per sample
    assert all(0 <= r["exact"] <= 1 and 0 <= r["vqa"] <= 1 and r["cider"] is not None for r in rows)

    batched = _answers(world8, tmp_path / "b4", "--turns", "all", "--batch-size", "4")
    table = capsys.readouterr().out
    single = _answers(world8, tmp_path / "b1", "--turns", "all", "--batch-size", "1")
    # left padding: a batch of prompts of different lengths answers as each prompt alone
    assert len({len(r["question"]) for r in batched}) > 1
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
    assert all(0 <= r["exact"] <= 1 and 0 <= r["vqa"] <= 1 for r in batched)
    assert {r["type"] for r in batched} >= {"caption", "count", "yes/no"}

    summary = json.loads((tmp_path / "b4" / "summary.json").read_text())
    assert summary["items"] == len(batched)
    for kind, row in summary["scores"].items():
        group = [r for r in batched if kind == "all" or r["type"] == kind or (kind == "questions"
                                                                               and r["type"] != "caption")]
        assert row["n"] == len(group)
        assert row["exact"] == pytest.approx(sum(exact_match(r["prediction"], r["reference"]) for r in group)
                                             / len(group))
        assert row["vqa"] == pytest.approx(sum(vqa_accuracy(r["prediction"], r["answers"]) for r in group)
                                           / len(group))
        assert f"{kind:<10} {row['n']:>6d} {row['exact']:>7.3f}" in table
    assert 0 < summary["scores"]["questions"]["exact"] < 1

    code = main(["eval", "compare", "--a", str(tmp_path / "b1"), "--b", str(tmp_path / "b4" / "predictions.json"),
                 "--metric", "exact", "--n-boot", "200", "--out", str(tmp_path / "same.json")])
    report = json.loads((tmp_path / "same.json").read_text())
    assert code == 0 and report["difference"] == 0 and report["interval"] == [0, 0]
    assert report["only_a_right"] == report["only_b_right"] == 0


def test_eval_answers_with_a_trained_adapter(world8, tiny_world, tmp_path, one_thread):
    # a LoRA adapter trained at learning rate 0 merges into exactly the base model: the same answers
    run = tmp_path / "run"
    assert main(["train", "--model", str(shipped_vlm()), "--data", str(tiny_world), "--out", str(run), "--steps", "1",
                 "--lr", "0", "--lam", "0", "--batch-size", "2", "--report-to", "none"]) == 0
    code = main(["eval", "answers", "--adapter", str(run / "final"), "--data", str(world8 / "test.json"),
                 "--out", str(tmp_path / "adapter"), "--turns", "all", "--limit", "3"])
    assert code == 0
    adapted = json.loads((tmp_path / "adapter" / "predictions.json").read_text())
    base = _answers(world8, tmp_path / "base", "--turns", "all", "--limit", "3")
    assert len(adapted) > 3 and [r["prediction"] for r in adapted] == [r["prediction"] for r in base]


def test_bootstrap_constant_difference_has_zero_width():
    a = [0.0, 0.3, 0.5, 1.0, 0.25] * 8
    boot = paired_bootstrap(a, [x + 0.25 for x in a], n_boot=1000)
    assert boot.difference == pytest.approx(0.25) and boot.n == 40
    assert boot.low == pytest.approx(0.25) and boot.high == pytest.approx(0.25)


def test_bootstrap_matches_the_normal_interval():
    # differences half 0, half 1: mean 0.5, standard error sqrt(0.25 / 400) = 0.025, so the 95% interval is
    # 0.5 -/+ 1.96 * 0.025 = [0.451, 0.549]; the percentile bootstrap lands there within Monte Carlo error
    a, b = [0.0] * 400, [0.0] * 200 + [1.0] * 200
    boot = paired_bootstrap(a, b, n_boot=10_000, seed=1)
    assert boot.difference == 0.5
    assert boot.low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.004)
    assert boot.high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.004)
    assert paired_bootstrap(a, b, n_boot=500, seed=3) == paired_bootstrap(a, b, n_boot=500, seed=3)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])


def _write(path, scores: dict[str, float]):
    path.write_text(json.dumps([{"id": k, "type": "count" if k in "12" else "colour", "exact": v, "vqa": v,
                                 "bleu4": None, "cider": None} for k, v in scores.items()]))
    return path


def test_eval_compare_end_to_end(tmp_path, capsys):
    a = _write(tmp_path / "a.json", {"1": 1.0, "2": 0.0, "3": 1.0, "4": 0.0, "5": 1.0})
    b = _write(tmp_path / "b.json", {"5": 1.0, "4": 1.0, "3": 0.0, "2": 1.0, "1": 1.0})  # paired by id, not order
    assert main(["eval", "compare", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["items"] == 5 and report["mean_a"] == 0.6 and report["mean_b"] == 0.8
    assert report["difference"] == pytest.approx(0.2)
    assert report["interval"][0] < 0.2 < report["interval"][1]
    assert (report["only_a_right"], report["only_b_right"]) == (1, 2)
    assert (report["only_a_right_ids"], report["only_b_right_ids"]) == (["3"], ["2", "4"])
    assert "B - A = +0.2000" in capsys.readouterr().out
    assert main(["eval", "compare", "--a", str(a), "--b", str(b), "--metric", "cider"]) == 2  # no such scores
    assert main(["eval", "compare", "--a", str(a), "--b", str(b), "--types", "count", "--out", str(tmp_path / "t.json")
                 ]) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    assert (report["items"], report["mean_a"], report["mean_b"], report["only_b_right_ids"]) == (2, 0.5, 1.0, ["2"])

    other = _write(tmp_path / "c.json", {"1": 1.0, "2": 0.0, "3": 1.0, "4": 0.0, "6": 1.0})
    from lavender.eval.compare import CompareConfig, compare

    with pytest.raises(ValueError, match=r"not on the same items .*1 only in A \(e\.g\. 5\), 1 only in B \(e\.g\. 6\)"):
        compare(CompareConfig(a=str(a), b=str(other)))
