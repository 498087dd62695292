"""Reading image-text samples: LLaVA .json/.jsonl, image folders (.txt or metadata.jsonl), HF dataset dirs."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from lavender.data.images import UnreadableImage
from lavender.data.samples import Sample, read_samples


def save_image(path, colour, size=(6, 4), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def llava_records():
    return [
        {"id": "s1", "image": "imgs/one.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                           {"from": "gpt", "value": "A red square."},
                           {"from": "human", "value": "Anything else?"},
                           {"from": "gpt", "value": "No."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": 7, "image": "imgs/two.png", "caption": "<image> a green field",
         "conversations": [{"from": "user", "value": "Where?<image>"},
                           {"from": "assistant", "value": "Outside."}]},
        {"image": "imgs/missing.png", "conversations": []},
    ]


@pytest.fixture
def llava_dir(tmp_path):
    save_image(tmp_path / "imgs" / "one.png", (255, 0, 0))
    save_image(tmp_path / "imgs" / "two.png", 128, mode="L")
    return tmp_path


def check_llava(samples, root):
    assert [s.id for s in samples] == ["s1", "7", "3"]  # text-only record skipped; no id -> record index
    s1, s7, s3 = samples
    assert (s1.caption, s1.question, s1.answer) == ("A red square.", "What is shown?", "A red square.")
    assert s1.text("caption") == "A red square."
    assert s1.text("question") == "What is shown?"
    assert s1.text("question+answer") == "What is shown? A red square."
    assert s1.image_name == "one.png" and s1.image_path == "imgs/one.png"
    # an explicit caption wins over the reply; <image> tags are removed everywhere
    assert (s7.caption, s7.question, s7.answer) == ("a green field", "Where?", "Outside.")
    assert (s3.caption, s3.question, s3.answer) == ("", "", "")
    assert s3.text("question+answer") == ""
    im = s1.load_image()
    assert im.mode == "RGB" and im.size == (6, 4) and im.getpixel((0, 0)) == (255, 0, 0)
    im = s7.load_image()  # a grey image comes back as RGB
    assert im.mode == "RGB" and im.getpixel((5, 3)) == (128, 128, 128)
    with pytest.raises(FileNotFoundError):
        s3.load_image()


def test_llava_json(llava_dir):
    path = llava_dir / "data.json"
    path.write_text(json.dumps(llava_records()))
    refused = []
    check_llava(read_samples(path, refused=refused), llava_dir)
    assert [(s.id, s.problem.split(":")[0]) for s in refused] == [("text-only", "no image")]
    check_llava(read_samples(str(path)), llava_dir)


def test_llava_jsonl(llava_dir):
    path = llava_dir / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in llava_records()[:2]) + "\n\n"
                    + "\n".join(json.dumps(r) for r in llava_records()[2:]) + "\n")
    samples = read_samples(path)
    assert [s.id for s in samples] == ["s1", "7", "3"]
    check_llava(samples, llava_dir)


def test_llava_json_image_root(tmp_path):
    save_image(tmp_path / "elsewhere" / "imgs" / "one.png", (0, 0, 255))
    (tmp_path / "ann").mkdir()
    path = tmp_path / "ann" / "data.json"
    path.write_text(json.dumps(llava_records()[:1]))
    (s,) = read_samples(path, image_root=tmp_path / "elsewhere")
    assert s.load_image().getpixel((1, 1)) == (0, 0, 255)
    (s,) = read_samples(path)  # relative to the JSON file by default: not there
    with pytest.raises(FileNotFoundError):
        s.load_image()


def test_llava_json_must_be_a_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"id": "x", "image": "a.png"}))
    with pytest.raises(ValueError, match="list"):
        read_samples(path)
    path.write_text('[{"id": "x", "image": "a.png"},')  # a .json that is not JSON refuses the whole file
    with pytest.raises(ValueError, match="not valid JSON"):
        read_samples(path)


def test_text_rejects_unknown_source():
    s = Sample("x", lambda: Image.new("RGB", (1, 1)), caption="c", question="q", answer="a")
    assert s.text() == "c"
    with pytest.raises(ValueError, match="unknown text source"):
        s.text("answer")


def test_image_folder_with_sibling_txt(tmp_path):
    save_image(tmp_path / "b.png", (0, 255, 0))
    (tmp_path / "b.txt").write_text("  a green picture\n")
    save_image(tmp_path / "a.JPG", (10, 20, 30), size=(8, 8))
    (tmp_path / "a.txt").write_text("dark")
    save_image(tmp_path / "sub" / "c.bmp", (1, 2, 3))  # no caption file
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "readme.md").write_text("ignored")
    samples = read_samples(tmp_path)
    assert [s.id for s in samples] == ["a", "b", "sub/c"]
    assert [s.caption for s in samples] == ["dark", "a green picture", ""]
    assert [s.image_name for s in samples] == ["a.JPG", "b.png", "c.bmp"]
    assert [s.image_path for s in samples] == ["a.JPG", "b.png", "sub/c.bmp"]
    assert all(s.question == "" and s.answer == "" for s in samples)
    assert samples[1].load_image().getpixel((0, 0)) == (0, 255, 0)
    assert samples[2].load_image().getpixel((0, 0)) == (1, 2, 3)
    assert samples[0].load_image().size == (8, 8)


def test_image_folder_with_metadata_jsonl(tmp_path):
    save_image(tmp_path / "x" / "p.png", (200, 0, 0))
    save_image(tmp_path / "q.png", (0, 0, 200))
    save_image(tmp_path / "unlisted.png", (0, 0, 0))
    (tmp_path / "q.txt").write_text("ignored when metadata exists")
    lines = [{"file_name": "x/p.png", "text": " red thing "},
             {"file_name": "q.png", "caption": "blue thing", "question": "Colour?", "answer": "blue"},
             {"file_name": "gone.png", "text": "missing file"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    samples = read_samples(tmp_path)
    assert [s.id for s in samples] == ["x/p", "q", "gone"]
    assert [s.caption for s in samples] == ["red thing", "blue thing", "missing file"]
    assert samples[1].text("question+answer") == "Colour? blue"
    assert samples[0].load_image().getpixel((0, 0)) == (200, 0, 0)
    assert samples[1].image_name == "q.png"
    assert [s.image_path for s in samples] == ["x/p.png", "q.png", "gone.png"]
    with pytest.raises(FileNotFoundError):
        samples[2].load_image()


def test_hf_dataset_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (5, 3), c) for c in colours],
                                     "caption": ["<image> red", "green", "blue "]})
    ds.save_to_disk(str(tmp_path / "hf"))
    samples = read_samples(tmp_path / "hf")
    assert [s.id for s in samples] == ["0", "1", "2"]
    assert [s.caption for s in samples] == ["red", "green", "blue"]
    assert [s.text("caption") for s in samples] == ["red", "green", "blue"]
    assert [s.image_name for s in samples] == ["0.jpg", "1.jpg", "2.jpg"]
    for s, c in zip(samples, colours):
        im = s.load_image()
        assert im.mode == "RGB" and im.size == (5, 3) and im.getpixel((2, 1)) == c


def test_hf_dataset_dict_uses_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    split = lambda caps: datasets.Dataset.from_dict(  # noqa: E731
        {"id": [f"id-{c}" for c in caps], "image": [Image.new("RGB", (2, 2), (9, 9, 9)) for _ in caps],
         "caption": caps})
    datasets.DatasetDict({"validation": split(["v"]), "train": split(["t1", "t2"])}).save_to_disk(
        str(tmp_path / "hf"))
    samples = read_samples(tmp_path / "hf")
    assert [(s.id, s.caption) for s in samples] == [("id-t1", "t1"), ("id-t2", "t2")]
    assert samples[0].image_name == "id-t1.jpg"
    assert samples[1].load_image().getpixel((0, 0)) == (9, 9, 9)


def test_hf_dataset_without_image_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"caption": ["x"]}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="no image column"):
        read_samples(tmp_path / "hf")


def test_duplicate_ids_keep_the_first(tmp_path):
    recs = [{"id": "same", "image": "a.png", "conversations": []},
            {"id": "other", "image": "c.png", "conversations": []},
            {"id": "same", "image": "b.png", "conversations": []}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    refused = []
    samples = read_samples(tmp_path / "d.json", refused=refused)
    assert [(s.id, s.image_path) for s in samples] == [("same", "a.png"), ("other", "c.png")]
    assert [(s.id, s.image_path) for s in refused] == [("same", "b.png")]
    assert refused[0].problem.startswith("duplicate id")
    folder = tmp_path / "folder"
    save_image(folder / "pic.png", (0, 0, 0))
    save_image(folder / "pic.jpg", (0, 0, 0))  # same id "pic"
    refused = []
    (s,) = read_samples(folder, refused=refused)
    assert (s.id, s.image_name) == ("pic", "pic.jpg")  # sorted order: .jpg first
    assert [(r.id, r.image_name, r.problem.split(":")[0]) for r in refused] == [("pic", "pic.png", "duplicate id")]


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_samples(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError):
        read_samples(tmp_path / "no-such-dir")


def test_unsupported_file_is_an_error(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError):
        read_samples(tmp_path / "data.csv")


def test_missing_image_raises_only_on_load(tmp_path):
    recs = [{"id": "ok", "image": "ok.png", "conversations": []},
            {"id": "gone", "image": "gone.png", "conversations": []}]
    save_image(tmp_path / "ok.png", (1, 1, 1))
    (tmp_path / "d.json").write_text(json.dumps(recs))
    ok, gone = read_samples(tmp_path / "d.json")  # listing does not open images
    assert ok.load_image().getpixel((0, 0)) == (1, 1, 1)
    with pytest.raises(FileNotFoundError):
        gone.load_image()


def test_corrupt_image_raises_only_on_load(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "bad.txt").write_text("broken")
    (s,) = read_samples(tmp_path)
    assert s.caption == "broken"
    with pytest.raises(UnreadableImage):  # the project's loader names the file and the reason
        s.load_image()


# --- conversation spellings: LLaVA from/value, role/content, typed parts, messages, images --------------------

TURNS = [("user", "What is shown?"), ("assistant", "A red square."), ("user", "Anything else?"), ("assistant", "No.")]


def typed(*parts):
    return [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]


SPELLINGS = {
    "llava": {"image": "imgs/one.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": "No."}]},
    "role-content-strings": {"image": "imgs/one.png", "conversations": [
        {"role": "user", "content": "<image>What is shown?"}, {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "Anything else?"}, {"role": "assistant", "content": "No."}]},
    "messages-strings-images-list": {"images": ["imgs/one.png"], "messages": [  # LLaMA-Factory, ms-swift
        {"role": "user", "content": "<image>What is shown?"}, {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "Anything else?"}, {"role": "assistant", "content": "No."}]},
    "messages-typed-parts": {"images": ["imgs/one.png"], "messages": [  # TRL / transformers
        {"role": "user", "content": typed(None, "What is shown?")},
        {"role": "assistant", "content": typed("A red square.")},
        {"role": "user", "content": typed("Anything else?")}, {"role": "assistant", "content": typed("No.")}]},
    "conversations-typed-parts-image-str": {"image": "imgs/one.png", "conversations": [
        {"role": "user", "content": typed("What is shown?", None)},
        {"role": "assistant", "content": typed("A red square.")},
        {"role": "user", "content": "Anything else?"}, {"role": "assistant", "content": [
            {"type": "text", "text": "No."}]}]},
    "images-str": {"images": "imgs/one.png", "messages": [
        {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": "No."}]},
    "image-one-element-list": {"image": ["imgs/one.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": "No."}]},
    "image-and-image-url-parts": {"images": ["imgs/one.png"], "messages": [
        {"role": "user", "content": [{"type": "image", "image": "imgs/one.png"},
                                     {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": typed("A red square.")},
        {"role": "user", "content": [{"type": "text", "text": "Anything else?"}]},
        {"role": "model", "content": "No."}]},
    "image-url-part": {"image": "imgs/one.png", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/one.png"}},
                                     {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "User", "content": "Anything else?"}, {"role": "Assistant", "content": "No."}]},
}


def check_same_as_llava(sample):
    assert sample.turns == TURNS
    assert (sample.caption, sample.question, sample.answer) == ("A red square.", "What is shown?", "A red square.")
    assert sample.text("question+answer") == "What is shown? A red square."
    assert (sample.image_name, sample.image_path) == ("one.png", "imgs/one.png")
    assert sample.problem == ""
    assert sample.load_image().getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_spellings_read_like_llava(llava_dir, spelling):
    path = llava_dir / "data.json"
    path.write_text(json.dumps([{"id": "r", **SPELLINGS[spelling]}]))
    refused = []
    (sample,) = read_samples(path, refused=refused)
    assert refused == []
    assert sample.id == "r"
    check_same_as_llava(sample)


def test_spellings_in_jsonl(llava_dir):
    path = llava_dir / "data.jsonl"
    path.write_text("\n".join(json.dumps({"id": name, **rec}) for name, rec in SPELLINGS.items()) + "\n")
    samples = read_samples(path)
    assert [s.id for s in samples] == list(SPELLINGS)
    for sample in samples:
        check_same_as_llava(sample)


@pytest.mark.parametrize("spelling", ["llava", "messages-strings-images-list", "messages-typed-parts"])
def test_system_turns_are_kept(llava_dir, spelling):
    rec = json.loads(json.dumps(SPELLINGS[spelling]))
    key = "conversations" if "conversations" in rec else "messages"
    system = ({"from": "system", "value": "Answer briefly."} if spelling == "llava"
              else {"role": "system", "content": "Answer briefly."})
    rec[key].insert(0, system)
    (llava_dir / "data.json").write_text(json.dumps([rec]))
    (sample,) = read_samples(llava_dir / "data.json")
    assert sample.turns == [("system", "Answer briefly."), *TURNS]
    # the system text is neither the question nor the caption
    assert (sample.caption, sample.question, sample.answer) == ("A red square.", "What is shown?", "A red square.")


def test_empty_assistant_turns_survive(llava_dir):
    recs = [{"id": "v", "image": "imgs/one.png", "caption": "a red square",
             "conversations": [{"from": "human", "value": "<image>Describe."}, {"from": "gpt", "value": ""}]},
            {"id": "n", "image": "imgs/one.png",
             "messages": [{"role": "user", "content": typed(None, "Describe.")},
                          {"role": "assistant", "content": None}, {"role": "assistant", "content": []}]}]
    (llava_dir / "data.json").write_text(json.dumps(recs))
    refused = []
    v, n = read_samples(llava_dir / "data.json", refused=refused)
    assert refused == []
    assert v.turns == [("user", "Describe."), ("assistant", "")]
    assert (v.caption, v.answer) == ("a red square", "")  # stage 1 may still use the caption
    assert n.turns == [("user", "Describe."), ("assistant", ""), ("assistant", "")]


# --- refused records --------------------------------------------------------------------------------------------

def warnings_of(caplog):
    return [r for r in caplog.records if r.name == "lavender.data.samples" and r.levelno == logging.WARNING]


def test_images_and_placeholders_that_differ_in_number_are_refused_and_the_rest_read(llava_dir, caplog):
    human = {"from": "human", "value": "<image>What?"}
    gpt = {"from": "gpt", "value": "Red."}
    recs = [{"id": "ok1", "image": "imgs/one.png", "conversations": [human, gpt]},
            {"id": "two-list", "image": ["imgs/one.png", "imgs/two.png"], "conversations": [human, gpt]},
            {"id": "three", "images": ["imgs/one.png", "imgs/two.png", "imgs/one.png"],
             "messages": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "Red."}]},
            {"id": "two-tags", "image": "imgs/one.png",
             "conversations": [{"from": "human", "value": "<image>\n<image>\nCompare."}, gpt]},
            {"id": "two-parts", "images": ["imgs/one.png"],
             "messages": [{"role": "user", "content": typed(None, None, "Compare.")},
                          {"role": "assistant", "content": typed("Same.")}]},
            {"id": "one-list", "image": ["imgs/two.png"], "conversations": [human, gpt]},
            {"id": "ok2", "image": "imgs/two.png", "conversations": [human, gpt]}]
    (llava_dir / "data.json").write_text(json.dumps(recs))
    refused = []
    with caplog.at_level(logging.WARNING, logger="lavender.data.samples"):
        samples = read_samples(llava_dir / "data.json", refused=refused)
    assert [s.id for s in samples] == ["ok1", "one-list", "ok2"]
    assert samples[1].image_path == "imgs/two.png" and samples[1].load_image().getpixel((0, 0)) == (128,) * 3
    need = "image placeholders (<image> tags or image parts); each image needs one"
    assert [(s.id, s.problem) for s in refused] == [
        ("two-list", f"image count: 2 images but 1 {need}"),
        ("three", f"image count: 3 images but 0 {need}"),
        ("two-tags", f"image count: 1 image but 2 {need}"),
        ("two-parts", f"image count: 1 image but 2 {need}")]
    with pytest.raises(ValueError, match="was refused: image count"):
        refused[0].load_image()
    (warning,) = warnings_of(caplog)
    assert "4 of 7 records refused" in warning.getMessage()
    assert "4 image count (two-list, three, two-tags, ...)" in warning.getMessage()


def test_bad_records_are_refused_with_reasons(llava_dir, caplog):
    good = {"image": "imgs/one.png", "conversations": [{"from": "human", "value": "<image>What?"},
                                                       {"from": "gpt", "value": "Red."}]}
    lines = [json.dumps({"id": "good", **good}),
             json.dumps({"id": "chat", "conversations": [{"from": "human", "value": "Hi"},
                                                         {"from": "gpt", "value": "Hello"}]}),
             json.dumps({"id": "tool", "images": ["imgs/one.png"],
                         "messages": [{"role": "user", "content": "<image>Weather?"},
                                      {"role": "tool", "content": "{\"sunny\": true}"},
                                      {"role": "assistant", "content": "Sunny."}]}),
             '{"id": "cut", "image": "imgs/one.png", "conversa',
             "",
             json.dumps({"id": "bad-turn", "image": "imgs/one.png", "conversations": ["<image>What?"]}),
             json.dumps({"id": "bad-content", "image": "imgs/one.png", "messages": [{"role": "user", "content": 5}]}),
             json.dumps({"id": "video", "image": "imgs/one.png",
                         "messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]},
                                      {"role": "assistant", "content": "A dog."}]}),
             json.dumps({"id": "good", **good}),
             json.dumps(good),  # no id: its position among the records, 8
             json.dumps({"id": "img-dict", "image": {"path": "imgs/one.png"}, "conversations": []})]
    (llava_dir / "data.jsonl").write_text("\n".join(lines) + "\n")
    refused = []
    with caplog.at_level(logging.WARNING, logger="lavender.data.samples"):
        samples = read_samples(llava_dir / "data.jsonl", refused=refused)
    assert [s.id for s in samples] == ["good", "8"]
    assert all(s.turns == [("user", "What?"), ("assistant", "Red.")] for s in samples)
    kinds = [(s.id, s.problem.split(": ")[0]) for s in refused]
    assert kinds == [("chat", "no image"), ("tool", "unknown role"), ("line 4", "malformed"),
                     ("bad-turn", "malformed"), ("bad-content", "malformed"), ("video", "unsupported content"),
                     ("good", "duplicate id"), ("img-dict", "malformed")]
    problems = dict((s.id, s.problem) for s in refused if s.id != "good")
    assert "'tool'" in problems["tool"] and "turn 2" in problems["tool"]
    assert "not JSON" in problems["line 4"]
    assert "turn 1" in problems["bad-turn"] and "content of turn 1" in problems["bad-content"]
    (warning,) = warnings_of(caplog)
    message = warning.getMessage()
    assert "8 of 10 records refused" in message
    for part in ("1 no image (chat)", "1 unknown role (tool)", "4 malformed (line 4, bad-turn, bad-content, ...)",
                 "1 unsupported content (video)", "1 duplicate id (good)"):
        assert part in message


def test_nothing_refused_logs_nothing(llava_dir, caplog):
    (llava_dir / "data.json").write_text(json.dumps([{"id": "a", **SPELLINGS["llava"]}]))
    with caplog.at_level(logging.WARNING, logger="lavender.data.samples"):
        assert len(read_samples(llava_dir / "data.json")) == 1
    assert warnings_of(caplog) == []


def test_image_folder_metadata_bad_lines_are_refused(tmp_path, caplog):
    save_image(tmp_path / "p.png", (1, 2, 3))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "p.png", "text": "ok"}\nnot json\n{"text": "no file"}\n'
                                             '{"file_name": "p.png", "text": "again"}\n')
    refused = []
    with caplog.at_level(logging.WARNING, logger="lavender.data.samples"):
        (s,) = read_samples(tmp_path, refused=refused)
    assert (s.id, s.caption, s.image_path) == ("p", "ok", "p.png")
    assert [(r.id, r.problem.split(": ")[0]) for r in refused] == [
        ("line 2", "malformed"), ("line 3", "malformed"), ("p", "duplicate id")]
    (warning,) = warnings_of(caplog)
    assert "3 of 4 records refused" in warning.getMessage()


# --- HF dataset dirs: TRL style (messages + list of images) and LLaVA style --------------------------------------

def test_hf_dataset_trl_style(tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    red, green, blue = (Image.new("RGB", (5, 3), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    messages = [{"role": "user", "content": typed(None, "What is shown?")},
                {"role": "assistant", "content": typed("A red square.")},
                {"role": "user", "content": typed("Anything else?")},
                {"role": "assistant", "content": typed("No.")}]
    rows = [{"messages": messages, "images": [red]},
            {"messages": [{"role": "system", "content": typed("Be brief.")}, *messages], "images": [green]},
            {"messages": messages, "images": [red, blue]},
            {"messages": messages, "images": []}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    refused = []
    with caplog.at_level(logging.WARNING, logger="lavender.data.samples"):
        samples = read_samples(tmp_path / "hf", refused=refused)
    assert [s.id for s in samples] == ["0", "1"]
    for s in samples:
        assert (s.caption, s.question, s.answer) == ("A red square.", "What is shown?", "A red square.")
    assert samples[0].turns == TURNS
    assert samples[1].turns == [("system", "Be brief."), *TURNS]
    assert samples[0].load_image().getpixel((0, 0)) == (255, 0, 0)
    assert samples[1].load_image().getpixel((4, 2)) == (0, 255, 0)
    assert [(s.id, s.problem) for s in refused] == [
        ("2", "image count: 2 images but 1 image placeholders (<image> tags or image parts); each image needs one"),
        ("3", "no image: the record names no image (text-only)")]
    (warning,) = warnings_of(caplog)
    assert "2 of 4 records refused" in warning.getMessage()


@pytest.mark.parametrize("as_sequence", [False, True], ids=["list-of-dicts", "sequence-dict-of-lists"])
def test_hf_dataset_llava_style(tmp_path, as_sequence):
    datasets = pytest.importorskip("datasets")
    conv = SPELLINGS["llava"]["conversations"]
    images = [Image.new("RGB", (5, 3), (255, 0, 0)), None, Image.new("RGB", (5, 3), (0, 0, 255))]
    if as_sequence:  # a `Sequence` of dicts comes back as a dict of lists
        features = datasets.Features({
            "id": datasets.Value("string"), "image": datasets.Image(),
            "conversations": datasets.Sequence({"from": datasets.Value("string"), "value": datasets.Value("string")})})
        columns = {"from": [t["from"] for t in conv], "value": [t["value"] for t in conv]}
        ds = datasets.Dataset.from_dict({"id": ["a", "b", "c"], "image": images, "conversations": [columns] * 3},
                                        features=features)
    else:
        ds = datasets.Dataset.from_list([{"id": i, "image": im, "conversations": conv}
                                         for i, im in zip(["a", "b", "c"], images)])
    ds.save_to_disk(str(tmp_path / "hf"))
    refused = []
    a, c = read_samples(tmp_path / "hf", refused=refused)
    assert [(r.id, r.problem.split(": ")[0]) for r in refused] == [("b", "no image")]
    for s in (a, c):
        assert s.turns == TURNS
        assert (s.caption, s.question, s.answer) == ("A red square.", "What is shown?", "A red square.")
    assert (a.id, a.image_name) == ("a", "a.jpg")
    assert c.load_image().getpixel((0, 0)) == (0, 0, 255)


# --- images open with the project's loader ------------------------------------------------------------------------

def test_images_open_with_the_project_loader(tmp_path):
    """A transparent pixel comes back white (the loader composites onto white), in every format."""
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    save_image(tmp_path / "folder" / "clear.png", (0, 0, 0, 0), size=(4, 4), mode="RGBA")
    (tmp_path / "data.json").write_text(json.dumps([{"id": "c", "image": "folder/clear.png", "caption": "clear"}]))
    (from_json,) = read_samples(tmp_path / "data.json")
    (from_folder,) = read_samples(tmp_path / "folder")
    loaded = [from_json.load_image(), from_folder.load_image()]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"image": [clear]}).save_to_disk(str(tmp_path / "hf"))
    (from_hf,) = read_samples(tmp_path / "hf")
    loaded.append(from_hf.load_image())
    for im in loaded:
        assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)


def test_prompt_completion_alpaca_and_question_answer_records(tmp_path):
    """TRL's prompt/completion form, LLaMA-Factory's Alpaca form and top-level question/answer read like the LLaVA
    record with the same turns; a turn whose text key is misspelt, or a record of an unknown layout, is refused
    with the keys it has, not read as empty."""
    save_image(tmp_path / "a.png", (1, 2, 3))
    records = [
        {"id": "llava", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "trl-text", "images": ["a.png"], "prompt": "<image>What is it?", "completion": "A cat."},
        {"id": "trl-chat", "images": ["a.png"],
         "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
         "completion": [{"role": "assistant", "content": "A cat."}]},
        {"id": "alpaca", "images": ["a.png"], "instruction": "<image>What is it?", "input": "", "output": "A cat."},
        {"id": "qa", "image": "a.png", "question": "What is it?", "answer": "A cat."},
        {"id": "typo", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "text": "A cat."}]},
        {"id": "unknown-layout", "image": "a.png", "query": "What is it?", "response": "A cat."},
        {"id": "both-keys", "image": "a.png", "images": ["a.png"], "caption": "a cat"},
    ]
    (tmp_path / "d.json").write_text("\ufeff" + json.dumps(records))  # with the byte-order mark some editors write
    refused = []
    samples = {s.id: s for s in read_samples(tmp_path / "d.json", refused=refused)}
    reference = samples["llava"]
    for name in ("trl-text", "trl-chat", "alpaca", "qa"):
        s = samples[name]
        assert (s.turns, s.caption, s.question, s.answer) == (
            reference.turns, reference.caption, reference.question, reference.answer), name
    assert samples["both-keys"].caption == "a cat"  # `image` and `images` naming one file: one image
    reasons = {r.id: r.problem for r in refused}
    assert set(reasons) == {"typo", "unknown-layout"}
    assert reasons["typo"].startswith("malformed: turn 2 has no text") and "'text'" in reasons["typo"]
    assert reasons["unknown-layout"].startswith("no text") and "'query'" in reasons["unknown-layout"]


# --- multi-image records: k images and k placeholders make one sample ------------------------------------------

def check_two_images(sample, first_pixel, second_pixel, question="Compare them."):
    """A two-image sample: its texts, its two images in placeholder order, its store keys, no single image."""
    assert sample.problem == "" and sample.n_images == 2
    assert (sample.question, sample.answer) == (question, "Same.")
    assert [im.getpixel((0, 0)) for im in sample.load_images()] == [first_pixel, second_pixel]
    assert sample.target_keys == [f"{sample.id}#image0", f"{sample.id}#image1"]
    with pytest.raises(ValueError, match="has 2 images"):
        sample.load_image()
    first, second = sample.per_image()  # what stage 1 extracts: one (image, text) pair per image
    assert (first.id, second.id) == tuple(sample.target_keys)
    assert first.n_images == second.n_images == 1 and first.question == second.question == question
    assert (first.load_image().getpixel((0, 0)), second.load_image().getpixel((0, 0))) == (first_pixel, second_pixel)


def test_multi_image_records_in_llava_json_and_trl_messages(llava_dir):
    gpt = {"from": "gpt", "value": "Same."}
    recs = [{"id": "single", **SPELLINGS["llava"]},
            {"id": "llava", "image": ["imgs/two.png", "imgs/one.png"],
             "conversations": [{"from": "human", "value": "<image>\n<image>\nCompare them."}, gpt]},
            {"id": "trl", "images": ["imgs/one.png", "imgs/two.png"],
             "messages": [{"role": "user", "content": typed(None, "Compare them.", None)},
                          {"role": "assistant", "content": typed("Same.")}]}]
    (llava_dir / "data.json").write_text(json.dumps(recs))
    refused = []
    single, llava, trl = read_samples(llava_dir / "data.json", refused=refused)
    assert refused == []
    check_two_images(llava, (128,) * 3, (255, 0, 0))
    assert llava.image_paths == ("imgs/two.png", "imgs/one.png") and llava.turns == [("user", "Compare them."),
                                                                                     ("assistant", "Same.")]
    check_two_images(trl, (255, 0, 0), (128,) * 3)
    assert trl.per_image()[1].image_path == "imgs/two.png" and trl.per_image()[1].image_name == "two.png"
    # a single-image record is what it always was
    assert (single.image_loaders, single.image_paths, single.n_images) == ((), (), 1)
    assert single.target_keys == ["single"] and single.per_image() == [single]
    assert single.image_path == "imgs/one.png" and single.load_images()[0].getpixel((0, 0)) == (255, 0, 0)


def test_multi_image_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    red, blue = Image.new("RGB", (5, 3), (255, 0, 0)), Image.new("RGB", (5, 3), (0, 0, 255))
    answer = {"role": "assistant", "content": typed("Same.")}
    two_parts = [{"role": "user", "content": typed(None, None, "Compare them.")}, answer]
    one_part = [{"role": "user", "content": typed(None, "Compare them.")}, answer]
    rows = [{"messages": two_parts, "images": [blue, red]}, {"messages": two_parts, "images": [red]},
            {"messages": one_part, "images": [red]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    refused = []
    two, one = read_samples(tmp_path / "hf", refused=refused)
    assert [(r.id, r.problem.split(":")[0]) for r in refused] == [("1", "image count")]  # 1 image, 2 placeholders
    check_two_images(two, (0, 0, 255), (255, 0, 0))
    assert [s.image_name for s in two.per_image()] == ["0#image0.jpg", "0#image1.jpg"]
    assert (one.id, one.n_images, one.image_name, one.image_loaders) == ("2", 1, "2.jpg", ())


def test_a_record_whose_store_keys_another_record_has_is_refused(llava_dir):
    two = {"image": ["imgs/one.png", "imgs/two.png"],
           "conversations": [{"from": "human", "value": "<image><image>Compare."}, {"from": "gpt", "value": "Same."}]}
    recs = [{"id": "a#image1", **SPELLINGS["llava"]}, {"id": "a", **two}, {"id": "b", **two},
            {"id": "b#image0", **SPELLINGS["llava"]}]
    (llava_dir / "data.json").write_text(json.dumps(recs))
    refused = []
    assert [s.id for s in read_samples(llava_dir / "data.json", refused=refused)] == ["a#image1", "b"]
    assert [(r.id, r.problem.split(":")[0]) for r in refused] == [("a", "duplicate id"), ("b#image0", "duplicate id")]
    assert "'a#image1'" in refused[0].problem
