"""How many of bench/general_ability.jsonl's prompts open an edit of the 10,000-fact pack
(zsRE dev 0-7999 + CounterFact dev 0-1999), with the shipped relation head and with the identity
(the rule before it). Only the gate table is needed: an edit that does not open changes nothing.
Run: .venv/bin/python bench/gate_research/general_opens.py [head.safetensors ...]
(the shipped head when none is named)"""
import json, os, sys, torch
from pathlib import Path
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')
sys.path.insert(0, ROOT)
from server.lks.gate import SentenceEncoder, GateTable, ScopeGate
from server.lks.relation_head import RelationHead
from server.lks.scope import Scope, subject_index
from server.lks.datasets import load_items, dataset_path
from server.settings import Settings
torch.set_num_threads(2)
s = Settings()
facts = [it.fact for it in load_items(dataset_path(s.data_dir, 'zsre'), 'dev', 8000)]
facts += [it.fact for it in load_items(dataset_path(s.data_dir, 'counterfact'), 'dev', 2000)]
scope = Scope.from_facts(facts)
names = scope.fact_names()
rows = [json.loads(l) for l in open(os.path.join(ROOT, 'bench', 'general_ability.jsonl')) if l.strip()]
shipped = SentenceEncoder()
prompts_of = {}
for f, r in zip(facts, scope.fact_rows): prompts_of.setdefault(r, []).append(f.prompt)
index = subject_index(scope.subjects)
heads = [(p, RelationHead.load(Path(p))) for p in sys.argv[1:]] or [('head', shipped.relation_head)]
for tag, head in [('identity', RelationHead.identity(384)), *heads]:
    enc = SentenceEncoder(relation_head=head)
    table = GateTable.build(enc, [f.prompt for f in facts], names, scope.fact_rows)
    gate = ScopeGate(table, enc)
    opened = found = 0
    for r in rows:
        for m in index.find(r['prompt']):
            found += 1
            entry = scope.subjects[m.row]
            score = gate.score(r['prompt'], m.start, m.end, m.row, (entry.subject, *entry.aliases))
            if score >= gate.threshold:
                opened += 1
                print(f"  {tag}: opens {score:+.3f} {r['prompt']!r} ({r['set']}) for {prompts_of[m.row]}")
    print(f'{tag}: threshold {gate.threshold:.3f}; {found} subject matches in {len(rows)} prompts, {opened} open')
