"""CounterFact fluency vs the after-target continuation KL (TrainConfig.continuation_weight):
train dev items with each weight given and print the metrics and a few edited continuations.
Run: .venv/bin/python bench/gate_research/fluency_continuation.py DATASET N OFFSET W [W ...]
(W: a continuation weight, or TrainConfig overrides such as repetition_weight=1,continuation_weight=0.3)"""
import sys, time, torch
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__import__('os').path.abspath(__file__)), '..', '..'))
from server.settings import Settings
from server.model import load_backbone
from server.lks.datasets import dataset_path, load_items, training_facts
from server.lks.editor import train_edits
from server.lks.evaluate import evaluate, greedy_generations
from server.lks.gate import SentenceEncoder
from server.lks.train import TrainConfig
s = Settings(); bb = load_backbone(s); enc = SentenceEncoder()
ds, n, off = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
items = load_items(dataset_path(s.data_dir, ds), 'dev', n, off)
for w in sys.argv[4:]:  # a continuation weight, or key=value,... TrainConfig overrides
    kw = dict((k, float(v)) for k, v in (x.split('=') for x in w.split(','))) if '=' in w else {'continuation_weight': float(w)}
    t = time.time()
    res, _, es = train_edits(bb, training_facts(items, 'heldout'), enc, TrainConfig(**kw, epochs=int(__import__('os').environ.get('EPOCHS', '5'))))
    tt = time.time() - t
    m = evaluate(bb, items, es)
    print(f"{ds} {off}+{n} w={w} epochs={__import__('os').environ.get('EPOCHS', '5')}: train {tt:.0f}s rel {m['reliability']:.3f} gen {m['generality']:.3f} loc {m['locality']:.3f} exact {m['exact_match']:.3f} flu {m['fluency_edited']:.2f}/{m['fluency_unedited']:.2f}", flush=True)
    gens = greedy_generations(bb, [it.fact.prompt for it in items[:4]], es)
    for it, g in zip(items[:4], gens): print('   ', it.fact.prompt, '->', repr(g[:90]), flush=True)
