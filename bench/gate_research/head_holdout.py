"""Relation hold-out: k-means clusters of masked edit prompts stand in for relations; the head is
trained on items of some clusters and evaluated on items of held-out clusters (dev only).
Run: .venv/bin/python bench/gate_research/head_holdout.py [--per-dataset]
  default: clusters over both datasets' prompts together (a relation is held out of both);
  --per-dataset: clusters and held-out folds chosen for each dataset on its own."""
import os, sys, torch, numpy as np
PER_DATASET = '--per-dataset' in sys.argv
sys.argv = sys.argv[:1]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'head_exp.py')).read().split("evaluate(torch.eye(384)")[0])
def kmeans(X, k, iters=30, seed=0):
    g = torch.Generator().manual_seed(seed); C = X[torch.randperm(len(X), generator=g)[:k]]
    for _ in range(iters):
        a = (X @ C.T).argmax(1)
        C = torch.stack([F.normalize(X[a == j].mean(0), dim=0) if (a == j).any() else C[j] for j in range(k)])
    return a
K = 40
if PER_DATASET:
    assign = {ds: kmeans(E[(ds, 'p')], K) for ds in ['zsre', 'counterfact']}
else:
    joint = kmeans(torch.cat([E[('zsre','p')], E[('counterfact','p')]]), K)
    assign = {'zsre': joint[:8000], 'counterfact': joint[8000:]}
for ds in assign: print(ds, 'cluster sizes', sorted(torch.bincount(assign[ds], minlength=K).tolist())[::-1][:10], '...')
E0 = dict(E)
for fold in range(3):
    g = torch.Generator().manual_seed(100 + fold)
    if PER_DATASET:
        held = {ds: set(torch.randperm(K, generator=g)[:K // 4].tolist()) for ds in assign}
    else:
        hc = set(torch.randperm(K, generator=g)[:K // 4].tolist()); held = {ds: hc for ds in assign}
    # training: items 1000-7999 outside held clusters; eval: items 200-999 inside held clusters
    tr = {ds: [i for i in range(1000, 8000) if int(assign[ds][i]) not in held[ds]] for ds in assign}
    ev = {ds: [i for i in range(200, 1000) if int(assign[ds][i]) in held[ds]] for ds in assign}
    def sub(idx_of):
        out = dict(E0)
        for ds, idx in idx_of.items():
            for k in ['p', 'g', 'l', 'pq', 'gq', 'lq']: out[(ds, k)] = E0[(ds, k)][idx]
        return out
    E = sub(tr); n_tr = {ds: len(v) for ds, v in tr.items()}
    # train() reads parts(ds, 1000, 8000): make it read everything
    parts_orig = parts
    parts = lambda ds, lo, hi: [E[(ds, k)] for k in ['p', 'g', 'l', 'pq', 'gq', 'lq']]
    heads = {lam: train(['zsre', 'counterfact'], lam=lam, steps=2000)[0] for lam in [1.0, 0.1]}
    E = sub(ev)
    print(f'fold {fold}: train {n_tr}, eval {({ds: len(v) for ds, v in ev.items()})}')
    evaluate(torch.eye(384), 0, 10**6, '  identity   ')
    for lam, W in heads.items(): evaluate(W, 0, 10**6, f'  head lam {lam}')
    parts = parts_orig
