"""models/fast.py: the fast CPU dropout mask and the [CLS]-only last layer (issue 17) — the right distribution,
the same maths, the same gradients — and the trainer applying them (run.json says what applied)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from llm_dist.models import fast


def _bert(cls, dropout=0.1, layers=3):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return cls._from_config(cfg, attn_implementation="sdpa")


def test_keep_mask_is_bernoulli_in_every_lane_and_follows_the_seed():
    p, n = 0.1, 1 << 20
    torch.manual_seed(3)
    keep = fast.keep_mask((n,), p)
    torch.manual_seed(3)
    assert torch.equal(keep, fast.keep_mask((n,), p))  # the default generator: seeding reproduces the mask
    q = fast.keep_probability(p)
    assert abs(q - 0.9) < 1 / 65536
    sigma = (q * (1 - q) / (n / 4)) ** 0.5
    for lane in range(4):  # each 16-bit lane of the 64-bit words (the top one holds the sign bit)
        frac = keep[lane::4].float().mean().item()
        assert abs(frac - q) < 5 * sigma, (lane, frac)
    # neighbouring elements are independent: P(both kept) = q^2
    both = (keep[0::2] & keep[1::2]).float().mean().item()
    assert abs(both - q * q) < 5 * (q * q * (1 - q * q) / (n / 2)) ** 0.5
    assert fast.keep_mask((5, 7), 0.5).shape == (5, 7)


def test_fast_dropout_scales_and_backpropagates_through_the_mask():
    torch.manual_seed(0)
    x = torch.full((256, 512), 2.0, requires_grad=True)
    y = fast.fast_dropout(x, 0.25)
    scale = 1 / fast.keep_probability(0.25)
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 2.0 * scale))
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert abs(y.mean().item() - 2.0) < 0.02  # the expectation is kept
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * scale)
    assert fast.fast_dropout(x, 0.25, training=False) is x and fast.fast_dropout(x, 0.0) is x
    d = fast.FastDropout(0.3).eval()
    assert d(x) is x


def test_attention_with_dropout_is_sdpa_maths_with_the_fast_mask():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    mask[1, :, :, 12:] = False  # padding keys of the second sequence
    module = torch.nn.Module()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    out, _ = fast.fast_sdpa_attention(module, q, k, v, mask, dropout=0.0, scaling=8 ** -0.5)
    assert torch.allclose(out, ref, atol=1e-6)  # no dropout: SDPA itself
    torch.manual_seed(7)
    out, _ = fast.fast_sdpa_attention(module, q, k, v, mask, dropout=0.2, scaling=8 ** -0.5)
    torch.manual_seed(7)
    keep = fast.keep_mask((2, 4, 16, 16), 0.2)
    probs = torch.softmax((q @ k.transpose(-1, -2) * 8 ** -0.5).masked_fill(~mask, float("-inf")), -1)
    manual = ((probs * keep / fast.keep_probability(0.2)) @ v).transpose(1, 2)
    assert torch.allclose(out, manual, atol=1e-6)
    assert not torch.allclose(out, ref, atol=1e-3)


def test_fast_dropout_swaps_every_dropout_and_the_attention():
    model = _bert(BertForSequenceClassification)
    n = sum(type(m) is torch.nn.Dropout for m in model.modules())
    rec = fast.enable_fast_dropout(model)
    assert rec == {"dropout_modules": n, "attention": ["BertForSequenceClassification"]} and n == 3 * 3 + 2
    assert all(type(m) is not torch.nn.Dropout for m in model.modules())
    assert model.config._attn_implementation == fast.FAST_SDPA and fast.is_sdpa(fast.FAST_SDPA)
    assert "llm_dist_sdpa" not in model.config.to_json_string()  # final/ exports stay loadable anywhere
    ids = torch.randint(5, 300, (4, 20))
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    torch.manual_seed(0)
    assert torch.equal(a, model(input_ids=ids).logits)  # reproducible from the seed
    assert not torch.allclose(a, model(input_ids=ids).logits)  # and dropout does apply


def test_cls_only_last_layer_gives_the_full_models_logits_and_gradients():
    full = _bert(BertForSequenceClassification)
    cut = copy.deepcopy(full)
    assert fast.enable_cls_only_last_layer(cut) == "BertLayer"
    assert isinstance(cut.bert.encoder.layer[-1], fast.ClsOnlyLayer)
    assert not isinstance(cut.bert.encoder.layer[0], fast.ClsOnlyLayer)
    assert list(cut.state_dict()) == list(full.state_dict())
    torch.manual_seed(2)
    ids = torch.randint(5, 300, (4, 24))
    am = torch.ones_like(ids)
    am[1, 15:] = 0
    am[3, 6:] = 0
    labels = torch.tensor([0, 1, 2, 1])
    for m in (full, cut):
        m.eval()  # no dropout: the same maths
    a = full(input_ids=ids, attention_mask=am, labels=labels)
    b = cut(input_ids=ids, attention_mask=am, labels=labels)
    assert torch.allclose(a.logits, b.logits, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (name, p1), p2 in zip(full.named_parameters(), cut.parameters()):
        assert p2.grad is not None and torch.allclose(p1.grad, p2.grad, atol=1e-6), name
    hidden = cut.bert(input_ids=ids, attention_mask=am).last_hidden_state
    assert hidden.shape == (4, 1, 64)  # the last layer really computes position 0 only
    cut.train()
    assert torch.isfinite(cut(input_ids=ids, attention_mask=am, labels=labels).loss)
    reason = fast.cls_only_reason(_bert(BertForMaskedLM))
    assert reason and "BertForMaskedLM" in reason
    with pytest.raises(ValueError):
        fast.enable_cls_only_last_layer(_bert(BertForMaskedLM))


def test_the_trainer_applies_both_and_records_them(tmp_path, tokenizer_dir):
    from llm_dist.config import load_config
    from llm_dist.training.loop import run

    seen = {}
    from llm_dist.training import loop as loop_mod

    real = loop_mod.apply_model_speedups

    def spy(model, cfg, task):
        rec = real(model, cfg, task)
        seen["last"] = type(model.bert.encoder.layer[-1]).__mro__[1].__name__
        seen["dropout"] = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Dropout)})
        return rec

    loop_mod.apply_model_speedups = spy
    try:
        cfg = load_config("configs/classify/tiny.yaml", [f"--output_dir={tmp_path / 'run'}", "--max_steps=3",
                                                         f"--tokenizer.path={tokenizer_dir}", "--save_every=0",
                                                         "--eval_every=0"])
        run(cfg)
    finally:
        loop_mod.apply_model_speedups = real
    rec = json.loads((tmp_path / "run" / "run.json").read_text())["speedups"]
    assert rec["fast_dropout"]["dropout_modules"] > 0 and rec["fast_dropout"]["attention"]
    assert rec["cls_only_last_layer"] == {"applied": True, "reason": None, "layer": "BertLayer"}
    assert seen == {"last": "ClsOnlyLayer", "dropout": ["FastDropout"]}
