"""Masked-LM pretraining: what a batch means, its loss (summed over masked tokens; the loop normalises
by the masked-token count of the whole step across micro-batches and ranks) and its eval metrics."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from ..config import RunConfig
from ..data.mlm import loader_epoch, MLMCollator, PackedStream, check_sources, document_attention_mask
from ..data.shards import ShardCorpus, check_shards, check_tokenizer
from ..data.sources import iter_texts
from ..models.build import build_mlm_model, flops_per_token, get_tokenizer, load_tokenizer, tokenizer_source
from ..models.fast import is_sdpa
from ..training.signals import poll
from .base import LossOutput, Task, register


@register("mlm")
class MLMTask(Task):
    def __init__(self, cfg: RunConfig, accelerator, checked=None):
        self.cfg, self.acc = cfg, accelerator
        self.shards = None
        if cfg.data.shards:  # pre-tokenized (`llm-dist prepare`): the shards' tokenizer unless the run names one
            self.shards = ShardCorpus(cfg.data.shards, cfg.data.sources)
            path, _ = tokenizer_source(cfg)
            self.tokenizer = load_tokenizer(path or str(self.shards.path / self.shards.manifest["tokenizer"]))
            check_tokenizer(self.shards.manifest, self.tokenizer, cfg.data.shards)
            check_shards(self.shards, accelerator.process_index, accelerator.num_processes, cfg.data.eval_fraction,
                         accelerator, seed=cfg.seed)
        else:
            # an empty source (or rank share) is an error now, not a silent spin after tokenizer training
            check_sources(cfg.data.sources, accelerator.process_index, accelerator.num_processes,
                          cfg.data.eval_fraction, accelerator, seed=cfg.seed)
            self.tokenizer = get_tokenizer(cfg, accelerator, lambda n: iter_texts(cfg.data.sources, n))
        self.model = build_mlm_model(cfg, self.tokenizer)
        self.collator = MLMCollator(self.tokenizer, cfg.mlm, document_mask=cfg.data.document_mask)
        self.train_data = self._stream(eval_split=False)
        pin = torch.cuda.is_available() and accelerator.device.type == "cuda"  # non-blocking copies (loop)
        self.loader = StatefulDataLoader(self.train_data, batch_size=cfg.batch_size, collate_fn=self.collator,
                                         num_workers=cfg.data.num_workers, pin_memory=pin)
        self._iter = None

    def _stream(self, eval_split: bool) -> PackedStream:
        return PackedStream(self.cfg.data.sources, self.tokenizer, self.cfg.data, self.cfg.seed,
                            self.acc.process_index, self.acc.num_processes, eval_split=eval_split,
                            with_offsets=self.cfg.mlm.whole_word_masking, segmenter=self.cfg.mlm.segmenter,
                            shards=self.shards)

    # --- the loop's view ---------------------------------------------------------------------------
    def total_steps(self) -> int:
        return self.cfg.max_steps if self.cfg.max_steps > 0 else 10**9

    def next_batch(self) -> dict:
        if self._iter is None:
            self._iter = iter(self.loader)
        return next(self._iter)

    def data_state(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_data_state(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self._iter = iter(self.loader)

    def resume_state(self) -> dict:
        """The epoch the stream reached (from the loader's worker snapshots when `data.num_workers` > 0)."""
        epoch = loader_epoch(self.loader.state_dict())
        return {"mlm_epoch": epoch if epoch is not None else self.train_data.state_dict()["epoch"]}

    def load_resume_state(self, saved: dict) -> None:
        """Resuming on another world size: the per-rank stream positions do not carry over, so start the
        next epoch (a fresh shard order) rather than replay the interrupted one. A same-size resume then
        overrides this with the exact per-rank positions."""
        if "mlm_epoch" in saved:
            st = self.train_data.state_dict()
            st.update({"epoch": saved["mlm_epoch"] + 1, "stream": None, "pending": [], "pending_offsets": [],
                       "pending_starts": [], "pending_docs": [], "buffer": []})
            self.train_data.load_state_dict(st)

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    def example_ids(self, batch: dict) -> list[str]:
        """The ids of the documents whose tokens a batch holds (a packed sequence spans several)."""
        return [i for seq in batch.get("doc_ids", []) for i in seq]

    def tokens(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    def model_inputs(self, model, batch: dict) -> dict:
        """attention_mask (and position_ids) for the model. With `data.document_mask`: position ids restart
        per document and the mask is block-diagonal by document — an explicit 4-D mask (bool for SDPA,
        additive for eager attention; transformers passes 4-D masks through as is), or, for flash / flex
        attention (which take no dense mask), none: transformers then finds the documents from the
        restarting position ids itself (its packed-sequence path: varlen flash attention)."""
        if "doc_segments" not in batch:
            return {"attention_mask": batch["attention_mask"]}
        impl = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
        if impl.startswith("flash") or impl == "flex_attention":
            return {"attention_mask": None, "position_ids": batch["position_ids"]}
        dtype = None if is_sdpa(impl) else self._float_dtype(model)
        return {"attention_mask": document_attention_mask(batch["doc_segments"], dtype),
                "position_ids": batch["position_ids"]}

    def _float_dtype(self, model) -> torch.dtype:
        mp = getattr(self.acc, "mixed_precision", "no")
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)

    def loss(self, model, batch: dict) -> LossOutput:
        inputs = self.model_inputs(model, batch)
        loss_sum, n, correct, per_seq = model(batch["input_ids"], labels=batch["labels"], per_example=True, **inputs)
        return LossOutput(loss_sum, per_seq, None, {"correct": correct.detach().float()})

    def flops_per_token(self) -> float:
        return flops_per_token(self.model.config, self.cfg.data.seq_len, self.cfg.mlm.mlm_probability,
                               sparse=self.model.sparse)

    def log_row(self, sums: dict, count: float) -> dict:
        return {"mlm_accuracy": sums.get("correct", 0.0) / max(count, 1.0)}

    # --- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, step: int) -> dict:
        """Loss / perplexity / accuracy over the held-out stream (each rank its share), with masks drawn
        from a fixed seed so evals at different steps are comparable and training RNG is untouched."""
        model.eval()
        collator = MLMCollator(self.tokenizer, self.cfg.mlm, seed=self.cfg.seed + 17,
                               document_mask=self.cfg.data.document_mask)
        loader = torch.utils.data.DataLoader(self._stream(eval_split=True), batch_size=self.cfg.batch_size,
                                             collate_fn=collator)
        totals = torch.zeros(3, device=self.acc.device, dtype=torch.float64)
        # Ranks hold different numbers of eval batches; under ZeRO-3 every forward is collective, so a rank
        # that has run out repeats its last batch with zero weight until all are done.
        it, last, world = iter(loader), None, self.acc.num_processes
        for i in range(self.cfg.data.max_eval_batches or 10**9):
            poll(self.acc)  # a preemption signal ends the evaluation on every rank at this batch
            batch = next(it, None)
            if world > 1:
                have = self.acc.reduce(torch.tensor([float(batch is not None)], device=self.acc.device), "sum")
                if have.item() == 0:
                    break
            elif batch is None:
                break
            weight = 1.0 if batch is not None else 0.0
            batch = batch if batch is not None else (last if last is not None else self._empty_batch())
            last = batch
            batch = {k: v.to(self.acc.device) for k, v in batch.items() if torch.is_tensor(v)}
            with self.acc.autocast():
                loss_sum, n, correct = model(batch["input_ids"], labels=batch["labels"], **self.model_inputs(model, batch))
            totals += weight * torch.stack([loss_sum.double(), n.double(), correct.double()])
        totals = self.acc.reduce(totals, reduction="sum")
        model.train()
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "mlm_accuracy": (totals[2] / totals[1].clamp(min=1)).item(), "eval_masked_tokens": int(totals[1])}

    def _empty_batch(self) -> dict:
        ids = torch.full((1, self.cfg.data.seq_len), self.tokenizer.cls_token_id)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}

    # --- export ------------------------------------------------------------------------------------
    def save_final(self, model, state_dict: dict | None, out: Path) -> None:
        """A `save_pretrained` dir that `AutoModelForMaskedLM.from_pretrained` loads."""
        hf = model.hf
        if state_dict is not None:
            state_dict = {k[len("hf."):]: v for k, v in state_dict.items() if k.startswith("hf.")}
        hf.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))
