"""The classifier: a sequence-classification head on a local encoder dir (ours or a pretrained one) or on a
preset (random init), optionally wrapped with LoRA / AdaLoRA (peft), and its `final/` export."""
from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModelForSequenceClassification

from ...config import RunConfig
from ...models.build import ModelError, apply_dropout, check_model_dir, check_vocab, preset_config


def build_classifier(cfg: RunConfig, tokenizer, id2label: dict, total_steps):
    """`total_steps()` (a callable) sizes AdaLoRA's rank schedule."""
    m = cfg.model
    kw = {"num_labels": len(id2label), "id2label": id2label, "label2id": {n: i for i, n in id2label.items()}}
    if m.path:
        check_model_dir(m.path)
        config = apply_dropout(AutoConfig.from_pretrained(m.path, **kw), m)
        check_vocab(config, tokenizer, m.path)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                m.path, config=config, attn_implementation=m.attn_implementation, ignore_mismatched_sizes=True)
        except (OSError, ValueError) as e:
            raise ModelError(f"{m.path}: cannot load the model ({str(e).splitlines()[0]})") from None
    else:
        config = preset_config(m.preset, tokenizer, m, max_position=max(512, cfg.data.max_length))
        for k, v in kw.items():
            setattr(config, k, v)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=m.attn_implementation)
    if cfg.classify.peft.method:
        model = wrap_peft(model, cfg, total_steps())
    return model


def wrap_peft(model, cfg: RunConfig, total_steps: int):
    from peft import AdaLoraConfig, LoraConfig, TaskType, get_peft_model

    p = cfg.classify.peft
    common = {"task_type": TaskType.SEQ_CLS, "lora_alpha": p.alpha, "lora_dropout": p.dropout,
              "target_modules": p.target_modules}
    if p.method == "lora":
        pc = LoraConfig(r=p.r, **common)
    else:
        pc = AdaLoraConfig(init_r=p.init_r, target_r=p.target_r, total_step=total_steps,
                           tinit=max(1, total_steps // 10), tfinal=max(1, total_steps // 5), deltaT=1, **common)
    return get_peft_model(model, pc)


def save_classifier(cfg: RunConfig, model, state_dict: dict | None, out: Path, tokenizer) -> None:
    """`final/`: a plain `save_pretrained` classifier (the adapter merged in); `adapter/` beside it for PEFT."""
    if cfg.classify.peft.method:
        if state_dict is not None:
            model.load_state_dict(state_dict)
        adapter = out.parent / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        model.save_pretrained(str(adapter))
        model.merge_and_unload().save_pretrained(str(out), safe_serialization=True)  # LoRA and AdaLoRA alike
    else:
        model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(out))
