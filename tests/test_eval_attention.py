"""`lavender eval attention`: the stored VLM maps, and the attention distributions the store keeps, equal an eager
computation from `output_attentions`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vlm_testers import save_tiny_llava

from lavender.data.samples import read_samples
from lavender.data.targets import AttentionTargets
from lavender.eval.attention import AttentionMapsConfig, write_attention_store
from lavender.train.data import StageTwoDataset
from lavender.utils.maps import min_max
from lavender.world.oracle import write_oracle_store


def test_raw_maps_match_eager_attention(tiny_world, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = save_tiny_llava(tmp_path / "llava")
    words_store = write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path / "oracle")
    out = write_attention_store(AttentionMapsConfig(model=str(model_dir), data=str(tiny_world), limit=3,
                                                    targets=str(words_store), out=str(tmp_path / "maps"),
                                                    batch_size=2))
    maps = AttentionTargets(out)
    assert len(maps) == 3 and maps.resolution == 16

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="eager").eval()
    image_token = model.config.image_token_id
    data = StageTwoDataset(read_samples(tiny_world / "train.json")[:3], processor, image_token,
                           AttentionTargets(words_store), instruction="Describe the image.", max_length=512)
    checked = repeated = 0
    for i in range(3):
        enc = data[i]
        inputs = {k: v for k, v in enc.inputs.items() if k != "labels"}
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions  # per layer (1, H, S, S)
        image = (enc.inputs["input_ids"][0] == image_token).nonzero().squeeze(-1)
        stored = maps[enc.sample_id]
        dists = maps.distributions(enc.sample_id)
        by_word: dict[str, list[torch.Tensor]] = {}
        raw_by_word: dict[str, list[torch.Tensor]] = {}
        for word in enc.words:
            rows = torch.stack([a[0][:, list(word.rows)][..., image] for a in attentions])  # (L, H, rows, 16)
            grid = rows.mean(dim=2).mean(dim=(0, 1)).view(1, 1, 4, 4)
            resized = F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False)[0]
            by_word.setdefault(word.word, []).append(min_max(resized)[0])
            raw_by_word.setdefault(word.word, []).append(resized[0])
        assert set(stored) == set(by_word) == set(dists)
        for word, pictures in by_word.items():
            torch.testing.assert_close(torch.as_tensor(stored[word]), torch.stack(pictures).mean(0), atol=2e-3,
                                       rtol=0)
            # the distribution: the word's attention at the image keys over its sum (occurrences weighted by
            # 1 / (max - min) of each, see occurrence_range)
            raws = raw_by_word[word]
            weights = [1 / (x.max() - x.min()) for x in raws]
            mixed = sum(w * x for w, x in zip(weights, raws)) / sum(weights)
            torch.testing.assert_close(torch.as_tensor(dists[word]).double(), (mixed / mixed.sum()).double(),
                                       atol=1e-5, rtol=2e-3)
            repeated += len(raws) > 1
            checked += 1
    assert checked >= 3
    assert repeated >= 1  # a word asked about twice: its occurrences are combined as occurrence_range says
