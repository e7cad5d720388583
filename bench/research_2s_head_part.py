"""natural_edits.md 2s: the head part of a step (30 CE + 160 KL positions, column-major head): autograd, HeadLoss at HEAD, and HeadLoss without kept buffers (first: git show 9185dae:server/editor/head_loss.py > /work/scratch/hl_nobuf.py): .venv/bin/python bench/research_2s_head_part.py"""
import sys, time, statistics
sys.path.insert(0, "/work/main")
import torch
import torch.nn.functional as F
from server.editor.head_loss import HeadLoss, HeadTerms
from server.model.cpu_layout import ColumnMajorLinear
torch.manual_seed(0)
V, H, C, R = 49152, 576, 30, 160
head = ColumnMajorLinear.from_linear(torch.nn.Linear(H, V, bias=False)).requires_grad_(False)
states = torch.randn(C + R, H, requires_grad=True)
refs = torch.randn(R, H)
terms = HeadTerms(torch.randint(V, (C,)), torch.rand(R) / R, torch.arange(0, R, 4), torch.randint(V, (R // 4,)), torch.full((R // 4,), 1.0) / (R // 4))
def old():
    every = head(torch.cat([states, refs])).float()
    logits, ref = every[: C + R], every[C + R:].detach()
    loss = F.cross_entropy(logits[:C], terms.targets)
    un = ref.log_softmax(-1); ed = logits[C:].log_softmax(-1)
    kl = F.kl_div(ed, un, log_target=True, reduction="none").sum(-1)
    loss = loss + (terms.kl_weights * kl).sum()
    said = ed[terms.avoid_at, terms.avoid_tokens]
    loss = loss + (terms.avoid_weights * -torch.log1p(-said.exp().clamp(max=1 - 1e-6))).sum()
    loss.backward()
hl = HeadLoss(head)
def new():
    hl(states, refs, terms).backward()
times = {"old": [], "new": []}
for i in range(12):
    for name, fn in (("old", old), ("new", new)):
        t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
for k, v in times.items():
    print(k, "median %.1f ms" % (statistics.median(v[2:]) * 1e3), "min %.1f" % (min(v) * 1e3))
import importlib.util
spec = importlib.util.spec_from_file_location("hl_nobuf", "/work/scratch/hl_nobuf.py")
nb = importlib.util.module_from_spec(spec); sys.modules["hl_nobuf"] = nb; spec.loader.exec_module(nb)
t2 = {"nobuf": [], "buf": []}
for i in range(12):
    for name, fn in (("nobuf", lambda: nb.head_loss(head, states, refs, terms).backward()), ("buf", new)):
        t = time.perf_counter(); fn(); t2[name].append(time.perf_counter() - t)
for k, v in t2.items():
    print(k, "median %.1f ms" % (statistics.median(v[2:]) * 1e3), "min %.1f" % (min(v) * 1e3))
