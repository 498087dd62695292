"""Reading image-text samples: LLaVA .json/.jsonl, image folders (.txt or metadata.jsonl), HF dataset dirs."""

from __future__ import annotations

import json

import pytest
from PIL import Image

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
    assert s1.image_name == "one.png"
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
    check_llava(read_samples(path), llava_dir)
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
    with pytest.raises(ValueError):
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


def test_duplicate_ids_are_an_error(tmp_path):
    recs = [{"id": "same", "image": "a.png", "conversations": []},
            {"id": "same", "image": "b.png", "conversations": []}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    with pytest.raises(ValueError, match="not unique"):
        read_samples(tmp_path / "d.json")
    folder = tmp_path / "folder"
    save_image(folder / "pic.png", (0, 0, 0))
    save_image(folder / "pic.jpg", (0, 0, 0))  # same id "pic"
    with pytest.raises(ValueError, match="not unique"):
        read_samples(folder)


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
    with pytest.raises(OSError):
        s.load_image()
