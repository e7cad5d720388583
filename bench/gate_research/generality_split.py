"""Where generality is lost: train a pack on dev items (heldout), then score the real paraphrases
with the gate and with the gate forced open.  Run: .venv/bin/python bench/gate_research/generality_split.py zsre 200"""
import sys, time, json, torch
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__import__('os').path.abspath(__file__)), '..', '..'))
from dataclasses import replace
from server.settings import Settings
from server.model import load_backbone
from server.lks.datasets import dataset_path, load_items, training_facts
from server.lks.editor import train_edits
from server.lks.evaluate import top1_predictions
from server.lks.scope import encode
from server.lks.gate import SentenceEncoder
from server.lks.train import TrainConfig
from server.lks.apply import EditSet
ds, off = sys.argv[1], int(sys.argv[2])
s = Settings(); bb = load_backbone(s)
items = load_items(dataset_path(s.data_dir, ds), 'dev', 100, off)
t = time.time()
res, _, es = train_edits(bb, training_facts(items, 'heldout'), SentenceEncoder(), TrainConfig())
print('train', round(time.time() - t), flush=True)
open_es = EditSet(es.subjects, es.deltas, es.layer)  # no gate: always applies
tok = bb.tokenizer
gi = [it for it in items if it.generality]
g_gate = [encode(tok, es.index, it.generality, it.fact.target, allow=es.allow) for it in gi]
g_open = [encode(tok, open_es.index, it.generality, it.fact.target) for it in gi]
p_gate = top1_predictions(bb, g_gate, es); p_open = top1_predictions(bb, g_open, open_es)
ok = lambda p, s: sum(a == b for a, b in zip(p, s.target_ids)) / len(s.target_ids)
gated = [bool(s.edits) for s in g_gate]
acc_gate = [ok(p, s) for p, s in zip(p_gate, g_gate)]; acc_open = [ok(p, s) for p, s in zip(p_open, g_open)]
n = len(gi)
print(f'gen with gate {sum(acc_gate)/n:.3f}  forced open {sum(acc_open)/n:.3f}  gate open rate {sum(gated)/n:.3f}')
print(f'block works | gate open: {sum(a for a, g in zip(acc_open, gated) if g)/max(1,sum(gated)):.3f}')
for it, a, g in zip(gi, acc_open, gated):
    if a < 1: print(f'  block {a:.2f} gate={int(g)} | {it.fact.prompt} -> {it.fact.target} || {it.generality}')
