"""glibc malloc release (config `malloc_release`) and the per-rank peak-RSS meter."""
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT

PROBE = r"""
import sys, torch, psutil
from llm_dist.training.memory import configure_malloc
from llm_dist.tracking.meters import peak_rss_gb
told = configure_malloc(sys.argv[1], None if sys.argv[2] == "-" else int(sys.argv[2]))
rss = lambda: psutil.Process().memory_info().rss / 2**20
big = torch.ones(16 * 2**20 // 4); del big   # a freed 16 MiB chunk raises glibc's adaptive mmap threshold
ts = [torch.ones(2**20) for _ in range(300)]  # 300 x 4 MiB, as ZeRO-3 gathers layer after layer
peak = rss()
keep = ts[::10]; del ts                       # free 90%, with live tensors between the holes
print(told, peak, rss(), peak_rss_gb() * 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_malloc_release_gives_freed_memory_back():
    res = {}
    for mode, stage in (("no", "3"), ("yes", "-"), ("auto", "3"), ("auto", "2")):  # auto: yes for ZeRO-3 on CPU
        out = subprocess.run([sys.executable, "-c", PROBE, mode, stage], cwd=ROOT, capture_output=True, text=True,
                             check=True)
        told, peak, after, maxrss = out.stdout.split()
        res[mode if mode != "auto" else f"auto{stage}"] = (told == "True", float(peak), float(after), float(maxrss))
    assert [res[k][0] for k in ("no", "yes", "auto3", "auto2")] == [False, True, True, False]
    for told, peak, after, maxrss in res.values():
        assert peak > 1100 and maxrss >= peak - 1  # ru_maxrss saw the peak
    assert res["no"][2] > res["no"][1] - 100  # default malloc keeps the freed 1 GiB resident
    assert res["yes"][2] < res["yes"][1] - 800  # released: RSS follows the live 120 MiB
    assert res["auto3"][2] < res["auto3"][1] - 800 and res["auto2"][2] > res["auto2"][1] - 100


def test_peak_memory_single_process():
    from llm_dist.tracking.meters import peak_memory_per_rank, peak_rss_gb

    before = peak_rss_gb()
    x = torch.ones(96 * 2**20)  # 384 MiB touched
    acc = types.SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    out = peak_memory_per_rank(acc)
    assert out["peak_rss_gb"] >= before and out["peak_rss_gb"] >= 0.35
    assert out["peak_rss_gb_per_rank"] == [out["peak_rss_gb"]]
    del x
