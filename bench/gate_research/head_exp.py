"""Learned linear head on frozen MiniLM pooled embeddings for the scope gate (dev items only): fitted on
1000-7999 of zsRE, CounterFact or both, evaluated on 200-999. Run: .venv/bin/python bench/gate_research/head_exp.py"""
import json, os, sys, time, torch, numpy as np
import torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
import server.lks.gate as G
from server.lks.gate import SentenceEncoder, mask_subject, is_question, _top_k_mean
torch.set_num_threads(2); torch.manual_seed(0)
DATA = os.environ.get('LKS_DATA_DIR', os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'data')); CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cache', 'head_exp_embeddings.pt')
os.makedirs(os.path.dirname(CACHE), exist_ok=True)
if not os.path.exists(CACHE):
    enc = SentenceEncoder(); out = {}
    for ds in ['zsre', 'counterfact']:
        d = json.load(open(f'{DATA}/{ds}.json'))[:8000]
        for k, get in [('p', lambda x: x['prompt']), ('g', lambda x: x['generality']), ('l', lambda x: x['locality']['prompt'])]:
            texts = [mask_subject(get(x), [x['subject']]) for x in d]
            out[(ds, k)] = enc.encode(texts); out[(ds, k + 'q')] = torch.tensor([is_question(t) for t in texts])
    out['QP'], out['SP'] = enc.encode(G.QUESTION_PROBES), enc.encode(G.STATEMENT_PROBES)
    torch.save(out, CACHE)
E = torch.load(CACHE)
def csls(W, P, Q, pq, qq):
    pr = lambda x: F.normalize(x @ W.T, dim=-1)
    P, Q, QP, SP = pr(P), pr(Q), pr(E['QP']), pr(E['SP'])
    rp = torch.where(pq, _top_k_mean(P @ QP.T), _top_k_mean(P @ SP.T))
    rq = torch.where(qq, _top_k_mean(Q @ QP.T), _top_k_mean(Q @ SP.T))
    return (P * Q).sum(1) - 0.5 * (rp + rq) + G.STATEMENT_SHIFT * (~pq).float()
def parts(ds, lo, hi):
    return [E[(ds, k)][lo:hi] for k in ['p', 'g', 'l', 'pq', 'gq', 'lq']]
def evaluate(W, lo=200, hi=1000, label=''):
    line = label
    with torch.no_grad():
        for ds in ['zsre', 'counterfact']:
            P, Gq, L, pq, gq, lq = parts(ds, lo, hi)
            cg, cl = csls(W, P, Gq, pq, gq).numpy(), csls(W, P, L, pq, lq).numpy()
            auc = float((cg[:, None] > cl[None]).mean())
            line += f' | {ds[:2]} AUC {auc:.3f}'
            for fo in [0.05, 0.075, 0.1]:
                thr = np.quantile(cl, 1 - fo); line += f' {fo}:{np.mean(cg > thr):.3f}'
    print(line, flush=True)
def train(train_sets, steps=3000, lam=1.0, lr=3e-3):
    W = torch.eye(384, requires_grad=True); t = torch.zeros((), requires_grad=True); a = torch.tensor(20.0, requires_grad=True)
    opt = torch.optim.Adam([W, t, a], lr=lr)
    data = [parts(ds, 1000, 8000) for ds in train_sets]
    for step in range(steps):
        loss = 0
        for P, Gq, L, pq, gq, lq in data:
            idx = torch.randint(0, len(P), (256,))
            sp = csls(W, P[idx], Gq[idx], pq[idx], gq[idx]); sn = csls(W, P[idx], L[idx], pq[idx], lq[idx])
            loss = loss + F.binary_cross_entropy_with_logits(a * (sp - t), torch.ones_like(sp)) + F.binary_cross_entropy_with_logits(a * (sn - t), torch.zeros_like(sn))
        loss = loss + lam * ((W - torch.eye(384)) ** 2).sum() / 384
        opt.zero_grad(); loss.backward(); opt.step()
    return W.detach(), float(t)
evaluate(torch.eye(384), label='identity         ')
for sets in [['zsre'], ['counterfact'], ['zsre', 'counterfact']]:
    for lam in [1.0, 0.1, 0.01]:
        t0 = time.time(); W, thr = train(sets, lam=lam)
        evaluate(W, label=f'{"+".join(s[:2] for s in sets):6s} lam {lam:<5} t {thr:.3f} ({time.time()-t0:.0f}s)')
