"""Two more scope signals on top of the production gate (server/lks/gate.py), dev items only.
Run:  .venv/bin/python bench/gate_research/signals.py [START END]   (default 200 1000)

1. token alignment: BERTScore-style F1 between the content tokens (stop words dropped) of the
   masked edit prompt and of the masked query, from the same MiniLM pass; score = CSLS + w (F1 - b0).
2. answer type: cosine of the masked query with the edit's target, relative to the edit prompt's.
Both are compared with the CSLS gate at an equal false-open rate on real locality prompts.
"""
import json, os, sys, torch, numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
import server.lks.gate as G
from server.lks.gate import SentenceEncoder, mask_subject, is_question, _top_k_mean
import torch.nn.functional as F
torch.set_num_threads(1)
enc = SentenceEncoder()
DATA = os.environ.get('LKS_DATA_DIR', os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'data'))
STOP = set("the a an of is was what which who whom whose where when how in on at by for to does did do from x ? 's , . be are were has have had it its that this with as 'and and or".split())
@torch.inference_mode()
def both(texts):
    pooled, toks = [], []
    for i in range(0, len(texts), 64):
        b = enc.tokenizer(texts[i:i+64], return_tensors='pt', padding=True)
        h = enc.model(**b).last_hidden_state
        m = b['attention_mask'].unsqueeze(-1).float()
        pooled.append(F.normalize((h*m).sum(1)/m.sum(1), dim=-1))
        for r in range(len(h)):
            words = enc.tokenizer.convert_ids_to_tokens(b['input_ids'][r])
            keep = [j for j, w in enumerate(words) if b['attention_mask'][r, j] and w not in ('[CLS]', '[SEP]', '[PAD]') and w.lower() not in STOP]
            if not keep: keep = [j for j in range(1, int(b['attention_mask'][r].sum()) - 1)] or [0]
            toks.append(F.normalize(h[r, keep], dim=-1))
    return torch.cat(pooled), toks
def bs(a, b):
    s = a @ b.T
    r = s.max(1).values.mean(); p = s.max(0).values.mean()
    return float(2*r*p/(r+p))
QP, SP = enc.encode(G.QUESTION_PROBES), enc.encode(G.STATEMENT_PROBES)
def csls(P, Q, pq, qq):
    rp = torch.where(pq, _top_k_mean(P @ QP.T), _top_k_mean(P @ SP.T))
    rq = torch.where(qq, _top_k_mean(Q @ QP.T), _top_k_mean(Q @ SP.T))
    return (P*Q).sum(1) - 0.5*(rp+rq) + G.STATEMENT_SHIFT*(~pq).float()
rng = sys.argv[1:] and (int(sys.argv[1]), int(sys.argv[2])) or (200, 1000)
data = {}
for ds in ['zsre', 'counterfact']:
    d = json.load(open(f'{DATA}/{ds}.json'))[rng[0]:rng[1]]
    mp = [mask_subject(x['prompt'], [x['subject']]) for x in d]
    mg = [mask_subject(x['generality'], [x['subject']]) for x in d]
    ml = [mask_subject(x['locality']['prompt'], [x['subject']]) for x in d]
    (P, TP), (Gq, TG), (L, TL) = both(mp), both(mg), both(ml)
    pq = torch.tensor([is_question(t) for t in mp]); gq = torch.tensor([is_question(t) for t in mg]); lq = torch.tensor([is_question(t) for t in ml])
    cg, cl = csls(P, Gq, pq, gq).numpy(), csls(P, L, pq, lq).numpy()
    bg = np.array([bs(a, b) for a, b in zip(TP, TG)]); bl = np.array([bs(a, b) for a, b in zip(TP, TL)])
    data[ds] = (cg, cl, bg, bl, pq.numpy())
for ds, (cg, cl, bg, bl, pq) in data.items():
    print(ds, f'base thr {G.THRESHOLD}: para {np.mean(cg>=G.THRESHOLD):.3f} loc {np.mean(cl>=G.THRESHOLD):.3f}; bs mean para {bg.mean():.3f} loc {bl.mean():.3f}')
for w in [0.0, 0.1, 0.2, 0.3, 0.5]:
    for b0 in [0.6, 0.7]:
        line = f'w={w} b0={b0}:'
        for thr in [0.0, 0.03, 0.06]:
            for ds, (cg, cl, bg, bl, pq) in data.items():
                sg, sl = cg + w*(bg-b0), cl + w*(bl-b0)
                line += f' | {ds[:2]} t{thr} {np.mean(sg>=thr):.3f}/{np.mean(sl>=thr):.3f}'
        print(line)

def auc(p, n): return float((np.asarray(p)[:, None] > np.asarray(n)[None]).mean())
for ds, (cg, cl, bg, bl, pq) in data.items():
    d = json.load(open(f'{DATA}/{ds}.json'))[rng[0]:rng[1]]
    T = enc.encode([x['target'] for x in d])
    Gq = enc.encode([mask_subject(x['generality'], [x['subject']]) for x in d])
    L = enc.encode([mask_subject(x['locality']['prompt'], [x['subject']]) for x in d])
    P = enc.encode([mask_subject(x['prompt'], [x['subject']]) for x in d])
    tg, tl, tp = (Gq*T).sum(1).numpy(), (L*T).sum(1).numpy(), (P*T).sum(1).numpy()
    print(ds, f'AUC csls {auc(cg,cl):.3f} token-F1 {auc(bg,bl):.3f} target-sim {auc(tg-tp, tl-tp):.3f}')
    base_loc = np.mean(cl >= G.THRESHOLD)
    for name, (xg, xl) in {'token F1 (b0 0.6)': (bg - 0.6, bl - 0.6), 'target sim': (tg - tp, tl - tp)}.items():
        for w in [0.1, 0.2, 0.3]:
            sg, sl = cg + w*xg, cl + w*xl
            thr = np.quantile(sl, 1 - base_loc)
            print(f'   {name} w={w}: paraphrases open {np.mean(sg>thr):.3f} vs CSLS {np.mean(cg>=G.THRESHOLD):.3f} at locality open {base_loc:.3f}')
