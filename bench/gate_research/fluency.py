"""CounterFact fluency vs the block penalty: train CounterFact dev 300-339 with each delta_l2 given,
print the metrics and the blocks' mean norm.  Run: .venv/bin/python bench/gate_research/fluency.py 0.0 0.01"""
import sys, time, json, torch
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__import__('os').path.abspath(__file__)), '..', '..'))
from server.settings import Settings
from server.model import load_backbone
from server.lks.datasets import dataset_path, load_items, training_facts
from server.lks.editor import train_edits
from server.lks.evaluate import evaluate, greedy_generations, ngram_entropy
from server.lks.gate import SentenceEncoder
from server.lks.train import TrainConfig
s = Settings(); bb = load_backbone(s); enc = SentenceEncoder()
items = load_items(dataset_path(s.data_dir, 'counterfact'), 'dev', 40, 300)
for l2 in [float(x) for x in sys.argv[1:]]:
    t = time.time()
    res, _, es = train_edits(bb, training_facts(items, 'heldout'), enc, TrainConfig(delta_l2=l2))
    m = evaluate(bb, items, es)
    norms = es.deltas.float().norm(dim=-1)
    print(f"l2={l2}: train {time.time()-t:.0f}s rel {m['reliability']:.3f} gen {m['generality']:.3f} loc {m['locality']:.3f} exact {m['exact_match']:.3f} flu {m['fluency_edited']:.2f}/{m['fluency_unedited']:.2f} |delta| {norms.mean():.1f}", flush=True)
    if l2 == 0.0:
        gens = greedy_generations(bb, [it.fact.prompt for it in items[:6]], es)
        for it, g in zip(items[:6], gens): print('   ', it.fact.prompt, '->', repr(g[:100]))
