"""Launched on 2 ranks: the gradient of one step over rank-local batches (2 ranks × accum 1) must equal the
gradient over both batches on one process (1 rank × accum 2), with the loss normalised by the masked-token
count of the whole step. Rank 0 writes the max difference to argv[1]."""
import copy
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from transformers import AutoModelForMaskedLM

from llm_dist.config import DataConfig, MLMConfig, RunConfig
from llm_dist.data.mlm import MLMCollator, PackedStream
from llm_dist.models.build import SparseMLM, load_tokenizer, preset_config
from llm_dist.tasks.mlm import MLMTask
from llm_dist.training.loop import train_step

acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
assert acc.num_processes == 2
tok = load_tokenizer(sys.argv[2])
torch.manual_seed(0)
base = SparseMLM(AutoModelForMaskedLM.from_config(preset_config("tiny", tok, RunConfig().model)))
base.eval()  # no dropout: the two computations see identical activations
data = DataConfig(seq_len=64, shuffle_buffer=1)
it = iter(PackedStream(data.sources, tok, data, 0, 0, 1))
coll = MLMCollator(tok, MLMConfig(mlm_probability=0.15))
torch.manual_seed(1)
a = coll([next(it) for _ in range(4)])
coll2 = MLMCollator(tok, MLMConfig(mlm_probability=0.30))  # a different masked count on each rank
b = coll2([next(it) for _ in range(4)])

local = copy.deepcopy(base)
ddp = acc.prepare(copy.deepcopy(base))
ddp.eval()
task = MLMTask.__new__(MLMTask)  # only its loss/count/tokens are used
train_step(ddp, task, [a if acc.process_index == 0 else b], acc, world_size=2)
grads = {n: p.grad.clone() for n, p in acc.unwrap_model(ddp).named_parameters() if p.grad is not None}
if acc.is_main_process:
    train_step(local, task, [a, b], acc, world_size=1)
    diff = max((grads[n] - p.grad).abs().max().item() for n, p in local.named_parameters() if p.grad is not None)
    scale = max(p.grad.abs().max().item() for p in local.parameters() if p.grad is not None)
    # the naive recipe (mean loss per rank, then DDP's average) gives a different gradient here
    naive = copy.deepcopy(base)
    for mb in (a, b):
        loss_sum, n, _ = naive(mb["input_ids"], mb["attention_mask"], mb["labels"])
        (loss_sum / n / 2).backward()
    naive_diff = max((q.grad - p.grad).abs().max().item()
                     for q, p in zip(naive.parameters(), local.parameters()) if p.grad is not None)
    json.dump({"max_abs_diff": diff, "max_abs_grad": scale, "n_params": len(grads), "naive_diff": naive_diff},
              open(sys.argv[1], "w"))
acc.wait_for_everyone()
