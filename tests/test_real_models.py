"""Integration with the embedded real models (SmolLM2-135M converted from GGUF, MiniLM-L6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from rlhfkit.models.hub import resolve_model

    return resolve_model("smollm2-135m")  # converts the GGUF once (~25 s), then reads the cache


def test_smollm2_conversion_is_a_plain_checkpoint_with_a_distinct_pad(smollm2):
    from transformers import AutoTokenizer

    cfg = json.loads((Path(smollm2) / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["pad_token_id"] == 0
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)


def test_smollm2_reward_model_reads_the_end_token_and_matches_hf(smollm2, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.models.reward import RewardModel

    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(smollm2).eval()
    feats = [
        rm.encode("Review the kettle.", r)[0] for r in ("I love it.", "It broke after a week and I want a refund.")
    ]
    assert all(f["input_ids"][-1] == rm.tokenizer.eos_token_id for f in feats)
    rm.save_pretrained(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for side in ("right", "left"):
        batch = rm.pad(feats, padding_side=side)
        with torch.no_grad():
            torch.testing.assert_close(rm(**batch), hf(**batch).logits.squeeze(-1), atol=1e-4, rtol=1e-4)


def test_minilm_reward_model_scores_text_pairs():
    from rlhfkit.models.reward import RewardModel

    rm = RewardModel.from_pretrained("minilm-l6")
    assert rm.meta.kind == "encoder"
    scores = rm.score("Review the kettle.", ["Great kettle.", "Terrible kettle."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
