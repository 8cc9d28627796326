"""`task: prompt` (issue 15): zero-shot through a PET pattern beats chance on a planted toy task with our
own MLM dir; multi-token label words score by their mean log-probability; few-shot fine-tuning through the
pattern on 2 ranks learns a verbalizer that zero-shot gets wrong, and exports a loadable MLM."""
import json

import pytest
import torch

from conftest import launch, read_run
from issue15_helpers import toy_mlm, write_toy_task

TINY = "configs/classify/tiny.yaml"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt")
    return toy_mlm(root / "mlm"), write_toy_task(root / "data")


def _task(toy, tmp_path, *overrides):
    from accelerate import Accelerator

    from llm_dist.config import load_config
    from llm_dist.tasks.base import make_task

    mlm, d = toy
    cfg = load_config(TINY, ["--task=prompt", f"--data.train={d}/train.jsonl", f"--data.validation={d}/validation.jsonl",
                             f"--data.test={d}/test.jsonl", f"--output_dir={tmp_path}", f"--model.path={mlm}",
                             "--batch_size=8", "--data.max_length=32", *overrides])
    return make_task(cfg, Accelerator())


def test_zero_shot_beats_chance(toy, tmp_path):
    task = _task(toy, tmp_path, "--prompt.verbalizer={f: [fruit], v: [vehicle]}")
    _, gold, scores = task.predict(task.model, "test")
    acc = float((scores.argmax(-1) == gold).mean())
    assert len(gold) == 40 and acc >= 0.9, acc  # chance: 0.5
    assert (scores <= 0).all()  # log-probabilities
    # the pattern really holds one [MASK] where the label word goes
    tok = task.tokenizer
    ex = task.data["test"]
    i = ex["mask_pos"][0]
    assert ex["input_ids"][0][i] == tok.mask_token_id
    assert tok.decode(ex["input_ids"][0][i + 1:]).strip().startswith(".")


def test_multi_token_word_scored_by_mean_log_prob(toy, tmp_path):
    """A label word of two pieces fills two [MASK]s and scores by the mean of its pieces' log-probabilities
    (computed here independently with transformers on the expanded pattern)."""
    from transformers import AutoModelForMaskedLM

    mlm, _ = toy
    task = _task(toy, tmp_path, "--prompt.verbalizer={f: [fruit, plum apple], v: [vehicle]}")
    assert task.mask_counts == [1, 2]
    batch = task.collate["test"]([0, 1])
    with torch.no_grad():
        scores = task._forward(task.model.eval(), batch)
    hf = AutoModelForMaskedLM.from_pretrained(mlm).eval()
    tok = task.tokenizer
    pieces = tok("plum apple", add_special_tokens=False)["input_ids"]
    for r in range(2):
        ids = [x for x in batch["input_ids"][r].tolist() if x != tok.pad_token_id]
        p = ids.index(tok.mask_token_id)
        two = torch.tensor([ids[:p + 1] + [tok.mask_token_id] + ids[p + 1:]])
        with torch.no_grad():
            logp = hf(input_ids=two).logits[0].log_softmax(-1)
        multi = (logp[p, pieces[0]] + logp[p + 1, pieces[1]]) / 2
        one = hf(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)[p, tok.convert_tokens_to_ids("fruit")]
        assert scores[r, 0].item() == pytest.approx(max(multi.item(), one.item()), abs=1e-4)


@pytest.mark.slow
def test_few_shot_on_two_ranks_learns_the_verbalizer(toy, tmp_path):
    """Verbalizer swapped (fruit texts → 'vehicle'): zero-shot is ~always wrong; 80 steps (20 epochs) of
    fine-tuning through the pattern on 2 ranks make it right. final/ is an MLM with prompt.json."""
    mlm, d = toy
    zs = _task(toy, tmp_path / "zs", "--prompt.verbalizer={f: [vehicle], v: [fruit]}")
    _, gold, scores = zs.predict(zs.model, "test")
    zero_shot = float((scores.argmax(-1) == gold).mean())
    assert zero_shot <= 0.2
    out = tmp_path / "fs"
    launch(TINY, "--task=prompt", f"--output_dir={out}", f"--data.train={d}/train.jsonl",
           f"--data.validation={d}/validation.jsonl", f"--data.test={d}/test.jsonl", "--data.id_column=id",
           f"--model.path={mlm}", "--batch_size=4", "--data.max_length=32", "--max_steps=80", "--eval_every=0",
           "--optim.lr=1e-3", "--log_every=10", "--tracking.progress=false",
           "--prompt.verbalizer={f: [vehicle], v: [fruit]}")
    run = read_run(out)
    assert run["world_size"] == 2 and run["final_step"] == 80
    assert run["test"]["accuracy"] >= 0.9 > zero_shot
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in preds) == sorted(f"test/{k}" for k in range(40))
    from transformers import AutoModelForMaskedLM

    m = AutoModelForMaskedLM.from_pretrained(out / "final")
    assert m.config.vocab_size == zs.model.config.vocab_size
    assert json.loads((out / "final" / "prompt.json").read_text())["verbalizer"] == {"f": ["vehicle"], "v": ["fruit"]}


def test_prompt_config_and_errors(toy, tmp_path):
    from llm_dist.config import ConfigError, load_config
    from llm_dist.data.sources import DataError

    cfg = load_config("configs/prompt/bbc.yaml")
    assert cfg.task == "prompt" and set(cfg.prompt.verbalizer) == {"business", "entertainment", "politics", "sports", "tech"}
    with pytest.raises(ConfigError, match="'prompt.pattern': must hold exactly one"):
        load_config("configs/prompt/bbc.yaml", ["--prompt.pattern=[MASK] [MASK] {text}"])
    with pytest.raises(DataError, match=r"'prompt.verbalizer.f': the word 'kiwi' is not in the tokenizer"):
        _task(toy, tmp_path, "--prompt.verbalizer={f: [kiwi], v: [vehicle]}")
    with pytest.raises(DataError, match=r"'prompt.verbalizer': no label words for \['v'\]"):
        _task(toy, tmp_path, "--prompt.verbalizer={f: [fruit]}")
