"""natural_edits.md 2r: the teacher answers of 100 zsRE dev facts under torch.profiler (products by shape): LKS_DATA_DIR=... .venv/bin/python bench/research_2r_teacher_profile.py"""
import sys, time
sys.path.insert(0, "/work/main")
import torch
from torch.profiler import profile, ProfilerActivity
from server.editor.config import TrainConfig, TEACHER_CONTEXTS
from server.editor.scope import Scope
from server.editor.sequences import teacher_sequences
from server.evaluation.datasets import dataset_path, load_items
from server.model.loading import load_backbone
from server.settings import Settings
settings = Settings(dtype="float32")
b = load_backbone(settings)
items = load_items(dataset_path(settings.data_dir, "zsre"), "dev", 100)
facts = [it.fact for it in items]
c = TrainConfig()
idx = Scope.from_facts(facts).index()
t = time.perf_counter()
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    seqs = teacher_sequences(b, idx, facts, c.teacher_contexts, c.teacher_tokens, {x: c.teacher_weight_in(x) for x in TEACHER_CONTEXTS}, repetition_weight=1.0)
print("teacher", time.perf_counter() - t, len(seqs))
ka = prof.key_averages(group_by_input_shape=True)
rows = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:25]
for e in rows:
    print(f"{e.key:30s} {e.self_cpu_time_total/1e6:7.2f}s {e.count:6d} {str(e.input_shapes)[:90]}")
tot = {}
for e in prof.key_averages():
    tot[e.key] = e.self_cpu_time_total / 1e6
print(sorted(tot.items(), key=lambda x: -x[1])[:12])
