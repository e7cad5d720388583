"""Eight more generic probes per prompt style: gate open rates on dev items (zsRE / CounterFact
200-999, packs of 100) and how many of bench/general_ability.jsonl's prompts open an edit of the
10,000-fact pack (zsRE dev 0-7999 + CounterFact dev 0-1999; its gate table needs no training).
Run: .venv/bin/python bench/gate_research/probes.py"""
import json, os, sys, torch
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')
sys.path.insert(0, ROOT)
import server.lks.gate as G
from server.lks.gate import SentenceEncoder, GateTable, ScopeGate, mask_subject
from server.lks.scope import Scope
from server.lks.datasets import load_items, dataset_path
from server.settings import Settings
enc = SentenceEncoder()
EXTRA_Q = ("In which city is X located?", "What is X the capital of?", "On which continent is X?",
  "What is the currency of X?", "What is the official language of X?", "Where is X from?", "What is X known for?", "What type of thing is X?")
EXTRA_S = ("X is a city in", "X is the capital of", "X is located on the continent of",
  "The currency of X is", "The official language of X is", "X is from", "X is known for", "X is a type of")
def run(tag, qp, sp, thr=G.THRESHOLD):
    G.QUESTION_PROBES, G.STATEMENT_PROBES = qp, sp
    out = {}
    for ds in ['zsre', 'counterfact']:
        d = json.load(open(f'{Settings().data_dir}/{ds}.json'))[200:1000]
        og = ol = 0
        for off in range(0, 800, 100):
            chunk = d[off:off+100]
            table = GateTable.build(enc, [x['prompt'] for x in chunk], [[x['subject']] for x in chunk], list(range(100)))
            gate = ScopeGate(table, enc)
            for i, x in enumerate(chunk):
                for key in ('generality', 'loc'):
                    text = x['generality'] if key == 'generality' else x['locality']['prompt']
                    s = text.find(x['subject'])
                    if s < 0: continue
                    o = gate.opens(text, s, s+len(x['subject']), i, [x['subject']])
                    if key == 'generality': og += o
                    else: ol += o
        out[ds] = (og/800, ol/800)
    # general ability at 10k
    table10 = GateTable.from_tensors(TABLE10.to_tensors())
    table10.question_probes = enc.encode(qp); table10.statement_probes = enc.encode(sp)
    isq = table10.prompt_is_question
    table10.prompt_hubness = torch.where(isq, G._top_k_mean(table10.prompt_embeddings @ table10.question_probes.T), G._top_k_mean(table10.prompt_embeddings @ table10.statement_probes.T))
    gate = ScopeGate(table10, enc)
    opened = 0
    rows = [json.loads(l) for l in open(os.path.join(ROOT, 'bench', 'general_ability.jsonl')) if l.strip()]
    for r in rows:
        for m in SCOPE_INDEX.find(r['prompt']):
            score = gate.score(r['prompt'], m.start, m.end, m.row, NAMES[m.row])
            opened += score >= G.THRESHOLD
            if score >= G.THRESHOLD:
                print(f"  {tag}: opens {score:+.3f} {r['prompt']!r} for the edit {PROMPTS_OF[m.row]}")
    print(f"{tag}: zsre open gen/loc {out['zsre'][0]:.3f}/{out['zsre'][1]:.3f}  CF {out['counterfact'][0]:.3f}/{out['counterfact'][1]:.3f}  general-ability opens {opened}", flush=True)
s = Settings()
items = load_items(dataset_path(s.data_dir, 'zsre'), 'dev', 8000) + load_items(dataset_path(s.data_dir, 'counterfact'), 'dev', 2000)
scope = Scope.from_facts([it.fact for it in items]); SCOPE_INDEX = scope.index(); NAMES = [(x.subject, *x.aliases) for x in scope.subjects]
PROMPTS_OF = {}
for it, row in zip(items, scope.fact_rows): PROMPTS_OF.setdefault(row, []).append(it.fact.prompt)
TABLE10 = GateTable.build(enc, [it.fact.prompt for it in items], [NAMES[r] for r in scope.fact_rows], scope.fact_rows)
Q0, S0 = G.QUESTION_PROBES, G.STATEMENT_PROBES
run('base', Q0, S0)
run('extra', Q0 + EXTRA_Q, S0 + EXTRA_S)
run('extra3', Q0 + EXTRA_Q[:3], S0 + EXTRA_S[:3])
