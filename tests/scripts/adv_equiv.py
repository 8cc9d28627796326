"""Launched on 2 ranks: for each adversarial step strategy, the gradient of one DDP step over rank-local
micro-batches (2 ranks × 1) must equal the gradient over both micro-batches on one process (1 rank × 2
micro-batches), i.e. the strategies keep the global-count loss scaling and sync once. SMART draws random
noise per rank, so for it the check is that both ranks hold the same (synced) gradient. Rank 0 writes
{method: {max_abs_diff, max_abs_grad, rank_diff, norms}} to argv[1]. argv[2]: data dir, argv[3]: tokenizer."""
import copy
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from llm_dist.config import load_config
from llm_dist.tasks.classify.task import ClassifyTask
from llm_dist.training.steps import STEP_STRATEGIES

out, data, tok = sys.argv[1:4]
acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
assert acc.num_processes == 2
cfg = load_config("configs/classify/tiny.yaml", [
    f"--data.train={data}/train.jsonl", f"--data.validation={data}/validation.jsonl", f"--data.test={data}/test.jsonl",
    f"--output_dir={out}.run", f"--tokenizer.path={tok}", "--batch_size=4", "--model.hidden_dropout=0",
    "--model.attention_dropout=0", "--classify.adversarial.steps=3", "--classify.adversarial.step_size=0.5",
    "--classify.adversarial.epsilon=1.0"])
torch.manual_seed(0)
task = ClassifyTask(cfg, acc)
a = task.collate["train"](list(range(0, 4)))
b = task.collate["train"](list(range(4, 7)))  # 3 examples: a different count on each rank
base = task.model
results = {}
for name, cls in STEP_STRATEGIES.items():
    step = cls() if name == "plain" else cls(cfg.classify.adversarial)
    ddp = acc.prepare(copy.deepcopy(base))
    ddp.train()
    step(ddp, task, [a if acc.process_index == 0 else b], acc, world_size=2)
    mine = torch.cat([p.grad.flatten() for p in acc.unwrap_model(ddp).parameters() if p.grad is not None])
    both = acc.gather(mine[None])
    rank_diff = (both[0] - both[1]).abs().max().item()
    if acc.is_main_process:
        local = copy.deepcopy(base)
        local.train()
        ref_step = cls() if name == "plain" else cls(cfg.classify.adversarial)
        ref_step(local, task, [a, b], acc, world_size=1)
        ref = torch.cat([p.grad.flatten() for p in local.parameters() if p.grad is not None])
        results[name] = {"max_abs_diff": (mine - ref).abs().max().item(), "max_abs_grad": ref.abs().max().item(),
                         "rank_diff": rank_diff, "n": int(mine.numel()),
                         "norms": getattr(step, "last_norms", None) is not None and step.last_norms.tolist()}
    acc.wait_for_everyone()
if acc.is_main_process:
    json.dump(results, open(out, "w"))
acc.wait_for_everyone()
